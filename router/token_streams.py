"""The router's end of the decode workers' token streams: one reader per decode worker, fanning each
message out to the requests waiting on it.

::

    decode-0 ──stream(channel)──▶ reader task ──┬──▶ Subscription(r1).get()
                TokenBatch per step             ├──▶ Subscription(r7).get()
                                                └──▶ (no subscriber: dropped — cancelled, resumed)
    decode-1 ──stream(channel)──▶ reader task ──▶ ...

A request subscribes *before* it is started on its worker, and only once the worker's stream is
live (``connected``: its first, empty message has arrived), so no chunk of it can go by unseen —
the worker keeps a channel's chunks until its current stream drains them (decode_pool/outbox.py).
The reader never waits for a subscriber: each subscription is an unbounded queue, bounded in practice by the
request's own tokens, so a client that reads slowly holds only its own chunks, never the stream.

When a worker's stream fails because the worker died (``WorkerDied``), every subscription on it
gets that error (the coordinator resumes those requests elsewhere, or on the restarted worker), and
the reader reconnects with a backoff: Ray restarts a dead worker, and the new stream serves the
requests started on it since. Plain asyncio; no Ray here (the handle's ``stream`` is).

Lifecycle: construct -> ``subscribe`` / ``unsubscribe`` per request (readers start on first use) ->
``close`` (idempotent: stops the readers, fails what is still subscribed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from pool_runtime.handoff import TokenBatch, TokenChunk, WorkerDied

log = logging.getLogger(__name__)
_BACKOFF_S = (0.05, 2.0)  # first and longest wait before reconnecting to a failed worker


class StreamingHandle(Protocol):
    worker_id: str

    def stream(self, channel: str) -> AsyncIterator[TokenBatch]: ...


class Subscription:
    """One request's chunks from one worker, in order, of its current ``attempt`` only (a chunk of
    an earlier attempt still in flight is dropped); ``get`` raises the stream's failure."""

    __slots__ = ("request_id", "worker_id", "attempt", "_queue")

    def __init__(self, request_id: str, worker_id: str) -> None:
        self.request_id = request_id
        self.worker_id = worker_id
        self.attempt = 0
        self._queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()

    def put(self, item: TokenChunk | BaseException) -> None:
        if isinstance(item, TokenChunk) and item.attempt != self.attempt:
            return
        self._queue.put_nowait(item)

    async def get(self) -> TokenChunk:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def next_attempt(self, attempt: int) -> None:
        """From now on only ``attempt``'s chunks count; what arrived of earlier ones is forgotten
        (a failure already queued stays: the stream it came from is gone)."""
        self.attempt = attempt
        kept = [i for i in self._drain() if not isinstance(i, TokenChunk)]
        for item in kept:
            self._queue.put_nowait(item)

    def _drain(self) -> list[TokenChunk | BaseException]:
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out


class _Reader:
    def __init__(self, handle: StreamingHandle) -> None:
        self.handle = handle
        self.subs: dict[str, Subscription] = {}
        self.task: asyncio.Task[None] | None = None
        self.live = asyncio.Event()  # the current stream has delivered its first message


class TokenStreams:
    """Every decode worker's stream for one router ``channel``."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._readers: dict[str, _Reader] = {}
        self._closed = False
        self.batches = 0  # messages received, over all workers (tests, benchmarks)

    def subscribe(self, handle: StreamingHandle, request_id: str) -> Subscription:
        """Start receiving ``request_id``'s chunks from ``handle``'s worker (replacing an earlier
        subscription of the same request there). Start the request only after ``connected``."""
        if self._closed:
            raise RuntimeError("the token streams are closed")
        reader = self._reader(handle)
        sub = Subscription(request_id, handle.worker_id)
        reader.subs[request_id] = sub
        return sub

    async def connected(self, handle: StreamingHandle, timeout_s: float = 60.0) -> None:
        """Wait until ``handle``'s stream is live (at once, but for its first request and after a
        reconnect); WorkerDied when it is not within ``timeout_s``."""
        reader = self._reader(handle)
        if reader.live.is_set():
            return
        try:
            await asyncio.wait_for(reader.live.wait(), timeout_s)
        except TimeoutError:
            raise WorkerDied(f"worker {handle.worker_id}: no token stream after {timeout_s:.0f} s") from None

    def _reader(self, handle: StreamingHandle) -> _Reader:
        """The worker's reader, (re)started in the running event loop when it is not running."""
        reader = self._readers.get(handle.worker_id)
        if reader is None:
            reader = self._readers[handle.worker_id] = _Reader(handle)
        if reader.task is None or reader.task.done():
            reader.handle, reader.live = handle, asyncio.Event()
            reader.task = asyncio.create_task(self._read(reader), name=f"tokens-{handle.worker_id}")
        return reader

    def unsubscribe(self, sub: Subscription) -> None:
        reader = self._readers.get(sub.worker_id)
        if reader is not None and reader.subs.get(sub.request_id) is sub:
            del reader.subs[sub.request_id]

    async def close(self) -> None:
        self._closed = True
        for reader in self._readers.values():
            if reader.task is not None:
                reader.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader.task
            self._fail(reader, WorkerDied("the router closed its token streams"))

    async def _read(self, reader: _Reader) -> None:
        backoff = _BACKOFF_S[0]
        while not self._closed:
            try:
                async for batch in reader.handle.stream(self.channel):
                    backoff = _BACKOFF_S[0]
                    reader.live.set()
                    self.batches += 1
                    subs = reader.subs
                    for chunk in batch.chunks:
                        sub = subs.get(chunk.request_id)
                        if sub is not None:
                            sub.put(chunk)
                error: Exception = WorkerDied(f"worker {reader.handle.worker_id} closed its token stream")
            except asyncio.CancelledError:
                raise
            except WorkerDied as e:
                error = e
            except Exception as e:  # a stream that broke some other way: treated as a dead worker
                log.warning("token stream of %s failed", reader.handle.worker_id, exc_info=True)
                error = WorkerDied(f"worker {reader.handle.worker_id}: token stream failed: {e}")
            reader.live.clear()
            self._fail(reader, error)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, _BACKOFF_S[1])

    @staticmethod
    def _fail(reader: _Reader, error: Exception) -> None:
        subs, reader.subs = reader.subs, {}
        for sub in subs.values():
            sub.put(error)
