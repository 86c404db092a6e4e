"""Servers shared by the end-to-end modules: one ``tandem serve`` child on the Ray pools (its own
local Ray cluster, one prefill and one decode worker, the tiny checkpoint), gRPC and HTTP on free
ports, started once per session (starting it costs the suite tens of seconds on 2 cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_grpc_serve import ManagedServer

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "UCX_NET_DEVICES": "lo"}


@pytest.fixture(scope="session")
def served_pools(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # the child inherits them (ManagedServer copies os.environ)
    try:
        log = tmp_path_factory.mktemp("serve-pools") / "serve.log"
        s = ManagedServer(log, "--model", str(checkpoint), "--grace", "1")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield s
    finally:
        s.stop()
