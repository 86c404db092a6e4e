"""The decode pool as Ray actors: DecodeWorker replicas with their loop running, and async handles.

``build_decode_pool(config, spec)`` starts ``spec.replicas`` actors (worker ids ``decode-0``, ...)
and returns one :class:`RayDecodeHandle` per replica for ``router.coordinator.Pools``.

The token stream: ``RayDecodeHandle.stream(channel)`` is one Ray streaming generator per router
(``DecodeActor.stream``): each item a :class:`~pool_runtime.handoff.TokenBatch` with every chunk the
worker's steps produced for that router since the last item. Why a Ray stream and not a socket of
our own (ZeroMQ, as vLLM's engine core uses, or gRPC): it rides Ray's authenticated connection, so
it adds no listener to secure; it fails with the actor (``WorkerDied``) the way every other call
does; and one item per step costs ~1-2 ms of latency on the 2-core machine, measured
(docs/benchmarks-pools.md), against a step of tens of milliseconds. Backpressure: Ray pauses the
generator when ``STREAM_BACKPRESSURE`` items are unread; the worker's steps never wait on it (its
outbox coalesces what accumulates: decode_pool/outbox.py).

Tracing (pool_runtime/tracing.py): each handle call that starts work passes the caller's trace context;
the actor opens ``tandem.kv_reserve`` around ``reserve`` and one ``tandem.decode`` span per request
from ``start`` / ``submit_local`` until its last chunk is produced (or ``cancel``). With the
tracer off nothing is opened.

Tensor parallel: as for prefill (prefill_pool/pool.py), a placement group per replica and follower
ranks started by the actor; ``reserve`` passes on the prefill worker's KV layout.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from opentelemetry import trace

from decode_pool.worker import DecodeWorker
from kv_transfer.heads import KVShardLayout
from pool_runtime.actor_telemetry import ActorTelemetry
from pool_runtime.actors import ActorIdentity, PoolSpec, call
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import FirstToken, KVGrant, Route, TokenBatch, TokenChunk, WorkerDied, WorkRequest
from pool_runtime.reports import WorkerLoad
from pool_runtime.tp_actors import placed_actor_class, rank_usage, start_rank_group
from pool_runtime.tracing import TelemetryConfig, extract_context, inject_context

STREAM_BACKPRESSURE = 16  # unread TokenBatch items before Ray pauses a stream's generator
DRAIN_TIMEOUT_S = 1.0  # a stream's heartbeat when nothing happens


@dataclass(slots=True)
class _DecodeSpan:
    span: Any
    local: bool  # prefilled here (conditional disaggregation)
    tokens: int = 0  # streamed by this worker (with a handoff, the prefill's first token too)


class DecodeActor(ActorIdentity, ActorTelemetry, DecodeWorker):
    """A DecodeWorker whose loop thread runs from construction, traced when ``telemetry`` says so."""

    def __init__(
        self, config: WorkerConfig, telemetry: TelemetryConfig | None = None, built_from: str = ""
    ) -> None:
        super().__init__(config, start_rank_group(config, self.role))
        self.built_from = built_from
        self.setup_tracing(telemetry)
        self._spans: dict[str, _DecodeSpan] = {}
        self._spans_lock = threading.Lock()
        self.start_loop()

    def reserve(
        self,
        req: WorkRequest,
        source: KVShardLayout | None = None,
        route: Route = Route(),
        carrier: dict[str, str] | None = None,
    ) -> KVGrant:
        if not self.tracing.enabled:
            return super().reserve(req, source, route)
        with self.tracing.tracer.start_as_current_span(
            "tandem.kv_reserve", context=extract_context(carrier), attributes=self._attrs(req.request_id)
        ) as span:
            grant = super().reserve(req, source, route)
            span.set_attribute("tandem.kv_reserve.blocks", len(grant.dest.block_ids))
            span.set_attribute("tandem.kv_reserve.cached_blocks", grant.num_cached_blocks)
        return grant

    def start(self, request_id: str, first: FirstToken, carrier: dict[str, str] | None = None) -> None:
        self._open(request_id, carrier, local=False)  # before: the request may finish at once
        try:
            super().start(request_id, first)
        except BaseException as e:
            self._close(request_id, error=repr(e))
            raise

    def submit_local(
        self, req: WorkRequest, route: Route = Route(), carrier: dict[str, str] | None = None
    ) -> None:
        self._open(req.request_id, carrier, local=True, prompt_tokens=len(req.prompt_token_ids))
        try:
            super().submit_local(req, route)
        except BaseException as e:
            self._close(req.request_id, error=repr(e))
            raise

    @ray.method(num_returns="streaming", _generator_backpressure_num_objects=STREAM_BACKPRESSURE)
    def stream(self, channel: str) -> Iterator[TokenBatch]:
        """The router ``channel``'s token stream: first an empty TokenBatch (the stream is live:
        the router starts requests only after it), then one per drain (empty: a heartbeat, so a
        router that went away is noticed). Ends when the worker closes, or when a newer stream of
        the same channel supersedes it; when the router drops it, the channel's requests are
        cancelled (after a grace for a reconnect)."""
        reader = self.outbox.open(channel)
        try:
            yield TokenBatch(self.worker_id)
            while not self._closed:
                chunks = self.outbox.drain(channel, DRAIN_TIMEOUT_S, reader)
                if chunks is None:
                    return  # superseded
                yield TokenBatch(self.worker_id, chunks)
        finally:
            self.close_channel(channel, reader)

    def _emitted(self, chunks: list[TokenChunk]) -> None:
        if not self._spans:
            return
        for c in chunks:
            ds = self._spans.get(c.request_id)
            if ds is not None:
                ds.tokens += len(c.token_ids)
                if c.finished:
                    self._close(c.request_id, last=c)

    def cancel(self, request_id: str) -> bool:
        found = super().cancel(request_id)
        if self._spans:
            self._close(request_id, cancelled=True)
        return found

    def layout(self) -> KVShardLayout:
        return self.kv_layout

    def rank_usage(self) -> list[dict[str, int]]:
        """Per rank: blocks under a KV lease on its receiver (rank 0 first; ``tandem status``, tests)."""
        with self._cv:
            reserved = self.receiver.num_reserved_blocks
            mine = {"rank": 0, "pid": os.getpid(), "reserved_blocks": reserved, "sends_in_flight": 0}
        return [mine, *rank_usage(self.ranks)]

    # -- the tandem.decode span ----------------------------------------------------------------------
    def _attrs(self, request_id: str) -> dict[str, Any]:
        return {"tandem.request_id": request_id, "tandem.worker_id": self.worker_id}

    def _open(
        self, request_id: str, carrier: dict[str, str] | None, local: bool, prompt_tokens: int = 0
    ) -> None:
        if not self.tracing.enabled:
            return
        attrs = {**self._attrs(request_id), "tandem.decode.local_prefill": local}
        if local:
            attrs["tandem.prompt_tokens"] = prompt_tokens
        span = self.tracing.tracer.start_span(
            "tandem.decode", context=extract_context(carrier), attributes=attrs
        )
        with self._spans_lock:
            old = self._spans.pop(request_id, None)
            self._spans[request_id] = _DecodeSpan(span, local)
        if old is not None:  # a resumed request: the earlier attempt's span ends here
            old.span.end()

    def _close(
        self, request_id: str, last: TokenChunk | None = None, error: str = "", cancelled: bool = False
    ) -> None:
        with self._spans_lock:
            ds = self._spans.pop(request_id, None)
        if ds is None:
            return
        span = ds.span
        span.set_attribute("tandem.decode.tokens", ds.tokens)
        if cancelled:  # by the caller: not an error of this worker
            span.set_attribute("tandem.decode.cancelled", True)
        if last is not None:
            span.set_attribute("tandem.finish_reason", last.finish_reason or "")
            if ds.local:
                span.set_attribute("tandem.decode.cached_tokens", last.num_cached_tokens)
            error = last.error
        if error:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()


class RayDecodeHandle:
    def __init__(self, actor: Any, worker_id: str, placement: Any = None) -> None:
        self.actor = actor
        self.worker_id = worker_id
        self.placement = placement  # a tensor-parallel worker's placement group (removed with it)

    async def reserve(
        self, req: WorkRequest, source: KVShardLayout | None = None, route: Route = Route()
    ) -> KVGrant:
        return await call(self.actor.reserve.remote(req, source, route, inject_context()), self.worker_id)

    async def start(self, request_id: str, first: FirstToken) -> None:
        await call(self.actor.start.remote(request_id, first, inject_context()), self.worker_id)

    async def submit_local(self, req: WorkRequest, route: Route = Route()) -> None:
        await call(self.actor.submit_local.remote(req, route, inject_context()), self.worker_id)

    async def stream(self, channel: str) -> AsyncIterator[TokenBatch]:
        """The worker's token stream for ``channel`` (WorkerDied when the actor dies)."""
        from ray.exceptions import RayActorError

        gen = self.actor.stream.remote(channel)
        try:
            async for ref in gen:
                yield await ref
        except RayActorError as e:
            raise WorkerDied(f"worker {self.worker_id} died: {type(e).__name__}") from e

    async def cancel(self, request_id: str) -> bool:
        return await call(self.actor.cancel.remote(request_id), self.worker_id)

    async def load(self) -> WorkerLoad:
        return await call(self.actor.load.remote(), self.worker_id)

    async def take_evictions(self) -> list[bytes]:
        return await call(self.actor.take_evictions.remote(), self.worker_id)

    async def tier_usage(self) -> list[Any]:
        return await call(self.actor.tier_usage.remote(), self.worker_id)


def build_decode_pool(
    config: WorkerConfig, spec: PoolSpec, prefix: str = "decode", telemetry: TelemetryConfig | None = None
) -> list[RayDecodeHandle]:
    """Start the replicas and wait until each has loaded its model and registered its KV pool;
    ``telemetry`` chooses the workers' span exporter (None: untraced)."""
    handles = []
    for i in range(spec.replicas):
        wid = f"{prefix}-{i}"
        cls, pg, cfg = placed_actor_class(DecodeActor, dataclasses.replace(config, worker_id=wid), spec)
        handles.append(RayDecodeHandle(cls.remote(cfg, telemetry), wid, pg))
    ray.get([h.actor.ready.remote() for h in handles])
    return handles
