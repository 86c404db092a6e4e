"""DecodeWorker: reserves KV for incoming handoffs, adopts committed requests into its running batch
and streams their tokens (continuous batching); it can also prefill a request itself.

A request here is in one of four places::

    reserve()  ──▶ _reserved (blocks held under a KV lease; the receiver checks every layer's digest)
                     │ in G1 when it has room, else in G2 (g2_landing.py: host memory the sender
                     │ WRITEs into; committed blocks are cached G2 blocks under their hashes)
                     │ Completed (all layers verified): committed, waiting for start()
                     │ Failed (digest, lease expiry, dead sender) / cancel: blocks freed at once
    start()    ──▶ the engine's running batch (joins at the next step, leaves the step it finishes)
                ╰─▶ G2 ones: _parked until G1 has room (FIFO), then onboarded G2 → G1 and joined
    submit_local() ─▶ the engine's waiting queue (conditional disaggregation: prefilled here)

Requests waiting in G2 have the first claim on G1: a new reservation goes to G1 only if it fits
beside the G1 blocks they will need, so a stream of small requests cannot starve them.

Tokens go to a per-request stream that callers long-poll with ``take`` (a Ray call per batch of
tokens: the "equal" of a streaming generator, and cancel-safe). Every exit — finish, cancel, failed
handoff, close — frees the request's blocks, so ``load().used_blocks`` and
``load().g2_used_blocks`` return to 0.

Tensor parallel (``ranks``, pool_runtime/rank_group.py): this worker is rank 0 and decides; its other
ranks hold leases on the same block ids in their own pools, receive their heads straight from the
prefill ranks (``reserve`` is told the prefill worker's layout, checks it and plans the head parts
each rank expects: kv_transfer/heads.py), and run every step rank 0 publishes.

Thread model: every public method is thread-safe (one lock around engine and receiver); the loop
thread (``start_loop``) polls the receiver and steps the engine; tests may call ``step`` by hand
instead. Lifecycle: construct -> start_loop (or step by hand) -> serve -> close (idempotent).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import cast

from decode_pool.g2_landing import HostLanding
from engine.llm_engine import RequestOutput
from engine.parallel import RankGroupBroken
from engine.sequence import Sequence
from kv_transfer.base import BaseReceiver, idle
from kv_transfer.heads import KVShardLayout
from kv_transfer.protocol import NoRoomError
from kv_transfer.transport import Completed, KVDestination
from memory_tiers.metrics import TierMetrics
from pool_runtime.build import EvictionLog, build_engine, build_transport
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import (
    UNKNOWN_REQUEST,
    FirstToken,
    InvalidWorkRequest,
    KVGrant,
    PoolError,
    TokenChunk,
    WorkRequest,
)
from pool_runtime.rank_group import RankGroup, Reserve
from pool_runtime.reports import WorkerLoad
from pool_runtime.tp_handoff import rank_parts, worker_layout


@dataclass(slots=True)
class _Reserved:
    req: WorkRequest
    seq: Sequence | None  # its G1 blocks; None: the KV lands in G2 (self.landing)
    committed: bool = False


@dataclass(slots=True)
class _Stream:
    chunks: list[TokenChunk] = field(default_factory=list)
    num_tokens: int = 0


class DecodeWorker:
    role = "decode"

    def __init__(self, config: WorkerConfig, ranks: RankGroup | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.ranks = ranks
        self.engine, self.tier_store = build_engine(config, ranks.tp if ranks is not None else None)
        par = self.engine.model.parallel  # what each rank holds, as the engine split the model
        self.kv_layout: KVShardLayout = worker_layout(self.engine.model_config, config.engine.block_size, par)
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
        self._cv = threading.Condition()
        self._reserved: dict[str, _Reserved] = {}
        # committed in G2, started, waiting for G1 room; FIFO
        self._parked: OrderedDict[str, tuple[WorkRequest, FirstToken]] = OrderedDict()
        self._streams: dict[str, _Stream] = {}
        self._crash_after_tokens: dict[str, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False

    # -- the handoff ----------------------------------------------------------------------------------
    def reserve(self, req: WorkRequest, source: KVShardLayout | None = None) -> KVGrant:
        """Hold blocks for ``req``'s prompt under a lease of ``config.lease_s`` and return where its
        KV goes, on every rank. ``source``: the prefill worker's KV layout (None: this model on one
        rank). Raises IncompatibleKV (the layouts cannot exchange KV), NoRoomError (backpressure:
        try elsewhere or later) or PoolError (bad input)."""
        rid = req.request_id
        parts = rank_parts(self.kv_layout, source, f"{rid}: decode worker {self.worker_id}")
        with self._cv:
            self._check_open()
            if rid in self._streams:
                raise PoolError(f"request {rid!r} is already on decode worker {self.worker_id}")
            try:
                self.engine.check_prompt(rid, req.prompt_token_ids)
                seq = None
                if self._fits_g1(len(req.prompt_token_ids)):
                    seq = self.engine.reserve_prompt(rid, req.prompt_token_ids, req.params)
            except ValueError as e:
                raise InvalidWorkRequest(f"{rid}: {e}") from e
            if seq is None:
                return self._reserve_g2(req, parts[0])
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
            self._reserved[rid] = _Reserved(req, seq)
            self._streams[rid] = _Stream()
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
        in_g2 += [w for w, _ in self._parked.values()]
        if not in_g2:
            return True
        claimed = sum(blocks_for(len(w.prompt_token_ids)) for w in in_g2)
        return self.engine.block_manager.num_free_blocks - claimed >= blocks_for(num_prompt_tokens)

    def _reserve_g2(self, req: WorkRequest, parts: tuple[tuple[int, int], ...]) -> KVGrant:
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
        self._reserved[rid] = _Reserved(req, None)
        self._streams[rid] = _Stream()
        return KVGrant(rid, self.worker_id, dest, 0, layout=self.kv_layout)

    def start(self, request_id: str, first: FirstToken) -> None:
        """The prefill worker reported the commit: the request joins the running batch with its
        first token (streamed like any other). A request whose KV is in G2 joins once G1 has
        room (at once if it has)."""
        with self._cv:
            r = self._reserved.get(request_id)
            if r is None:
                raise PoolError(
                    f"{request_id}: no reservation on {self.worker_id} (failed, expired or cancelled)"
                )
            if not r.committed:
                self._poll()  # the ack was sent from a poll; its Completed may still be queued
            if not r.committed:
                raise PoolError(f"{request_id}: KV not committed on {self.worker_id}")
            if self.ranks is not None and r.seq is not None:
                missing = [i + 1 for i, ok in enumerate(self.ranks.commit(request_id)) if not ok]
                if missing:
                    self._release(request_id)
                    raise PoolError(f"{request_id}: KV not committed on ranks {missing} of {self.worker_id}")
            del self._reserved[request_id]
            if r.seq is None:
                self._parked[request_id] = (r.req, first)
                self._admit()
                self._cv.notify_all()
                return
            self.receiver.release(request_id)
            out = self.engine.add_prefilled(
                r.seq, first.token_id, r.req.seed, first.logprob, first.top_logprobs
            )
            self._push(out)
            self._cv.notify_all()

    def submit_local(self, req: WorkRequest) -> None:
        """Conditional disaggregation: prefill ``req`` here, in the running batch (chunked)."""
        rid = req.request_id
        with self._cv:
            self._check_open()
            if rid in self._streams:
                raise PoolError(f"request {rid!r} is already on decode worker {self.worker_id}")
            try:
                self.engine.add_request(req.prompt_token_ids, req.params, rid)
            except ValueError as e:
                raise InvalidWorkRequest(f"{rid}: {e}") from e
            self._streams[rid] = _Stream()
            self._cv.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Release the request wherever it is (reserved, committed, running, waiting); False if unknown."""
        with self._cv:
            found = self._release(request_id)
            found = self.engine.abort(request_id) or found
            found = self._streams.pop(request_id, None) is not None or found
            self._cv.notify_all()
            return found

    def take(self, request_id: str, timeout_s: float = 0.0) -> list[TokenChunk]:
        """The chunks produced for the request since the last call, waiting up to ``timeout_s`` for
        at least one. An unknown (cancelled, finished and taken) request gets one final error chunk."""
        with self._cv:
            self._cv.wait_for(lambda: self._ready(request_id), timeout_s)
            st = self._streams.get(request_id)
            if st is None:
                return [self._ended(request_id, f"{UNKNOWN_REQUEST} (cancelled, or finished and taken)")]
            out, st.chunks = st.chunks, []
            if out and out[-1].finished:
                del self._streams[request_id]
            return out

    def crash_after_tokens(self, request_id: str, num_tokens: int) -> None:
        """Test hook: SIGKILL this process when ``request_id`` has produced ``num_tokens`` tokens."""
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
            )
            store = self.tier_store
            if self.landing is not None and store is not None:
                load.reserved_blocks += self.landing.receiver.num_reserved_blocks
                load.g2_used_blocks = store.num_host_in_use
                load.g2_free_blocks = self.landing.room
                load.g2_total_blocks = store.config.host_blocks
            return load

    # -- the loop ------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Poll the receiver and run one engine step; False when there was nothing to do."""
        with self._cv:
            return self._step()

    def start_loop(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"decode-{self.worker_id}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        spins = 0
        while not self._stop:
            with self._cv:
                try:
                    busy = self._step()
                except Exception as e:  # a bug or a device error: end what is in flight, keep serving
                    if isinstance(e, RankGroupBroken) and self.ranks is not None:
                        self.ranks.fail(e)  # a rank is gone: no step can run again (the actor ends)
                    self._fail_all(f"decode worker {self.worker_id} failed: {e!r}")
                    continue
                waiting_kv = bool(self._reserved)
                if not busy and not waiting_kv:
                    self._cv.wait(0.005)  # idle: woken by submit_local / start
            if busy:
                spins = 0
                time.sleep(0)  # let callers waiting on the lock in
            elif waiting_kv:
                spins += 1
                idle(spins)  # poll the transport often while KV is arriving

    def _step(self) -> bool:
        if self._closed:
            return False
        did = self._poll()
        did = self._admit() or did
        outs = self.engine.step() if self.engine.has_unfinished() else []
        for o in outs:
            self._push(o)
        if outs or did:
            self._cv.notify_all()
        return bool(outs) or did

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
            else:  # the receiver already dropped its lease; free the blocks and end the request
                self._release(res.request_id)
                self._end(res.request_id, f"KV handoff failed: {res.reason}")
        return bool(results)

    def _admit(self) -> bool:
        """Requests parked in G2 join the running batch, oldest first, while G1 has room for them:
        G1 blocks from the engine, then G2 -> G1. True when one joined."""
        joined = False
        while self._parked and self.landing is not None:
            rid, (req, first) = next(iter(self._parked.items()))
            seq = self.engine.reserve_prompt(rid, req.prompt_token_ids, req.params)
            if seq is None:
                break
            del self._parked[rid]
            if not self.landing.onboard(rid, seq):
                self.engine.release_prompt(seq)
                self._end(rid, "KV handoff failed: a block could not be onboarded from G2")
                continue
            out = self.engine.add_prefilled(seq, first.token_id, req.seed, first.logprob, first.top_logprobs)
            self._push(out)
            joined = True
        return joined

    def _fail_all(self, error: str) -> None:
        for rid in list(self._streams):
            self._release(rid)
            self.engine.abort(rid)
            self._streams[rid].chunks.append(self._ended(rid, error))
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

    def _end(self, request_id: str, error: str) -> None:
        st = self._streams.get(request_id)
        if st is not None:
            st.chunks.append(self._ended(request_id, error))

    def _push(self, o: RequestOutput) -> None:
        st = self._streams.get(o.request_id)
        if st is None:
            return
        limit = self._crash_after_tokens.get(o.request_id)
        if limit is not None and st.num_tokens + len(o.new_token_ids) >= limit:
            os.kill(os.getpid(), signal.SIGKILL)
        st.num_tokens += len(o.new_token_ids)
        st.chunks.append(
            TokenChunk(
                o.request_id,
                list(o.new_token_ids),
                o.text,
                o.finished,
                o.finish_reason.value if o.finish_reason is not None else None,
                list(o.logprobs),
                list(o.top_logprobs),
                worker_id=self.worker_id,
                num_prompt_tokens=o.num_prompt_tokens,
                num_cached_tokens=o.num_cached_tokens,
                produced_at=time.monotonic(),
            )
        )

    def _ready(self, request_id: str) -> bool:
        st = self._streams.get(request_id)
        return st is None or bool(st.chunks) or self._closed

    def _ended(self, request_id: str, error: str) -> TokenChunk:
        return TokenChunk(
            request_id, [], finished=True, finish_reason="abort", error=error, worker_id=self.worker_id
        )

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError(f"decode worker {self.worker_id} is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._stop = True
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        with self._cv:
            for rid in [*self._reserved, *self._parked]:
                self._release(rid)
            self._streams.clear()
            if self.landing is not None:
                self.landing.close()
            self.engine.close()
            self.receiver.close()
        if self.ranks is not None:
            self.ranks.close()
