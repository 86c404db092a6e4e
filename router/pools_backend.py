"""The pools backend: the router's Backend over the Ray prefill/decode pools, routed per request.

::

    generate(BackendRequest)
      Router.route: block hashes -> metadata store prefix lookup -> cached loads -> policy
      Pools.submit(PoolRequest(prefill_worker, decode_worker, "always" | "never"))
      TokenChunk -> Chunk; the last carries ChunkStats (workers, KV bytes moved, cached tokens)
    a background task refreshes the workers' loads every ``load_interval_s`` (never per token),
    registers / heartbeats them, with their load reports, in the metadata store, and removes the
    prefix blocks the workers evicted from the block index (every ``eviction_interval_s``)

Telemetry (router/telemetry.py): the request's span is current while the pools run it, so the
workers' spans join its trace; each routing decision is counted (disaggregated or local, by the
mode asked for); each committed handoff records the transfer metrics (bytes, duration, GB/s), each
failed one a transfer failure; the tier gauges read G1 from the load reports and G2 / G3 from the
workers' ``tier_usage``, fetched every ``tier_interval_s`` (only when metrics are on).

Errors: no route because no live decode worker -> BackendUnavailable (UNAVAILABLE); no decode
worker with KV room, or a reservation refused -> Overloaded (RESOURCE_EXHAUSTED); a worker refusing
the input -> InvalidRequest (INVALID_ARGUMENT); a handoff that failed every retry -> UNAVAILABLE.
Closing the generator (client cancel, deadline) closes the pools' stream, which cancels the request
on its workers and frees its blocks.

Lifecycle: ``PoolsBackend.over_pools`` (or construct) over running ``Pools`` -> ``await start()``
(first loads; also done by the first ``generate``) -> ``generate`` concurrently -> ``close()``
(idempotent; then ``on_close``, which stops what the builder started). Building the Ray pools from a
deployment's configuration is deploy/pools.py's job; this module knows no Ray and no YAML.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

from opentelemetry import trace

from engine.detokenizer import IncrementalDetokenizer
from memory_tiers.metadata import InProcessMetadataStore, MetadataStore, WorkerInfo
from pool_runtime.handoff import FirstToken, PoolError, TokenChunk
from pool_runtime.reports import TierUsage, WorkerLoad
from router.backend import (
    BackendLoad,
    BackendModelInfo,
    BackendRequest,
    Chunk,
    ChunkStats,
    decode_ids,
    encode_chat,
    make_detokenizer,
    model_info,
)
from router.coordinator import PoolRequest, Pools
from router.cost_model import CostParams
from router.errors import BackendUnavailable, InvalidRequest, Overloaded
from router.policies import NoRouteError
from router.routing import Route, Router, span_attributes
from router.telemetry import Telemetry
from router.topology import Topology

log = logging.getLogger(__name__)
# Handoff fixed cost priced by the cost model: reserve + start RPCs (~1 ms each, MEASURED.md) and
# the transfer's setup.
HANDOFF_OVERHEAD_S = 0.005


class PoolsBackend:
    """A :class:`router.backend.Backend` over :class:`router.coordinator.Pools`."""

    def __init__(
        self,
        pools: Pools,
        router: Router,
        info: BackendModelInfo,
        *,
        tokenizer: Any = None,
        nodes: dict[str, str] | None = None,
        load_interval_s: float = 0.1,
        eviction_interval_s: float = 0.5,
        heartbeat_interval_s: float = 2.0,
        heartbeat_ttl_s: float = 10.0,
        tier_interval_s: float = 1.0,
        tracer: trace.Tracer | None = None,
        telemetry: Telemetry | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.pools = pools
        self.router = router
        self._info = info
        self._tokenizer = tokenizer
        self._nodes = nodes or {}
        self._load_interval_s = load_interval_s
        self._eviction_interval_s = eviction_interval_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._tier_interval_s = tier_interval_s
        self._tracer = tracer or (telemetry.tracer if telemetry is not None else trace.NoOpTracer())
        # metrics only when they go somewhere: no per-request callback, no tier polling otherwise
        self._telemetry = telemetry if telemetry is not None and telemetry.enabled else None
        if self._telemetry is not None:
            self._telemetry.add_tier_source(self.tier_usage)
        self._on_close = on_close
        self._loads: list[WorkerLoad] = []
        self._lower_tiers: dict[str, list[TierUsage]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Redis answers over the network: keep the event loop free during its round trips.
        self._offload = not isinstance(router.store, InProcessMetadataStore)

    @classmethod
    def over_pools(
        cls,
        pools: Pools,
        model_dir: str | Path,
        store: MetadataStore,
        *,
        name: str = "",
        dtype: str = "float32",
        block_size: int = 16,
        policy: str = "cost_model",
        topology: Topology | None = None,
        max_model_len: int | None = None,
        max_tokens_limit: int | None = None,
        kv_cache_dtype: str = "auto",
        **kwargs: Any,
    ) -> PoolsBackend:
        """A backend over running pools serving the checkpoint at ``model_dir`` (tests, restarts:
        the workers outlive the backend unless ``on_close`` stops them)."""
        from engine.config import ModelConfig

        model_dir = Path(model_dir)
        mc = ModelConfig.from_pretrained(model_dir, dtype)
        params = cost_params(mc, block_size, kv_cache_dtype)
        router = Router(store, mc.fingerprint, params, topology or Topology(), policy)
        tokenizer = load_tokenizer(model_dir)
        eos = {*mc.eos_token_ids, *(tokenizer.eos_token_ids if tokenizer is not None else ())}
        info = model_info(mc, name or model_dir.name, block_size, dtype, max_model_len, max_tokens_limit, eos)
        return cls(pools, router, info, tokenizer=tokenizer, **kwargs)

    # -- the Backend protocol -----------------------------------------------------------------------
    def model_info(self) -> BackendModelInfo:
        return self._info

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._tokenizer is None:
            raise InvalidRequest("prompt", "this model has no tokenizer: send prompt token_ids")
        return list(self._tokenizer.encode(text, add_special_tokens))

    def tokenize_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return encode_chat(self._tokenizer, messages, add_generation_prompt)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return decode_ids(self._tokenizer, token_ids, skip_special_tokens)

    def detokenizer(self, request: BackendRequest) -> IncrementalDetokenizer | None:
        return make_detokenizer(self._tokenizer, request)

    def load(self) -> BackendLoad:
        workers = [dataclasses.replace(w, node=self._nodes.get(w.worker_id, "local")) for w in self._loads]
        alive = not self._closed and any(w.role == "decode" for w in self._loads)
        # Before the first refresh nothing is known: let the request through, route() decides.
        return BackendLoad(alive=alive or (not self._closed and self._refresher is None), workers=workers)

    async def start(self) -> None:
        """Fetch the first loads and start refreshing them (idempotent)."""
        if self._refresher is None and not self._closed:
            self._loop = asyncio.get_running_loop()
            await self.refresh()
            self._refresher = asyncio.create_task(self._refresh_loop())

    async def refresh(self) -> list[WorkerLoad]:
        """Ask every worker for its load now (tests call it to see a cancel's effect at once)."""
        self._loads = await self.pools.load()
        return self._loads

    async def generate(self, request: BackendRequest) -> AsyncGenerator[Chunk, None]:
        if self._closed:
            raise BackendUnavailable("the pools backend is closed")
        await self.start()
        route = await self._route(request)
        d = route.decision
        mode = "always" if d.disaggregate else "never"
        preq = PoolRequest(
            request.request_id or uuid.uuid4().hex,
            list(request.prompt_token_ids),
            request.params,
            disaggregation=mode,
            prefill_worker=d.prefill_worker,
            decode_worker=d.decode_worker,
            on_handoff=self._on_handoff if self._telemetry is not None else None,
            on_handoff_failure=self._telemetry.record_transfer_failure
            if self._telemetry is not None
            else None,
        )
        if self._offload:
            await asyncio.to_thread(self.router.commit, route)
        else:
            self.router.commit(route)
        started = time.monotonic()
        count = 0
        try:
            async with aclosing(cast(AsyncGenerator[TokenChunk, None], self.pools.submit(preq))) as chunks:
                async for c in chunks:
                    if c.error:
                        raise _error_for(c)
                    first = count == 0
                    count += len(c.token_ids)
                    chunk = Chunk(
                        c.token_ids,
                        c.text,
                        c.finish_reason if c.finished else None,
                        c.logprobs,
                        c.top_logprobs,
                        produced_at=c.produced_at,
                    )
                    if c.finished:
                        chunk.stats = self._stats(request, c, count, started)
                    elif first:  # who serves it and its cached tokens: known from the first token
                        chunk.partial = self._stats(request, c, count, started)
                    yield chunk
        except PoolError as e:  # refused before it started: the id is in flight already
            raise InvalidRequest("request_id", f"request id {preq.request_id!r} is already in use") from e
        finally:
            self.router.release(route)

    async def refresh_tiers(self) -> dict[str, list[TierUsage]]:
        """Ask every worker for its G2 / G3 occupancy now (the tier gauges read the last answers)."""
        handles: list[Any] = [*self.pools.prefill, *self.pools.decode]
        for h in handles:
            if not hasattr(h, "tier_usage"):
                continue
            try:
                self._lower_tiers[h.worker_id] = list(await h.tier_usage())
            except Exception:  # a dead worker reports nothing
                self._lower_tiers.pop(h.worker_id, None)
        return self._lower_tiers

    def tier_usage(self) -> list[TierUsage]:
        """Every worker's tiers as last reported: G1 from its load, G2 / G3 from ``refresh_tiers``."""
        out = [
            TierUsage(w.worker_id, w.role, "G1", w.used_blocks, w.used_blocks / w.total_blocks)
            for w in self._loads
            if w.total_blocks
        ]
        for tiers in list(self._lower_tiers.values()):
            out += tiers
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._telemetry is not None:
            self._telemetry.remove_tier_source(self.tier_usage)
        if self._refresher is not None and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped already
                self._loop.call_soon_threadsafe(self._refresher.cancel)
        if self._on_close is not None:
            self._on_close()

    # -- internals ----------------------------------------------------------------------------------
    async def _route(self, request: BackendRequest) -> Route:
        with self._tracer.start_as_current_span("tandem.route") as span:
            try:
                args = (request.prompt_token_ids, request.disaggregation, list(self._loads))
                if self._offload:
                    route = await asyncio.to_thread(self.router.route, *args)
                else:
                    route = self.router.route(*args)
            except NoRouteError as e:
                span.set_attribute("tandem.route.error", str(e))
                raise (Overloaded if e.overloaded else BackendUnavailable)(str(e)) from e
            attrs = span_attributes(route)
            span.set_attributes(attrs)
        trace.get_current_span().set_attributes(attrs)  # the request's own span (the servicer's)
        if self._telemetry is not None:
            self._telemetry.record_route(request.disaggregation, route.decision.disaggregate)
        return route

    def _on_handoff(self, first: FirstToken, decode_worker: str) -> None:
        assert self._telemetry is not None
        self._telemetry.record_transfer(first.kv_bytes, first.kv_transfer_s, first.worker_id, decode_worker)

    def _stats(self, request: BackendRequest, last: TokenChunk, count: int, started: float) -> ChunkStats:
        disaggregated = bool(last.prefill_worker)
        return ChunkStats(
            prompt_tokens=len(request.prompt_token_ids),
            completion_tokens=count,
            cached_tokens=last.prefill_cached_tokens if disaggregated else last.num_cached_tokens,
            queue_time_s=max(0.0, started - request.arrival) if request.arrival else 0.0,
            backend_time_s=time.monotonic() - started,
            prefill_worker=last.prefill_worker or last.worker_id,
            decode_worker=last.worker_id,
            kv_bytes_moved=last.kv_bytes,
            disaggregated=disaggregated,
        )

    async def _refresh_loop(self) -> None:
        registered: set[str] = set()
        next_beat = next_evictions = next_tiers = 0.0
        while not self._closed:
            try:
                loads = await self.refresh()
                if self._telemetry is not None and time.monotonic() >= next_tiers:
                    next_tiers = time.monotonic() + self._tier_interval_s
                    await self.refresh_tiers()
                if time.monotonic() >= next_evictions:
                    next_evictions = time.monotonic() + self._eviction_interval_s
                    await self.sync_evictions()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self._heartbeat_interval_s
                    await asyncio.to_thread(self._publish_loads, loads, registered)
            except asyncio.CancelledError:
                raise
            except Exception:  # a flaky store must not stop the load reports routing depends on
                log.warning("load refresh failed", exc_info=True)
            await asyncio.sleep(self._load_interval_s)

    async def sync_evictions(self) -> int:
        """Drop the blocks every worker evicted since the last call from the index; how many."""
        handles: list[Any] = [*self.pools.prefill, *self.pools.decode]
        n = 0
        for h in handles:
            if not hasattr(h, "take_evictions"):
                continue
            try:
                hashes = await h.take_evictions()
            except Exception:  # a dead worker: its entries go when it is dropped or re-evicts
                continue
            if hashes:
                n += len(hashes)
                if self._offload:
                    await asyncio.to_thread(self.router.forget, h.worker_id, hashes)
                else:
                    self.router.forget(h.worker_id, hashes)
        return n

    def _publish_loads(self, loads: Sequence[WorkerLoad], registered: set[str]) -> None:
        store, ttl = self.router.store, self._heartbeat_ttl_s
        for w in loads:
            if w.worker_id not in registered or not store.heartbeat(w.worker_id, ttl):
                node = self._nodes.get(w.worker_id, "local")
                store.register_worker(WorkerInfo(w.worker_id, w.role, node), ttl)
                registered.add(w.worker_id)
            store.put_load(
                w.worker_id,
                {
                    "queue_tokens": w.queue_tokens,
                    "running_seqs": w.running,
                    "free_blocks": {"G1": w.free_blocks, "G2": w.g2_free_blocks},
                    "used_blocks": w.used_blocks,
                    "tensor_parallel_size": w.tensor_parallel_size,
                },
            )


def _error_for(c: TokenChunk) -> Exception:
    kind = c.error_kind
    if kind == "invalid":
        return InvalidRequest("prompt", c.error.split(": ", 1)[-1])
    if kind == "overloaded":
        return Overloaded(c.error)
    return BackendUnavailable(c.error or "the request failed on the pools")


def cost_params(mc: Any, block_size: int, kv_cache_dtype: str = "auto") -> CostParams:
    """The cost model's constants for a model (``engine.config.ModelConfig``) whose KV the pools hold
    as ``kv_cache_dtype``: the bytes a handoff moves per token, as the pool stores them (per-head K
    and V, or MLA's latent; a quantized cache's codes and scales)."""
    layout = dataclasses.replace(mc.kv_layout(block_size), kv_dtype=kv_cache_dtype)
    return CostParams(
        kv_bytes_per_token=layout.block_bytes // block_size,
        block_size=block_size,
        handoff_overhead_s=HANDOFF_OVERHEAD_S,
        num_kv_heads=mc.num_kv_heads,
    )


def load_tokenizer(model_dir: Path) -> Any:
    from engine.tokenizer import Tokenizer

    return Tokenizer.maybe_from_pretrained(model_dir)
