"""The two kinds of worker as the coordinator sees them: async handles over Ray actors
(prefill_pool/pool.py, decode_pool/pool.py), or fakes in tests. No Ray here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from kv_transfer.heads import KVShardLayout
from pool_runtime.handoff import FirstToken, KVGrant, Route, TokenBatch, WorkRequest
from pool_runtime.reports import WorkerLoad


class PrefillHandle(Protocol):
    worker_id: str

    async def kv_layout(self) -> KVShardLayout | None:
        """Its KV pool's layout (model, dtype, block size, heads over its tensor-parallel ranks),
        which the decode worker checks and plans the handoff by; None: the decode worker's model
        on one rank."""
        ...

    def prefill(self, req: WorkRequest, grant: KVGrant) -> AsyncIterator[FirstToken]:
        """The first token as soon as it is sampled (``committed=False``), then the committed one
        once the decode worker acked; a handle may yield the committed one alone."""
        ...

    async def cancel(self, request_id: str) -> None: ...

    async def load(self) -> WorkerLoad: ...


class DecodeHandle(Protocol):
    worker_id: str

    async def reserve(
        self, req: WorkRequest, source: KVShardLayout | None = None, route: Route = Route()
    ) -> KVGrant: ...

    async def start(self, request_id: str, first: FirstToken) -> None: ...

    async def submit_local(self, req: WorkRequest, route: Route = Route()) -> None: ...

    def stream(self, channel: str) -> AsyncIterator[TokenBatch]:
        """The worker's chunks for ``channel``, a batch per message (WorkerDied when it dies)."""
        ...

    async def cancel(self, request_id: str) -> bool: ...

    async def load(self) -> WorkerLoad: ...
