"""The prefill pool as Ray actors: PrefillWorker replicas with their loop running, and async handles.

``build_prefill_pool(config, spec)`` starts ``spec.replicas`` actors (worker ids ``prefill-0``, ...)
and returns one :class:`RayPrefillHandle` per replica, which is what ``router.coordinator.Pools``
takes. ``shutdown(handles)`` kills them.

A prefill is one Ray streaming call (``PrefillActor.prefill_stream``) of two items: the first token as
soon as it is sampled — the router streams it to the client while the KV handoff completes behind
it — and then the committed FirstToken, once the decode worker acked.

Tracing (pool_runtime/tracing.py): ``prefill`` carries the caller's trace context; the actor opens
``tandem.prefill`` (queued + computed, until the decode worker's commit ack) and, from the worker's
:class:`~pool_runtime.handoff.FirstToken`, its child ``tandem.kv_transfer`` (first layer posted ->
commit ack: bytes, layers, GB/s).

Tensor parallel (``config.tensor_parallel_size`` > 1): each replica is a placement group of one
bundle per rank, the actor in bundle 0, which starts its follower ranks as it starts
(pool_runtime/tp_actors.py); a rank that dies ends the actor, and Ray restarts the worker whole.
"""

from __future__ import annotations

import dataclasses
import os
import queue
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Any

import ray
from opentelemetry import trace

from kv_transfer.heads import KVShardLayout
from pool_runtime.actor_telemetry import ActorTelemetry
from pool_runtime.actors import ActorIdentity, PoolSpec, call
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import FirstToken, KVGrant, WorkerDied, WorkRequest
from pool_runtime.reports import WorkerLoad
from pool_runtime.tp_actors import placed_actor_class, rank_usage, start_rank_group
from pool_runtime.tracing import TelemetryConfig, extract_context, inject_context
from prefill_pool.worker import PrefillWorker

CANCEL_WAIT_S = 30.0


class PrefillActor(ActorIdentity, ActorTelemetry, PrefillWorker):
    """A PrefillWorker whose loop thread runs from construction (Ray calls its methods on threads),
    traced when ``telemetry`` says so."""

    def __init__(
        self, config: WorkerConfig, telemetry: TelemetryConfig | None = None, built_from: str = ""
    ) -> None:
        super().__init__(config, start_rank_group(config, self.role))
        self.built_from = built_from
        self.setup_tracing(telemetry)
        self.start_loop()

    def layout(self) -> KVShardLayout:
        """This worker's KV layout (model, dtype, block size, heads over its ranks)."""
        return self.kv_layout

    def rank_usage(self) -> list[dict[str, int]]:
        """Per rank: KV sends still in flight (rank 0 first; ``tandem status``, tests)."""
        mine = {
            "rank": 0,
            "pid": os.getpid(),
            "reserved_blocks": 0,
            "sends_in_flight": self.sender.num_in_flight,
        }
        return [mine, *rank_usage(self.ranks)]

    @ray.method(num_returns="streaming")
    def prefill_stream(
        self, req: WorkRequest, grant: KVGrant, carrier: dict[str, str] | None = None
    ) -> Iterator[FirstToken]:
        """Prefill ``req`` into ``grant``: yields the first token as soon as it is sampled
        (``committed=False``), then, once the decode worker acked the commit, the committed
        FirstToken with the transfer's figures. Raises if the prefill or the handoff fails."""
        if not self.tracing.enabled:
            yield from self._prefill_items(req, grant)
            return
        attrs: dict[str, Any] = {
            "tandem.request_id": req.request_id,
            "tandem.worker_id": self.worker_id,
            "tandem.decode_worker": grant.worker_id,
            "tandem.prompt_tokens": len(req.prompt_token_ids),
        }
        tracer = self.tracing.tracer
        span = tracer.start_span("tandem.prefill", extract_context(carrier), attributes=attrs)
        try:
            for first in self._prefill_items(req, grant):
                if first.committed:
                    span.set_attribute("tandem.prefill.cached_tokens", first.num_cached_tokens)
                    span.set_attribute(
                        "tandem.prefill.computed_tokens", len(req.prompt_token_ids) - first.num_cached_tokens
                    )
                    if first.kv_transfer_start_ns:
                        _transfer_span(tracer, first, grant, span)
                yield first
        except BaseException as e:
            span.set_status(trace.Status(trace.StatusCode.ERROR, repr(e)))
            raise
        finally:
            span.end()

    def _prefill_items(self, req: WorkRequest, grant: KVGrant) -> Iterator[FirstToken]:
        items: queue.SimpleQueue[FirstToken | Future[FirstToken]] = queue.SimpleQueue()
        fut = self.submit(req, grant, on_first=items.put)
        fut.add_done_callback(items.put)
        item = items.get()
        if isinstance(item, FirstToken):  # sampled; the handoff completes behind it
            yield item
            item = items.get()
        assert isinstance(item, Future)
        yield item.result()  # the committed FirstToken, or the prefill's / handoff's error

    def cancel_and_wait(self, request_id: str) -> None:
        """``cancel``, returning once the loop has released the request (so the caller may free
        the decode side)."""
        self.cancel(request_id).wait(CANCEL_WAIT_S)


class RayPrefillHandle:
    def __init__(self, actor: Any, worker_id: str, placement: Any = None) -> None:
        self.actor = actor
        self.worker_id = worker_id
        self.placement = placement  # a tensor-parallel worker's placement group (removed with it)
        self._layout: KVShardLayout | None = None

    async def kv_layout(self) -> KVShardLayout:
        """The worker's KV layout (asked once: a restarted worker is built from the same config)."""
        if self._layout is None:
            self._layout = await call(self.actor.layout.remote(), self.worker_id)
        return self._layout

    async def prefill(self, req: WorkRequest, grant: KVGrant) -> AsyncIterator[FirstToken]:
        """The sampled first token, then the committed one (WorkerDied when the actor dies)."""
        from ray.exceptions import RayActorError

        gen = self.actor.prefill_stream.remote(req, grant, inject_context())
        try:
            async for ref in gen:
                yield await ref
        except RayActorError as e:
            raise WorkerDied(f"worker {self.worker_id} died: {type(e).__name__}") from e

    async def cancel(self, request_id: str) -> None:
        await call(self.actor.cancel_and_wait.remote(request_id), self.worker_id)

    async def load(self) -> WorkerLoad:
        return await call(self.actor.load.remote(), self.worker_id)

    async def take_evictions(self) -> list[bytes]:
        return await call(self.actor.take_evictions.remote(), self.worker_id)

    async def tier_usage(self) -> list[Any]:
        return await call(self.actor.tier_usage.remote(), self.worker_id)


def _transfer_span(tracer: trace.Tracer, r: FirstToken, grant: KVGrant, parent: Any) -> None:
    """The handoff's transfer, a child of the prefill span, from the worker's timings."""
    gbps = r.kv_bytes / r.kv_transfer_s / 1e9 if r.kv_transfer_s > 0 else 0.0
    span = tracer.start_span(
        "tandem.kv_transfer",
        context=trace.set_span_in_context(parent),
        start_time=r.kv_transfer_start_ns,
        attributes={
            "tandem.request_id": r.request_id,
            "tandem.prefill_worker": r.worker_id,
            "tandem.decode_worker": grant.worker_id,
            "tandem.kv_transfer.bytes": r.kv_bytes,
            "tandem.kv_transfer.layers": r.kv_layers,
            "tandem.kv_transfer.duration_s": r.kv_transfer_s,
            "tandem.kv_transfer.gbps": gbps,
        },
    )
    span.end(end_time=r.kv_transfer_start_ns + round(r.kv_transfer_s * 1e9))


def build_prefill_pool(
    config: WorkerConfig, spec: PoolSpec, prefix: str = "prefill", telemetry: TelemetryConfig | None = None
) -> list[RayPrefillHandle]:
    """Start the replicas and wait until each has loaded its model; ``telemetry`` chooses the
    workers' span exporter (None: untraced)."""
    handles = []
    for i in range(spec.replicas):
        wid = f"{prefix}-{i}"
        cls, pg, cfg = placed_actor_class(PrefillActor, dataclasses.replace(config, worker_id=wid), spec)
        handles.append(RayPrefillHandle(cls.remote(cfg, telemetry), wid, pg))
    ray.get([h.actor.ready.remote() for h in handles])
    return handles
