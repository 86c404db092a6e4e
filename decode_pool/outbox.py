"""A decode worker's token channels: what each step produced, waiting for the stream that carries it.

One channel per router (its id is the router's): every request names the channel its tokens go to
(``reserve`` / ``submit_local``). After each step the worker ``put``s that step's chunks — one per
request that produced a token, finished or failed — and the channel's stream ``drain``s whatever
has accumulated, as one message::

    step n   ──put──▶ [c1 c2 c3 ...]  ┐
    step n+1 ──put──▶ [c1 c2 ...]     ├─ drain() ──▶ one TokenBatch over one Ray stream ──▶ router
                                      ┘                (decode_pool/pool.py: DecodeActor.stream)

The step loop never waits for a reader: a slow or stalled stream only makes the next drain bigger
(bounded: a request's chunks are at most its tokens), so one slow client cannot stall the others
or the batch. Thread-safe; plain Python (no Ray, no torch).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pool_runtime.handoff import TokenChunk


@dataclass(slots=True)
class _Channel:
    chunks: list[TokenChunk] = field(default_factory=list)
    readers: int = 0  # open streams (a reconnecting router may briefly hold two)


class TokenOutbox:
    """Lifecycle: construct -> put / drain (streams open and close channels) -> close (wakes every
    drain; later drains return at once)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._channels: dict[str, _Channel] = {}
        self._closed = False

    def open(self, channel: str) -> None:
        """A stream starts reading ``channel`` (it keeps what was put before it opened)."""
        with self._cv:
            self._channels.setdefault(channel, _Channel()).readers += 1

    def release(self, channel: str) -> bool:
        """A stream of ``channel`` ended; True when it was the last one reading it."""
        with self._cv:
            ch = self._channels.get(channel)
            if ch is None:
                return False
            ch.readers -= 1
            return ch.readers <= 0

    def is_read(self, channel: str) -> bool:
        with self._cv:
            ch = self._channels.get(channel)
            return ch is not None and ch.readers > 0

    def put(self, channel: str, chunks: list[TokenChunk]) -> None:
        if not chunks:
            return
        with self._cv:
            self._channels.setdefault(channel, _Channel()).chunks.extend(chunks)
            self._cv.notify_all()

    def drain(self, channel: str, timeout_s: float) -> list[TokenChunk]:
        """Everything put for ``channel`` since the last drain, waiting up to ``timeout_s`` for at
        least one chunk ([] on timeout or once closed)."""
        with self._cv:
            ch = self._channels.setdefault(channel, _Channel())
            if not ch.chunks and not self._closed:
                self._cv.wait_for(lambda: bool(ch.chunks) or self._closed, timeout_s)
            out, ch.chunks = ch.chunks, []
            return out

    def pending(self, channel: str) -> int:
        with self._cv:
            ch = self._channels.get(channel)
            return len(ch.chunks) if ch is not None else 0

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
