"""One local Ray cluster per test session, shared by every test module that needs one.

``ray_cluster`` (a fixture) starts it on first use — ``address="local"`` in a fresh temp dir, no
dashboard (MEASURED.md: a stale ``ray_current_cluster`` can hang ``ray.init``; never ``ray stop``)
— and it is shut down once, when the test process exits. Modules import the fixture; the start is
idempotent, so several modules (or conftests) importing it share the one cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

_temp_dir: str | None = None


def ensure_ray() -> None:
    """Start the session's Ray cluster if it is not running yet."""
    global _temp_dir
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    _temp_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(address="local", include_dashboard=False, _temp_dir=_temp_dir, num_cpus=4, log_to_driver=False)
    atexit.register(_shutdown)


def _shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _temp_dir is not None:
        shutil.rmtree(_temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    ensure_ray()
    yield


@contextlib.contextmanager
def running_pools(
    prefill_cfg: Any,
    prefill_spec: Any,
    decode_cfg: Any = None,
    decode_spec: Any = None,
    telemetry: Any = None,
) -> Iterator[tuple[list[Any], list[Any]]]:
    """Start a prefill and a decode pool (decode defaults to the prefill config and spec), yield
    their handles, and shut both down after; a decode pool that fails to start stops the prefill
    pool first."""
    from decode_pool.pool import build_decode_pool
    from pool_runtime.actors import shutdown
    from prefill_pool.pool import build_prefill_pool

    prefill = build_prefill_pool(prefill_cfg, prefill_spec, telemetry=telemetry)
    try:
        decode_cfg, decode_spec = decode_cfg or prefill_cfg, decode_spec or prefill_spec
        decode = build_decode_pool(decode_cfg, decode_spec, telemetry=telemetry)
    except BaseException:
        shutdown(prefill)
        raise
    try:
        yield prefill, decode
    finally:
        shutdown(prefill + decode)
