"""The demo checkpoint: a tiny random-weight Llama made on first use and shared by every process.

It lives under ``$TANDEM_HOME`` (default ``~/.cache/tandem``) in ``models/``. Several processes
(Ray workers, the router, parallel tests) may ask for it at once: each builds into its own temporary
directory and renames it into place; the first rename wins and the others discard their copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.make_model import make_model

DEMO_PRESET = "tiny"  # text appears instantly on a CPU; the weights are random either way
DEMO_ARCH = "llama"
DEMO_SEED = 0
# Bump when make_model's output changes, so stale demo checkpoints are not reused.
DEMO_VERSION = 1


def tandem_home() -> Path:
    return Path(os.environ.get("TANDEM_HOME") or Path.home() / ".cache" / "tandem")


def demo_model_dir() -> Path:
    """Path of the demo checkpoint, building it if it is not there yet (~0.1 s)."""
    root = tandem_home() / "models"
    target = root / f"demo-{DEMO_PRESET}-{DEMO_ARCH}-s{DEMO_SEED}-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        make_model(tmp, DEMO_PRESET, DEMO_ARCH, seed=DEMO_SEED)
        try:
            # Atomic on one filesystem; fails if another process renamed its copy first.
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
