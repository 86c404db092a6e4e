"""The token channel, both ends: a decode worker's outbox (decode_pool/outbox.py) and the router's
fan-out of each worker's stream to its requests (router/token_streams.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from decode_pool.outbox import TokenOutbox
from pool_runtime.handoff import TokenBatch, TokenChunk, WorkerDied
from router.token_streams import TokenStreams

pytestmark = pytest.mark.unit


def _c(rid: str, tok: int, attempt: int = 0, finished: bool = False) -> TokenChunk:
    return TokenChunk(rid, [tok], finished=finished, attempt=attempt)


def test_outbox_coalesces_steps_per_channel_and_never_blocks_the_writer() -> None:
    box = TokenOutbox()
    for step in range(100):  # nobody reads for 100 steps: put never waits
        box.put("r1", [_c("a", step), _c("b", step)])
        box.put("r2", [_c("x", step)])
    got = box.drain("r1", 0.0)
    assert [(c.request_id, c.token_ids[0]) for c in got[:4]] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert len(got) == 200 and box.pending("r2") == 100 and box.drain("r1", 0.0) == []


def test_outbox_drain_waits_for_a_put_and_close_wakes_it() -> None:
    box = TokenOutbox()
    got: list[list[TokenChunk]] = []
    reader = threading.Thread(target=lambda: got.append(box.drain("r", 30.0)))
    reader.start()
    box.put("r", [_c("a", 1)])
    reader.join(10)
    assert [c.token_ids for c in got[0]] == [[1]]
    reader = threading.Thread(target=lambda: got.append(box.drain("r", 30.0)))
    reader.start()
    box.close()
    reader.join(10)
    assert not reader.is_alive() and got[1] == []


def test_a_newer_stream_supersedes_the_old_one_which_drains_nothing() -> None:
    box = TokenOutbox()
    old = box.open("r")
    box.put("r", [_c("a", 1)])
    new = box.open("r")  # the router reconnected (or restarted its event loop) before `old` noticed
    assert box.drain("r", 0.0, old) is None  # the old stream must stop: it gets none of the chunks
    assert [c.token_ids for c in box.drain("r", 0.0, new) or []] == [[1]]
    assert not box.release("r", old) and box.is_read("r")  # the old one leaving changes nothing
    assert box.release("r", new) and not box.is_read("r")


def test_a_superseded_drain_that_is_waiting_returns_at_once() -> None:
    box = TokenOutbox()
    old = box.open("r")
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(box.drain("r", 30.0, old)))
    waiting.start()
    box.open("r")
    waiting.join(10)
    assert not waiting.is_alive() and got == [None]


class _Worker:
    """A decode worker's stream: the batches put in ``feed``; raises what is put there."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.feed: asyncio.Queue[TokenBatch | BaseException] = asyncio.Queue()
        self.opened = 0

    async def stream(self, channel: str) -> AsyncIterator[TokenBatch]:
        self.opened += 1
        while True:
            item = await self.feed.get()
            if isinstance(item, BaseException):
                raise item
            yield item


def test_fan_out_by_request_attempt_filter_and_death() -> None:
    async def main() -> None:
        w = _Worker("d0")
        streams = TokenStreams("router-1")
        a, b = streams.subscribe(w, "a"), streams.subscribe(w, "b")
        a.next_attempt(2)
        b.next_attempt(1)
        # one message, several requests; a chunk of a's first attempt is dropped; no subscriber: dropped
        w.feed.put_nowait(TokenBatch("d0", [_c("a", 1, 1), _c("a", 2, 2), _c("b", 3, 1), _c("zz", 9, 1)]))
        assert (await a.get()).token_ids == [2]
        assert (await b.get()).token_ids == [3]
        streams.unsubscribe(b)
        w.feed.put_nowait(TokenBatch("d0", [_c("b", 4, 1)]))  # b is gone: nobody gets it
        w.feed.put_nowait(WorkerDied("d0 died"))
        with pytest.raises(WorkerDied):
            await a.get()
        # the reader reconnects (Ray restarted the worker) and serves new subscriptions
        c = streams.subscribe(w, "c")
        w.feed.put_nowait(TokenBatch("d0", [_c("c", 5)]))
        assert (await asyncio.wait_for(c.get(), 5)).token_ids == [5]
        assert w.opened == 2 and streams.batches == 3
        await streams.close()
        with pytest.raises(WorkerDied):
            await c.get()

    asyncio.run(main())


def test_a_slow_reader_holds_only_its_own_chunks() -> None:
    async def main() -> None:
        w = _Worker("d0")
        streams = TokenStreams("router-1")
        slow, fast = streams.subscribe(w, "slow"), streams.subscribe(w, "fast")
        for i in range(50):
            w.feed.put_nowait(TokenBatch("d0", [_c("slow", i), _c("fast", i)]))
        # nobody reads "slow": "fast" still gets all of its chunks, in order
        assert [(await fast.get()).token_ids[0] for _ in range(50)] == list(range(50))
        assert [(await slow.get()).token_ids[0] for _ in range(50)] == list(range(50))
        await streams.close()

    asyncio.run(main())
