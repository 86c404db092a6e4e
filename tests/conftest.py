"""Shared fixtures. Environment that must be set before heavy imports is set here, first."""

from __future__ import annotations

import os

# Triton kernels run through the interpreter on a machine without a GPU; this must be set before
# any @triton.jit kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("TANDEM_GPU") == "1" else "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fetched models (SmolLM2, checked by SHA-256 when fetched) are the one thing shared with the user's
# cache, so that `make smollm2` before the suite (CI) saves each session a 93 MB download.
if "TANDEM_DOWNLOADS" not in os.environ:
    _user_home = os.environ.get("TANDEM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tandem")
    os.environ["TANDEM_DOWNLOADS"] = os.path.join(_user_home, "downloads")
# Demo checkpoints and KV tier files of a test session live in a fresh directory: no test reads the
# user's cache, and no G3 block of an earlier run is ever served to this one.
if "TANDEM_HOME" not in os.environ:
    import tempfile

    os.environ["TANDEM_HOME"] = tempfile.mkdtemp(prefix="tandem-test-home-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "tiny" preset checkpoint (``tandem make-model``), read-only for the tests."""
    from engine.make_model import make_model

    path = tmp_path_factory.mktemp("tiny-ckpt")
    make_model(path, "tiny")
    return path


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
