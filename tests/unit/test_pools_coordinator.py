"""The pools' request flow over fake workers: retries, resume, cancel and disaggregation choice.

Each fake records the calls it gets, so the tests assert the exact protocol sequence."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.sampling_params import SamplingParams
from kv_transfer.protocol import KVTransferError
from pool_runtime.handoff import (
    FirstToken,
    KVGrant,
    Route,
    TokenBatch,
    TokenChunk,
    WorkerDied,
    WorkRequest,
)
from pool_runtime.reports import WorkerLoad
from router.coordinator import PoolRequest, Pools

pytestmark = pytest.mark.unit


# the "model": the token at position p of any request is 100 + p
def _tok(pos: int) -> int:
    return 100 + pos


class FakePrefill:
    """Yields the sampled first token, then (after ``commit_gate``, if set) the committed one; fails
    with ``fail`` before the first token, or with ``fail_after_first`` between the two."""

    def __init__(
        self, worker_id: str, fail: BaseException | None = None, fail_after_first: BaseException | None = None
    ) -> None:
        self.worker_id = worker_id
        self.fail = fail
        self.fail_after_first = fail_after_first
        self.commit_gate: asyncio.Event | None = None
        self.finish_reason: str | None = None  # the first token ends the request
        self.calls: list[tuple[Any, ...]] = []

    async def kv_layout(self) -> None:
        return None

    async def prefill(self, req: WorkRequest, grant: KVGrant) -> AsyncIterator[FirstToken]:
        self.calls.append(("prefill", req.request_id, len(req.prompt_token_ids), grant.worker_id))
        if self.fail is not None:
            raise self.fail
        first = FirstToken(req.request_id, _tok(len(req.prompt_token_ids)), self.worker_id)
        first.finish_reason, first.committed = self.finish_reason, False
        yield first
        if self.commit_gate is not None:
            await self.commit_gate.wait()
        if self.fail_after_first is not None:
            raise self.fail_after_first
        yield dataclasses.replace(first, committed=True, kv_bytes=64)

    async def cancel(self, request_id: str) -> None:
        self.calls.append(("cancel", request_id))

    async def load(self) -> WorkerLoad:
        return WorkerLoad(self.worker_id, "prefill")


class FakeDecode:
    """Streams one token per request per step over its token stream; dies (WorkerDied, then down
    until ``revive``) when a request reaches position ``die_at``."""

    def __init__(self, worker_id: str, die_at: int | None = None) -> None:
        self.worker_id = worker_id
        self.die_at = die_at
        self.dead = False
        self.calls: list[tuple[Any, ...]] = []
        self.live: dict[str, list[int]] = {}  # rid -> [next position, tokens left, attempt]
        self.routes: dict[str, Route] = {}
        self.gate: asyncio.Event | None = None  # when set, reserve waits for it
        self.stale: list[TokenChunk] = []  # sent once, first thing on the next stream message

    async def reserve(self, req: WorkRequest, source: Any = None, route: Route = Route()) -> KVGrant:
        self._check()
        self.calls.append(("reserve", req.request_id, len(req.prompt_token_ids), req.params.max_tokens))
        if self.gate is not None:
            await self.gate.wait()
        self.routes[req.request_id] = route
        return KVGrant(req.request_id, self.worker_id, dest=None)  # type: ignore[arg-type]

    async def start(self, request_id: str, first: FirstToken) -> None:
        self._check()
        self.calls.append(("start", request_id, first.token_id))
        max_tokens = next(c[3] for c in reversed(self.calls) if c[0] == "reserve")
        if max_tokens > 1:  # the first token came from the prefill worker
            self.live[request_id] = [
                first.token_id - 100 + 1,
                max_tokens - 1,
                self.routes[request_id].attempt,
            ]

    async def submit_local(self, req: WorkRequest, route: Route = Route()) -> None:
        self._check()
        self.calls.append(("local", req.request_id, len(req.prompt_token_ids), req.params.max_tokens))
        self.live[req.request_id] = [len(req.prompt_token_ids), req.params.max_tokens, route.attempt]

    async def stream(self, channel: str) -> AsyncIterator[TokenBatch]:
        self._check()
        while True:
            await asyncio.sleep(0.001)
            chunks, self.stale = self.stale, []
            for rid, st in list(self.live.items()):
                pos, left, attempt = st
                if self.die_at is not None and pos >= self.die_at:
                    self.dead, self.live = True, {}
                    raise WorkerDied(self.worker_id)
                st[0], st[1] = pos + 1, left - 1
                done = st[1] == 0
                if done:
                    del self.live[rid]
                chunks.append(
                    TokenChunk(rid, [_tok(pos)], finished=done, finish_reason="length" if done else None,
                               worker_id=self.worker_id, attempt=attempt)
                )  # fmt: skip
            yield TokenBatch(self.worker_id, chunks)

    async def cancel(self, request_id: str) -> bool:
        self._check()
        self.calls.append(("cancel", request_id))
        return self.live.pop(request_id, None) is not None

    async def load(self) -> WorkerLoad:
        self._check()
        return WorkerLoad(self.worker_id, "decode")

    def revive(self) -> None:
        self.dead, self.die_at = False, None

    def _check(self) -> None:
        if self.dead:
            raise WorkerDied(f"{self.worker_id} is down")


def _run(pools: Pools, req: PoolRequest, stop_after: int | None = None) -> list[TokenChunk]:
    async def go() -> list[TokenChunk]:
        out: list[TokenChunk] = []
        gen = pools.submit(req)
        async for c in gen:
            out.append(c)
            if stop_after is not None and len(out) == stop_after:
                await gen.aclose()
                break
        return out  # asyncio.run then stops the token stream readers (the next run starts new ones)

    return asyncio.run(go())


def _req(rid: str = "r", n: int = 5, max_tokens: int = 4, **kw: Any) -> PoolRequest:
    return PoolRequest(rid, list(range(n)), SamplingParams(max_tokens=max_tokens, seed=9), **kw)


def _tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_handoff_happy_path() -> None:
    p, d = FakePrefill("p0"), FakeDecode("d0")
    chunks = _run(Pools([p], [d]), _req())
    assert _tokens(chunks) == [105, 106, 107, 108]
    assert p.calls == [("prefill", "r", 5, "d0")]
    assert d.calls == [("reserve", "r", 5, 4), ("start", "r", 105)]
    assert chunks[-1].finished and chunks[-1].error == ""


def test_dead_prefill_is_retried_on_another() -> None:
    p0, p1, d = FakePrefill("p0", WorkerDied("p0")), FakePrefill("p1"), FakeDecode("d0")
    chunks = _run(Pools([p0, p1], [d]), _req(prefill_worker="p0"))
    assert _tokens(chunks)[0] == 105 and chunks[-1].error == ""
    assert p0.calls == [("prefill", "r", 5, "d0")]
    assert p1.calls == [("prefill", "r", 5, "d0")]
    assert d.calls == [("reserve", "r", 5, 4), ("cancel", "r"), ("reserve", "r", 5, 4), ("start", "r", 105)]


def test_failed_transfers_end_with_a_clear_error() -> None:
    bad = [FakePrefill(f"p{i}", KVTransferError("digest mismatch")) for i in range(2)]
    d = FakeDecode("d0")
    chunks = _run(Pools(bad, [d], max_attempts=3), _req())
    assert len(chunks) == 1 and chunks[0].finish_reason == "abort"
    assert "prefill failed 2 times" in chunks[0].error and "digest mismatch" in chunks[0].error
    assert d.calls.count(("cancel", "r")) >= 2 and d.live == {}


def test_dead_decode_resumes_from_streamed_tokens() -> None:
    d0, d1, p = FakeDecode("d0", die_at=7), FakeDecode("d1"), FakePrefill("p0")
    chunks = _run(Pools([p], [d0, d1]), _req(max_tokens=5, decode_worker="d0"))
    # positions 5, 6 from d0; then d1 resumes with prompt + 2 streamed tokens and 3 tokens to go
    assert _tokens(chunks) == [105, 106, 107, 108, 109]
    assert p.calls == [("prefill", "r", 5, "d0"), ("prefill", "r", 7, "d1")]
    assert d1.calls == [("reserve", "r", 7, 3), ("start", "r", 107)]
    assert chunks[-1].finished and chunks[-1].error == ""


def test_close_iterator_cancels_on_the_decode_worker() -> None:
    p, d = FakePrefill("p0"), FakeDecode("d0")
    chunks = _run(Pools([p], [d]), _req(max_tokens=10), stop_after=2)
    assert _tokens(chunks) == [105, 106]
    assert d.calls[-1] == ("cancel", "r") and d.live == {}


def test_cancel_while_reserving_releases_and_ends() -> None:
    p, d = FakePrefill("p0"), FakeDecode("d0")
    pools = Pools([p], [d])

    async def go() -> list[TokenChunk]:
        d.gate = asyncio.Event()
        gen = pools.submit(_req())
        first = asyncio.ensure_future(gen.__anext__())
        while not d.calls:
            await asyncio.sleep(0)  # until the request is inside reserve
        assert await pools.cancel("r")
        d.gate.set()  # the reservation lands after the cancel
        return [await first]

    chunks = asyncio.run(go())
    assert chunks[0].error == "cancelled" and chunks[0].finish_reason == "abort"
    assert p.calls == [] and d.live == {}
    assert d.calls == [("reserve", "r", 5, 4), ("cancel", "r"), ("cancel", "r")]


@pytest.mark.parametrize(
    ("mode", "n", "expect_local"),
    [("never", 5, True), ("always", 5, False), ("auto", 5, True), ("auto", 70, False)],
)
def test_disaggregation_choice(mode: str, n: int, expect_local: bool) -> None:
    p, d = FakePrefill("p0"), FakeDecode("d0")
    chunks = _run(
        Pools([p], [d], disaggregation="always", auto_min_prompt_tokens=64), _req(n=n, disaggregation=mode)
    )
    assert _tokens(chunks)[0] == 100 + n
    assert (d.calls[0][0] == "local") is expect_local
    assert (p.calls == []) is expect_local


def test_deadline_cancels_like_a_caller() -> None:
    p, d = FakePrefill("p0"), FakeDecode("d0")
    d.gate = asyncio.Event()  # reserve never returns on its own
    pools = Pools([p], [d])

    async def go() -> list[TokenChunk]:
        async def release_after_cancel() -> None:
            while ("cancel", "r") not in d.calls:
                await asyncio.sleep(0.001)
            assert d.gate is not None
            d.gate.set()

        opener = asyncio.ensure_future(release_after_cancel())
        chunks = [c async for c in pools.submit(_req(deadline_s=0.01))]
        await opener
        return chunks

    chunks = asyncio.run(go())
    assert [(c.finish_reason, c.error) for c in chunks] == [("abort", "deadline exceeded")]
    assert p.calls == [] and d.live == {}


def test_a_workers_failure_reaches_the_client_as_its_message_not_rays_traceback() -> None:
    from ray.exceptions import RayTaskError

    from kv_transfer.protocol import KVTransferError
    from router.failures import brief as _brief

    cause = KVTransferError("r1: digest mismatch in block 3")
    trace = (
        '\x1b[36mray::Prefill.prefill()\x1b[39m Traceback (most recent call last):\n  File "w.py", line 9\n'
    )
    raised = RayTaskError(
        "prefill", trace + "KVTransferError: r1: digest mismatch", cause
    ).as_instanceof_cause()
    assert isinstance(raised, KVTransferError)  # as the coordinator catches it
    assert "Traceback" in str(raised)
    assert _brief(raised) == "r1: digest mismatch in block 3"
    assert _brief(ValueError("one line")) == "one line"
    assert _brief(RuntimeError()) == "RuntimeError"


def test_first_token_reaches_the_client_before_the_handoff_commits() -> None:
    p, d = FakePrefill("p0"), FakeDecode("d0")
    p.commit_gate = asyncio.Event()
    pools = Pools([p], [d])

    async def go() -> list[TokenChunk]:
        gen = pools.submit(_req())
        first = await gen.__anext__()
        # the commit is still held back: yet the client has the first token, and d has it to start
        assert not p.commit_gate.is_set() and first.token_ids == [105] and not first.finished
        assert first.prefill_worker == "p0" and first.worker_id == "d0"
        assert p.commit_gate is not None
        p.commit_gate.set()
        rest = [c async for c in gen]
        await pools.close()
        return [first, *rest]

    chunks = asyncio.run(go())
    assert _tokens(chunks) == [105, 106, 107, 108]
    assert chunks[-1].kv_bytes == 64 and chunks[-1].prefill_worker == "p0"
    assert d.calls == [("reserve", "r", 5, 4), ("start", "r", 105)]


def test_a_handoff_failing_after_the_first_token_resumes_after_it() -> None:
    bad = FakePrefill("p0", fail_after_first=KVTransferError("digest mismatch on layer 2"))
    good, d = FakePrefill("p1"), FakeDecode("d0")
    chunks = _run(Pools([bad, good], [d]), _req(prefill_worker="p0"))
    # 105 streamed from p0; p1 prefills prompt + 105 and continues with 106: no token twice
    assert _tokens(chunks) == [105, 106, 107, 108] and chunks[-1].error == ""
    assert bad.calls == [("prefill", "r", 5, "d0")] and good.calls == [("prefill", "r", 6, "d0")]
    assert d.calls == [
        ("reserve", "r", 5, 4), ("start", "r", 105), ("cancel", "r"),
        ("reserve", "r", 6, 3), ("start", "r", 106),
    ]  # fmt: skip


def test_a_stale_chunk_of_an_earlier_attempt_is_dropped() -> None:
    bad = FakePrefill("p0", fail_after_first=KVTransferError("lease expired"))
    good, d = FakePrefill("p1"), FakeDecode("d0")
    # the first attempt's decode output, still in flight when the retry has started
    d.stale = [TokenChunk("r", [999], attempt=1), TokenChunk("r", [], finished=True, error="x", attempt=1)]
    chunks = _run(Pools([bad, good], [d]), _req(prefill_worker="p0"))
    assert _tokens(chunks) == [105, 106, 107, 108] and chunks[-1].error == ""


def test_a_first_token_that_ends_the_request_is_the_last_chunk_and_frees_the_reservation() -> None:
    p, d = FakePrefill("p0"), FakeDecode("d0")
    p.finish_reason = "stop"
    chunks = _run(Pools([p], [d]), _req())
    assert [(c.token_ids, c.finished, c.finish_reason) for c in chunks] == [([105], True, "stop")]
    assert ("start", "r", 105) not in d.calls and d.calls[-1] == ("cancel", "r")


def test_with_no_other_decode_worker_a_request_waits_for_the_restart() -> None:
    d, p = FakeDecode("d0", die_at=7), FakePrefill("p0")
    pools = Pools([p], [d], restart_wait_s=10.0)

    async def go() -> list[TokenChunk]:
        async def restart_later() -> None:
            while not d.dead:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)  # Ray takes a while to restart the worker
            d.revive()

        restarter = asyncio.ensure_future(restart_later())
        chunks = [c async for c in pools.submit(_req(max_tokens=5))]
        await restarter
        await pools.close()
        return chunks

    chunks = asyncio.run(go())
    assert _tokens(chunks) == [105, 106, 107, 108, 109] and chunks[-1].error == ""
    assert p.calls == [("prefill", "r", 5, "d0"), ("prefill", "r", 7, "d0")]


def test_a_decode_worker_that_stays_down_ends_the_request_unavailable() -> None:
    d, p = FakeDecode("d0", die_at=7), FakePrefill("p0")
    chunks = _run(Pools([p], [d], restart_wait_s=0.2), _req(max_tokens=5))
    assert _tokens(chunks) == [105, 106]
    assert chunks[-1].error_kind == "unavailable" and chunks[-1].finish_reason == "abort"
