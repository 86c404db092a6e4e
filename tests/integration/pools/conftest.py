"""Fixtures shared by the pools tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers_checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama written by transformers (seed 3), read-only for the tests."""
    return make_checkpoint(tmp_path_factory.mktemp("pools-ckpt"), "llama", seed=3)
