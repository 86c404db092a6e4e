"""The decode worker's test hooks: die after a request's Nth token, damage the next KV payloads of a
request, count what the digest check refused. Off unless a test sets them. A mixin of
:class:`decode_pool.worker.DecodeWorker`."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, cast

from kv_transfer.base import BaseReceiver


class FaultHooks:
    _cv: threading.Condition
    receiver: Any
    _crash_after_tokens: dict[str, int]
    _tokens: dict[str, int]

    def crash_after_tokens(self, request_id: str, num_tokens: int) -> None:
        """Test hook: SIGKILL this process when ``request_id`` has produced ``num_tokens`` tokens
        here (its first, from the prefill worker, counted)."""
        with self._cv:
            self._crash_after_tokens[request_id] = num_tokens

    def corrupt_next_payload(self, request_id: str, times: int = 1) -> None:
        """Test hook: flip one byte of each of the next ``times`` KV payloads that arrive for
        ``request_id``, in this worker's pool before their digest check (kv_transfer's
        ``BaseReceiver.corrupt_next``); 0 clears it."""
        with self._cv:
            cast(BaseReceiver, self.receiver).corrupt_next[request_id] = times

    def transfer_faults(self) -> dict[str, int]:
        """Payloads damaged by the test seam, and payloads refused for a digest mismatch."""
        with self._cv:
            r = cast(BaseReceiver, self.receiver)
            return {"corrupted": r.corrupted, "digest_mismatches": r.digest_mismatches}

    def _count_tokens(self, request_id: str, n: int) -> None:
        limit = self._crash_after_tokens.get(request_id)
        if limit is None:
            return
        self._tokens[request_id] = self._tokens.get(request_id, 0) + n
        if self._tokens[request_id] >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
