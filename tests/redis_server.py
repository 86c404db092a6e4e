"""A real ``redis-server`` for a test, on a free port, with extra arguments (a password, TLS):
started in its own process group, waited for, always killed. ``ready`` is how to ping it (a
TLS or password-protected server needs the client's options)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_server(args: Callable[[int], Sequence[str]], ready: Callable[[int], bool]) -> Iterator[int]:
    """Start ``redis-server --bind 127.0.0.1 *args(port)`` (no persistence); yield the port once
    ``ready(port)`` is true; kill it. Skips without redis-server."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install -y --no-install-recommends redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tandem-redis-")
    log_path = os.path.join(workdir, "redis.log")
    cmd = [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir, *args(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                with open(log_path, errors="replace") as f:
                    pytest.fail(f"redis-server exited with {proc.returncode}:\n{f.read()[-2000:]}")
            try:
                if ready(port):
                    break
            except Exception:  # noqa: BLE001  (not listening yet)
                pass
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not answer PING within 10 s")
            time.sleep(0.02)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
