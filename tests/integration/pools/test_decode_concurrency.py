"""A decode worker answers its control calls while a forward pass runs: the forward holds no lock.

The forward is held inside ``execute_step`` on an event (not slept on): while it is held, reserve,
start, load and cancel each return, and a cancel of a request in the held step takes effect when
the step ends — its blocks are not freed under the forward that writes them, and nothing more is
streamed for it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from decode_pool.worker import DecodeWorker
from engine.llm_engine import StepPlan
from engine.sampler import SampleOutput
from prefill_pool.worker import PrefillWorker
from tests.integration.pools.helpers import prefill_all, work, worker_config

pytestmark = pytest.mark.integration

CALL_S = 10.0  # generous: a call that waited for the held forward would never return at all


class HeldForward:
    """Wraps a worker's ``engine.execute_step``: each call signals ``entered`` and waits for
    ``release`` before computing."""

    def __init__(self, d: DecodeWorker) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.plans: list[StepPlan] = []
        inner = d.engine.execute_step

        def held(plan: StepPlan, on_layer: object = None) -> SampleOutput:
            self.plans.append(plan)
            self.entered.set()
            assert self.release.wait(60), "the test never released the forward"
            return inner(plan)

        d.engine.execute_step = held  # type: ignore[method-assign]


def _call(fn: object, *args: object) -> object:
    """Run ``fn(*args)`` on another thread; its result, or fail if it does not return in time."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))  # type: ignore[operator]
    t.start()
    t.join(CALL_S)
    assert not t.is_alive(), f"{fn} waited for the forward pass"
    return out[0]


@pytest.fixture
def decode(ckpt: Path) -> Iterator[DecodeWorker]:
    d = DecodeWorker(worker_config(ckpt, "d0"))
    try:
        yield d
    finally:
        d.close()


def test_control_calls_return_while_the_forward_runs(ckpt: Path, decode: DecodeWorker) -> None:
    d = decode
    held = HeldForward(d)
    d.submit_local(work("running", list(range(3, 30)), max_tokens=4))
    d.start_loop()
    assert held.entered.wait(30)  # the loop is inside the forward of "running"'s first chunk
    assert held.plans[0].request_ids == ["running"]

    p = PrefillWorker(worker_config(ckpt, "p0"))
    try:
        req = work("incoming", list(range(40, 60)), max_tokens=3)
        grant = _call(d.reserve, req)  # blocks allocated, lease taken: during the forward
        load = _call(d.load)
        assert load.waiting == 1 and load.reserved_blocks == len(grant.dest.block_ids)  # type: ignore[attr-defined]
        fut = p.submit(req, grant)  # type: ignore[arg-type]
        prefill_all(p, [fut])  # the KV lands and commits: the poll thread acks while the forward is held
        first = fut.result(30)
        _call(d.start, "incoming", first)
        used_before = d.load().used_blocks
        assert _call(d.cancel, "running") is True  # in the held step: deferred, answered at once
        assert d.load().used_blocks == used_before  # not freed under the forward
    finally:
        p.close()

    held.release.set()
    chunks = []
    while not any(c.finished and c.request_id == "incoming" for c in chunks):
        chunks += d.drain("", 30.0)
    assert {c.request_id for c in chunks} == {"incoming"}  # nothing of the cancelled request
    assert sum(len(c.token_ids) for c in chunks) == 2  # the first came from the prefill worker
    load = d.load()
    assert (load.used_blocks, load.running, load.waiting, load.reserved_blocks) == (0, 0, 0, 0)
