"""Shared random-weight checkpoints made on first use: the demo model and the benchmark model.

They live under ``$TANDEM_HOME`` (default ``~/.cache/tandem``) in ``models/``. Several processes
(Ray workers, the router, parallel tests) may ask for one at once: each builds into its own temporary
directory and renames it into place; the first rename wins and the others discard their copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.make_model import make_model

DEMO_PRESET = "tiny"  # text appears instantly on a CPU; the weights are random either way
BENCH_PRESET = "bench"  # compute dominates Python overhead (see engine.make_model.PRESETS)
ARCH = "llama"
SEED = 0
# Bump when make_model's output changes, so stale cached checkpoints are not reused.
VERSION = 2  # 2: tokenizer_config.json has a chat template


def tandem_home() -> Path:
    return Path(os.environ.get("TANDEM_HOME") or Path.home() / ".cache" / "tandem")


def demo_model_dir() -> Path:
    """Path of the demo checkpoint ("tiny" Llama), building it if it is not there yet (~0.1 s)."""
    return cached_model_dir(DEMO_PRESET)


def bench_model_dir() -> Path:
    """Path of the CPU benchmark checkpoint ("bench" Llama, ~29 M params), built on first use (~2 s)."""
    return cached_model_dir(BENCH_PRESET)


def cached_model_dir(preset: str, arch: str = ARCH, seed: int = SEED) -> Path:
    root = tandem_home() / "models"
    target = root / f"{preset}-{arch}-s{seed}-v{VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        make_model(tmp, preset, arch, seed=seed)
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
