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
or the batch. One reader per channel: a stream that opens a channel supersedes the one before it
(a router that reconnected, or restarted its event loop), whose next drain returns None — so no
chunk is ever drained into a stream nobody reads any more. Thread-safe; plain Python (no Ray, no
torch).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pool_runtime.handoff import TokenChunk


@dataclass(slots=True)
class _Channel:
    chunks: list[TokenChunk] = field(default_factory=list)
    reader: int = 0  # the stream that reads it (its ``open`` number); 0: none


class TokenOutbox:
    """Lifecycle: construct -> put / drain (streams open and close channels) -> close (wakes every
    drain; later drains return at once)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._channels: dict[str, _Channel] = {}
        self._readers = 0  # streams opened so far
        self._closed = False

    def open(self, channel: str) -> int:
        """A stream starts reading ``channel`` (it gets what was put before it opened); returns its
        reader number. The channel's previous stream, if any, is superseded."""
        with self._cv:
            self._readers += 1
            self._channels.setdefault(channel, _Channel()).reader = self._readers
            self._cv.notify_all()  # a superseded drain returns
            return self._readers

    def release(self, channel: str, reader: int) -> bool:
        """Stream ``reader`` of ``channel`` ended; True when it was the channel's reader (nobody
        reads the channel now)."""
        with self._cv:
            ch = self._channels.get(channel)
            if ch is None or ch.reader != reader:
                return False
            ch.reader = 0
            return True

    def is_read(self, channel: str) -> bool:
        with self._cv:
            ch = self._channels.get(channel)
            return ch is not None and ch.reader != 0

    def put(self, channel: str, chunks: list[TokenChunk]) -> None:
        if not chunks:
            return
        with self._cv:
            self._channels.setdefault(channel, _Channel()).chunks.extend(chunks)
            self._cv.notify_all()

    def drain(self, channel: str, timeout_s: float, reader: int | None = None) -> list[TokenChunk] | None:
        """Everything put for ``channel`` since the last drain, waiting up to ``timeout_s`` for at
        least one chunk ([] on timeout or once closed). ``reader``: the stream asking; None once
        another stream has superseded it (it must stop). Without one (tests) no check."""
        with self._cv:
            ch = self._channels.setdefault(channel, _Channel())
            gone = lambda: reader is not None and ch.reader != reader  # noqa: E731
            if not ch.chunks and not self._closed and not gone():
                self._cv.wait_for(lambda: bool(ch.chunks) or self._closed or gone(), timeout_s)
            if gone():
                return None
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
