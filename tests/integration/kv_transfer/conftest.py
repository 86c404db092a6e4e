"""Fixtures: peer processes (spawned, never forked: UCX must not be initialised before a fork)
that hold a KV receiver or sender and run commands from tests/integration/kv_transfer/peers.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.kv_transfer import peers

_CTX = mp.get_context("spawn")
_CALL_TIMEOUT_S = 120.0


class PeerError(RuntimeError):
    pass


class Peer:
    """One spawned peer process; ``call`` runs a command and returns its result (or raises
    PeerError with the peer's traceback); ``post`` / ``result`` split a call in two so that two
    peers can work at the same time."""

    def __init__(self, backend: str, transport: str = "shm") -> None:
        self.backend = backend
        self.conn, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=peers.serve, args=(child, backend, transport), daemon=True)
        self.proc.start()
        child.close()

    def post(self, name: str, **kwargs: Any) -> None:
        self.conn.send((name, kwargs))

    def result(self, timeout_s: float = _CALL_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout_s):
            raise PeerError(f"peer {self.proc.pid} gave no answer in {timeout_s} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise PeerError(value)
        return value

    def call(self, name: str, **kwargs: Any) -> Any:
        self.post(name, **kwargs)
        return self.result()

    def kill(self) -> None:
        if self.proc.is_alive() and self.proc.pid is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
                self.proc.join(10)
        except (BrokenPipeError, OSError):
            pass
        if self.proc.is_alive():
            self.kill()
        self.conn.close()


@pytest.fixture(scope="module", params=["nixl", "ucxx"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Peer, Peer]]:
    """A (receiver, sender) pair of peer processes for one backend over shared memory."""
    rx, tx = Peer(request.param), Peer(request.param)
    try:
        yield rx, tx
    finally:
        rx.stop()
        tx.stop()


@pytest.fixture
def spawn_peer() -> Iterator[Any]:
    """Start extra (victim) peers; all are killed at the end of the test."""
    started: list[Peer] = []

    def start(backend: str, transport: str = "shm") -> Peer:
        p = Peer(backend, transport)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()
