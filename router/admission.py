"""Admission control: a bounded number of requests in flight, a bounded FIFO queue, shedding beyond.

::

    acquire() --slot free and nobody queued--> in flight (max_concurrency)
              --queue has room-------------> wait FIFO (max_queue) --release() hands the slot over
              --queue full-----------------> Overloaded  (RESOURCE_EXHAUSTED: shed, never wait unbounded)

A released slot goes straight to the oldest waiter, so a newcomer cannot overtake the queue. A
waiter cancelled (client gone, deadline) leaves the queue; one cancelled just after being handed a
slot gives it back. After ``close()`` every acquire fails with BackendUnavailable (draining).
Single event loop, no locks: everything runs on the loop thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from router.errors import BackendUnavailable, Overloaded


class AdmissionQueue:
    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.num_shed = 0  # requests refused with Overloaded since start
        self.num_admitted = 0  # requests given a slot since start
        self.peak = 0  # most requests in flight and queued at once since start

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def check(self, n: int = 1) -> None:
        """Raise now what ``n`` acquires would raise at once (draining, or the queue full), without
        taking anything: an HTTP front door refuses before its status line goes out, then acquires
        inside the stream (where a race lost to another request is still an in-stream error)."""
        if self._closed:
            raise BackendUnavailable("server is shutting down")
        queued = self.queued
        free = max(0, self.max_concurrency - self._in_flight) if not queued else 0
        if n - free > self.max_queue - queued:
            self.num_shed += 1
            raise Overloaded(
                f"server overloaded: {self._in_flight} requests in flight (max_concurrency "
                f"{self.max_concurrency}) and {queued} queued (max_queue {self.max_queue}); retry later"
            )

    async def acquire(self) -> None:
        if self._closed:
            raise BackendUnavailable("server is shutting down")
        if self._in_flight < self.max_concurrency and not self.queued:
            self._in_flight += 1
            self.num_admitted += 1
            self.peak = max(self.peak, self._in_flight + self.queued)
            return
        if self.queued >= self.max_queue:
            self.num_shed += 1
            raise Overloaded(
                f"server overloaded: {self._in_flight} requests in flight (max_concurrency "
                f"{self.max_concurrency}) and {self.queued} queued (max_queue {self.max_queue}); retry later"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.peak = max(self.peak, self._in_flight + self.queued)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            else:
                self._remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves to the waiter: in_flight is unchanged
                self.num_admitted += 1
                return
        self._in_flight -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        """Refuse new requests and reject the queued ones; in-flight ones keep their slots."""
        self._closed = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(BackendUnavailable("server is shutting down"))

    def _remove(self, fut: asyncio.Future[None]) -> None:
        with suppress(ValueError):
            self._waiters.remove(fut)
