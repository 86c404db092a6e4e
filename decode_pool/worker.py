"""DecodeWorker: reserves KV for incoming handoffs, adopts committed requests into its running batch
and streams their tokens (continuous batching); it can also prefill a request itself.

A request here is in one of four places::

    reserve()  ──▶ _reserved (blocks held under a KV lease; the receiver checks every layer's digest)
                     │ in G1 when it has room, else in G2 (g2_landing.py: host memory the sender
                     │ WRITEs into; committed blocks are cached G2 blocks under their hashes)
                     │ Completed (all layers verified): committed
                     │ Failed (digest, lease expiry, dead sender) / cancel: blocks freed at once
    start()    ──▶ the first token (sampled by the prefill worker) is kept until the KV commits;
                   then the engine's running batch (joins at the next step, leaves the step it
                   finishes) — or, G2 ones: _parked until G1 has room (FIFO), onboarded G2 → G1
    submit_local() ─▶ the engine's waiting queue (conditional disaggregation: prefilled here)

Requests waiting in G2 have the first claim on G1: a new reservation goes to G1 only if it fits
beside the G1 blocks they will need, so a stream of small requests cannot starve them.

Tokens: every request names a channel (its router's). After each step the worker puts that step's
chunks — token ids only; text is made once, at the router's front door — into the channel's
outbox (decode_pool/outbox.py), and one stream per router drains it (``drain``; the actor's
``stream``). A request's first token is not in it: the router has it from the prefill worker.
Every exit — finish, cancel, failed handoff, close — frees the request's blocks, so
``load().used_blocks`` and ``load().g2_used_blocks`` return to 0.

Threads, and why the forward pass holds no lock: one lock guards the engine's bookkeeping (block
manager, scheduler, requests), the receiver and this worker's tables. The loop thread takes it to
plan a step (``engine.begin_step``) and to finish it (``finish_step``), and runs the forward pass
and sampling between the two *without* it. So control calls — reserve, start, cancel, load — wait at
most for a step's bookkeeping, never for a forward; what they change is picked up by the next plan.
The one thing that cannot happen mid-forward is freeing blocks the forward writes: a cancel of a
request in the running step is applied when the step finishes. The poll thread drives the
receiver (digests, commits, acks) while the forward runs, so a prefill worker's ack never waits
for a decode step.

Tensor parallel (``ranks``, pool_runtime/rank_group.py): this worker is rank 0 and decides; its other
ranks hold leases on the same block ids in their own pools, receive their heads straight from the
prefill ranks (``reserve`` is told the prefill worker's layout, checks it and plans the head parts
each rank expects: kv_transfer/heads.py), and run every step rank 0 publishes.

Lifecycle: construct -> start_loop (or ``step`` by hand; ``poll`` drives the receiver then) -> serve
-> close (idempotent).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from decode_pool.faults import FaultHooks
from decode_pool.g2_landing import HostLanding
from decode_pool.loop import StepLoop
from decode_pool.outbox import TokenOutbox
from engine.llm_engine import RequestOutput
from engine.parallel import RankGroupBroken
from engine.sequence import Sequence
from kv_transfer.heads import KVShardLayout
from kv_transfer.protocol import NoRoomError
from kv_transfer.transport import Completed, KVDestination
from memory_tiers.metrics import TierMetrics
from pool_runtime.build import EvictionLog, build_engine, build_transport
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import (
    FirstToken,
    InvalidWorkRequest,
    KVGrant,
    PoolError,
    Route,
    TokenChunk,
    WorkRequest,
)
from pool_runtime.rank_group import RankGroup, Reserve
from pool_runtime.reports import WorkerLoad
from pool_runtime.tp_handoff import rank_parts, worker_layout

_DRAIN_TIMEOUT_S = 1.0  # a stream's heartbeat when nothing happens
_CHANNEL_GRACE_S = 5.0  # how long a channel's requests outlive its last stream (a reconnect)


@dataclass(slots=True)
class _Reserved:
    req: WorkRequest
    seq: Sequence | None  # its G1 blocks; None: the KV lands in G2 (self.landing)
    route: Route
    committed: bool = False
    first: FirstToken | None = None  # start() came: join once committed


class DecodeWorker(FaultHooks, StepLoop):
    role = "decode"

    def __init__(self, config: WorkerConfig, ranks: RankGroup | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.ranks = ranks
        self.engine, self.tier_store = build_engine(config, ranks.tp if ranks is not None else None)
        par = self.engine.model.parallel  # what each rank holds, as the engine split the model
        self.kv_layout: KVShardLayout = worker_layout(
            self.engine.model_config, config.engine.block_size, par, config.engine.kv_cache_dtype
        )
        if ranks is not None:
            self.engine.runner.publish = ranks.step
        self.evictions = EvictionLog(self.engine)
        self.block_size = config.engine.block_size
        self.num_layers = self.engine.kv_layout.num_layers
        transport = build_transport(config)
        self.receiver = transport.receiver(self.engine.kv_cache)
        self.landing: HostLanding | None = None
        if self.tier_store is not None:
            n = config.host_landing_blocks or min(
                self.tier_store.config.host_blocks,
                self.engine.kv_layout.blocks_for(self.engine.max_seq_len),
            )
            self.landing = HostLanding(self.engine, self.tier_store, transport, n)
        self.outbox = TokenOutbox()
        self._cv = threading.Condition()  # the lock: bookkeeping, receiver, the tables below
        self._reserved: dict[str, _Reserved] = {}
        # committed in G2, started, waiting for G1 room; FIFO
        self._parked: OrderedDict[str, tuple[_Reserved, FirstToken]] = OrderedDict()
        self._routes: dict[str, Route] = {}  # request id -> where its chunks go, while it may emit
        self._in_step: set[str] = set()  # the running step's requests (their blocks are in use)
        self._deferred: set[str] = set()  # cancels of those, applied when the step ends
        self._kv_wake = threading.Event()  # a reservation is waiting for KV: poll
        self._crash_after_tokens: dict[str, int] = {}
        self._tokens: dict[str, int] = {}  # per request with a crash hook: tokens produced
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._closed = False

    # -- the handoff ----------------------------------------------------------------------------------
    def reserve(
        self, req: WorkRequest, source: KVShardLayout | None = None, route: Route = Route()
    ) -> KVGrant:
        """Hold blocks for ``req``'s prompt under a lease of ``config.lease_s`` and return where its
        KV goes, on every rank; its tokens will go to ``route``. ``source``: the prefill worker's
        KV layout (None: this model on one rank). Raises IncompatibleKV (the layouts cannot exchange
        KV), NoRoomError (backpressure: try elsewhere or later) or PoolError (bad input)."""
        rid = req.request_id
        parts = rank_parts(self.kv_layout, source, f"{rid}: decode worker {self.worker_id}")
        with self._cv:
            self._check_open()
            self._check_new(rid)
            try:
                self.engine.check_prompt(rid, req.prompt_token_ids)
                seq = None
                if self._fits_g1(len(req.prompt_token_ids)):
                    seq = self.engine.reserve_prompt(rid, req.prompt_token_ids, req.params)
            except ValueError as e:
                raise InvalidWorkRequest(f"{rid}: {e}") from e
            if seq is None:
                return self._reserve_g2(req, parts[0], route)
            skip = seq.num_cached_tokens // self.block_size
            blocks, lease = seq.block_table[skip:], self.config.lease_s
            rank_dests: list[KVDestination] = []
            try:
                if self.ranks is None:
                    dest = self.receiver.reserve(rid, blocks, self.num_layers, lease, parts[0])
                else:  # the same block ids on every rank, each rank expecting its own head parts
                    mine = lambda: self.receiver.reserve(rid, blocks, self.num_layers, lease, parts[0])
                    dest, rank_dests = self.ranks.reserve(
                        Reserve(rid, blocks, self.num_layers, lease, parts), mine
                    )
            except Exception:
                self.receiver.release(rid)
                self._release_ranks(rid)
                self.engine.release_prompt(seq)
                raise
            self._reserved[rid] = _Reserved(req, seq, route)
            self._routes[rid] = route
            self._kv_wake.set()
            return KVGrant(rid, self.worker_id, dest, skip, tuple(rank_dests), self.kv_layout)

    def _release_ranks(self, rid: str) -> None:
        if self.ranks is not None:
            with contextlib.suppress(RankGroupBroken, PoolError):
                self.ranks.release(rid)

    def _fits_g1(self, num_prompt_tokens: int) -> bool:
        """Whether a new prompt may take G1 now: always when nothing waits in G2 (the engine
        decides), else only beside the blocks the G2 requests will need (they came first)."""
        if self.landing is None:
            return True
        blocks_for = self.engine.kv_layout.blocks_for
        in_g2 = [r.req for r in self._reserved.values() if r.seq is None]
        in_g2 += [r.req for r, _ in self._parked.values()]
        if not in_g2:
            return True
        claimed = sum(blocks_for(len(w.prompt_token_ids)) for w in in_g2)
        return self.engine.block_manager.num_free_blocks - claimed >= blocks_for(num_prompt_tokens)

    def _reserve_g2(self, req: WorkRequest, parts: tuple[tuple[int, int], ...], route: Route) -> KVGrant:
        """G1 is short: land the prompt's KV in G2 (lock held; one rank: no G2 with more)."""
        rid = req.request_id
        dest = None
        if self.landing is not None:
            dest = self.landing.reserve(rid, req.prompt_token_ids, self.config.lease_s, parts)
        if dest is None:
            bm = self.engine.block_manager
            g2 = f" or {self.landing.room} G2 blocks" if self.landing is not None else ""
            raise NoRoomError(
                f"decode worker {self.worker_id}: {len(req.prompt_token_ids)} prompt tokens do not fit "
                f"in {bm.num_free_blocks} free G1 blocks{g2}"
            )
        self._reserved[rid] = _Reserved(req, None, route)
        self._routes[rid] = route
        self._kv_wake.set()
        return KVGrant(rid, self.worker_id, dest, 0, layout=self.kv_layout)

    def start(self, request_id: str, first: FirstToken) -> None:
        """The prefill worker sampled the request's first token (the router streams it): the
        request joins the running batch as soon as its KV is committed — now, if it is. A first
        token that ends the request frees the blocks once committed. A request whose KV is in G2
        joins once G1 has room."""
        with self._cv:
            r = self._reserved.get(request_id)
            if r is None or r.first is not None:
                why = "already started" if r is not None else "failed, expired or cancelled"
                raise PoolError(f"{request_id}: no reservation to start on {self.worker_id} ({why})")
            r.first = first
            if not r.committed:
                self._poll()  # the KV may have landed: then the request joins at once
            elif self._join(request_id, r):
                self._cv.notify_all()

    def submit_local(self, req: WorkRequest, route: Route = Route()) -> None:
        """Conditional disaggregation: prefill ``req`` here, in the running batch (chunked); its
        tokens, the first included, go to ``route``."""
        rid = req.request_id
        with self._cv:
            self._check_open()
            self._check_new(rid)
            try:
                self.engine.add_request(req.prompt_token_ids, req.params, rid)
            except ValueError as e:
                raise InvalidWorkRequest(f"{rid}: {e}") from e
            self._routes[rid] = route
            self._cv.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Release the request wherever it is (reserved, committed, running, waiting); False if
        unknown. Answered at once; a request in the running step is released when the step ends
        (its blocks are being written), and nothing more is streamed for it either way."""
        with self._cv:
            found = self._routes.pop(request_id, None) is not None
            found = self._release(request_id) or found
            if request_id in self._in_step:
                self._deferred.add(request_id)
                return True
            found = self.engine.abort(request_id) or found
            self._cv.notify_all()
            return found

    # -- the token channel ---------------------------------------------------------------------------
    def drain(self, channel: str = "", timeout_s: float = _DRAIN_TIMEOUT_S) -> list[TokenChunk]:
        """The chunks produced for ``channel`` since the last drain (up to ``timeout_s`` for one),
        for a caller without a stream (tests stepping the worker by hand)."""
        return self.outbox.drain(channel, timeout_s) or []

    def close_channel(self, channel: str, reader: int, grace_s: float = _CHANNEL_GRACE_S) -> None:
        """Stream ``reader`` of ``channel`` is gone. If it was the channel's reader and no stream
        reads the channel again within ``grace_s`` (a router reconnecting), its router closed or
        died: nobody will read its requests' tokens, so they are cancelled and their blocks freed."""
        if not self.outbox.release(channel, reader) or self._closed:
            return
        timer = threading.Timer(grace_s, self._orphaned, (channel,))
        timer.daemon = True
        timer.start()

    def _orphaned(self, channel: str) -> None:
        if self.outbox.is_read(channel):
            return
        with self._cv:
            for rid in [r for r, route in self._routes.items() if route.channel == channel]:
                self.cancel(rid)

    # -- reports -------------------------------------------------------------------------------------
    def take_evictions(self) -> list[bytes]:
        """Hashes of the prefix blocks evicted since the last call (for the router's block index)."""
        return self.evictions.take()

    def tier_metrics(self) -> TierMetrics | None:
        """The host/disk tiers' counters and occupancy (None without tiers)."""
        store = self.tier_store
        return store.metrics() if store is not None else None

    def load(self) -> WorkerLoad:
        with self._cv:
            bm, sch = self.engine.block_manager, self.engine.scheduler
            costs = self.engine.step_costs
            load = WorkerLoad(
                self.worker_id,
                self.role,
                waiting=sch.num_waiting + len(self._reserved) + len(self._parked),
                queue_tokens=sum(len(r.req.prompt_token_ids) for r in self._reserved.values()),
                running=sch.num_running,
                used_blocks=bm.num_used_blocks,
                free_blocks=bm.num_free_blocks,
                total_blocks=bm.num_blocks,
                reserved_blocks=self.receiver.num_reserved_blocks,
                cached_blocks=bm.num_cached_blocks,
                tensor_parallel_size=self.kv_layout.tp_size,
                decode_step_s=costs.decode_step_s() or 0.0,
                prefill_tokens_per_s=costs.prefill_tokens_per_s() or 0.0,
            )
            store = self.tier_store
            if self.landing is not None and store is not None:
                load.reserved_blocks += self.landing.receiver.num_reserved_blocks
                load.g2_used_blocks = store.num_host_in_use
                load.g2_free_blocks = self.landing.room
                load.g2_total_blocks = store.config.host_blocks
            return load

    def _poll(self) -> bool:
        results = self.receiver.poll()
        if self.landing is not None:
            results += self.landing.poll()
        for res in results:
            r = self._reserved.get(res.request_id)
            if r is None:
                continue
            if isinstance(res, Completed):
                if r.seq is None and self.landing is not None:
                    self.landing.commit(res.request_id)
                r.committed = True
                if r.first is not None:
                    self._join(res.request_id, r)
            else:  # the receiver already dropped its lease; free the blocks and end the request
                self._release(res.request_id)
                self._end(res.request_id, f"KV handoff failed: {res.reason}", "handoff")
        if results:
            self._cv.notify_all()
        return bool(results)

    def _join(self, rid: str, r: _Reserved) -> bool:
        """A committed and started request joins the running batch (G2: parks for G1 room).
        False when it could not (a tensor-parallel rank had not committed: it ends with an error)."""
        assert r.first is not None
        if self.ranks is not None and r.seq is not None:
            missing = [i + 1 for i, ok in enumerate(self.ranks.commit(rid)) if not ok]
            if missing:
                self._release(rid)
                self._end(rid, f"KV not committed on ranks {missing} of {self.worker_id}", "handoff")
                return False
        del self._reserved[rid]
        if r.seq is None and r.first.finish_reason is not None:  # nothing to decode: no G1 needed
            assert self.landing is not None
            self.landing.release(rid)  # its full blocks stay cached in G2
            self._routes.pop(rid, None)
            return True
        if r.seq is None:
            self._parked[rid] = (r, r.first)
            self._admit()
            return True
        self.receiver.release(rid)
        self._adopt(r, r.seq, r.first)
        return True

    def _adopt(self, r: _Reserved, seq: Sequence, first: FirstToken) -> None:
        out = self.engine.add_prefilled(seq, first.token_id, r.req.seed, first.logprob, first.top_logprobs)
        self._count_tokens(r.req.request_id, 1)
        if out.finished:  # the first token ended it: nothing more to send
            self._routes.pop(r.req.request_id, None)
        # the router streamed the first token already; it counts as served here (the actor's spans)
        reason = out.finish_reason.value if out.finish_reason is not None else None
        first_chunk = TokenChunk(
            out.request_id, out.new_token_ids, finished=out.finished, finish_reason=reason
        )
        self._emitted([first_chunk])

    def _admit(self) -> bool:
        """Requests parked in G2 join the running batch, oldest first, while G1 has room for them:
        G1 blocks from the engine, then G2 -> G1. True when one joined."""
        joined = False
        while self._parked and self.landing is not None:
            rid, (r, first) = next(iter(self._parked.items()))
            seq = self.engine.reserve_prompt(rid, r.req.prompt_token_ids, r.req.params)
            if seq is None:
                break
            del self._parked[rid]
            if not self.landing.onboard(rid, seq):
                self.engine.release_prompt(seq)
                self._end(rid, "KV handoff failed: a block could not be onboarded from G2", "handoff")
                continue
            self._adopt(r, seq, first)
            joined = True
        return joined

    def _fail_all(self, error: str) -> None:
        for rid in list(self._routes):
            self._release(rid)
            self.engine.abort(rid)
            self._end(rid, error)
        self._deferred.clear()
        self._cv.notify_all()

    def _release(self, request_id: str) -> bool:
        """Free what the request holds before it joins the batch (G1 reservation, G2 landing)."""
        r = self._reserved.pop(request_id, None)
        parked = self._parked.pop(request_id, None)
        if r is None and parked is None:
            return False
        if r is not None and r.seq is not None:
            self.receiver.release(request_id)
            self._release_ranks(request_id)
            self.engine.release_prompt(r.seq)
        elif self.landing is not None:
            self.landing.release(request_id)
        return True

    def _end(self, request_id: str, error: str, kind: str = "") -> None:
        route = self._routes.pop(request_id, None)
        if route is not None:
            chunk = self._ended(request_id, error, kind)
            chunk.attempt = route.attempt
            self.outbox.put(route.channel, [chunk])
            self._emitted([chunk])

    def _publish(self, outs: list[RequestOutput]) -> None:
        """One step's chunks into their channels' outboxes (one put per channel)."""
        now = time.monotonic()
        by_channel: dict[str, list[TokenChunk]] = {}
        for o in outs:
            route = self._routes.get(o.request_id)
            if route is None:
                continue  # cancelled while the step ran
            if self._crash_after_tokens:
                self._count_tokens(o.request_id, len(o.new_token_ids))
            by_channel.setdefault(route.channel, []).append(
                TokenChunk(
                    o.request_id,
                    o.new_token_ids,
                    "",
                    o.finished,
                    o.finish_reason.value if o.finish_reason is not None else None,
                    o.logprobs,
                    o.top_logprobs,
                    worker_id=self.worker_id,
                    num_prompt_tokens=o.num_prompt_tokens,
                    num_cached_tokens=o.num_cached_tokens,
                    produced_at=now,
                    attempt=route.attempt,
                )
            )
            if o.finished:
                del self._routes[o.request_id]
        for channel, chunks in by_channel.items():
            self.outbox.put(channel, chunks)
            self._emitted(chunks)

    def _emitted(self, chunks: list[TokenChunk]) -> None:
        """Called with the chunks put out for requests (a step's, an error), and with the last
        chunk of a request that ended quietly (its first token ended it): the actor's spans."""

    def _ended(self, request_id: str, error: str, kind: str = "") -> TokenChunk:
        return TokenChunk(
            request_id,
            [],
            finished=True,
            finish_reason="abort",
            error=error,
            worker_id=self.worker_id,
            error_kind=kind,
            produced_at=time.monotonic(),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError(f"decode worker {self.worker_id} is closed")

    def _check_new(self, rid: str) -> None:
        if rid in self._routes or rid in self._reserved or rid in self._parked:
            raise PoolError(f"request {rid!r} is already on decode worker {self.worker_id}")

    def close(self) -> None:
        if self._closed:
            return
        self._stop = True
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._kv_wake.set()
        for t in self._threads:
            t.join(10)
        with self._cv:
            for rid in [*self._reserved, *self._parked]:
                self._release(rid)
            for rid in self._deferred:
                self.engine.abort(rid)
            self._routes.clear()
            if self.landing is not None:
                self.landing.close()
            self.engine.close()
            self.receiver.close()
        self.outbox.close()
        if self.ranks is not None:
            self.ranks.close()
