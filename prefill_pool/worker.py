"""PrefillWorker: computes prompts in chunks and streams each layer's KV to a decode worker's blocks.

A request enters the engine through its own ``add_request`` (so a prefix cached in G2 / G3 is
onboarded into G1 first, engine/tier_onboarding.py) with ``max_tokens=1``: the engine stops it at
the first token. One ``step`` is one ``engine.step`` (chunked prefill, prefix caching and batching
of several prompts come from it), given a hook that sees the batch and then every layer::

    schedule()  -> chunks of several prompts, e.g. [r1: tokens 0..15 | r2: tokens 32..40]
    on_layer    -> (the batch) plan the blocks each chunk sends this step
    forward     -> after layer l's K/V are written: send_layer(dest, l, blocks filled so far)
    update()    -> full blocks enter the prefix cache
    last chunk  -> the engine samples the first token and finishes the request (its full blocks
                   stay in the prefix cache); the token goes to the caller at once (``on_first``:
                   the router streams it to the client while the handoff completes), then this
                   worker waits for the decode worker's commit ack and resolves the future

A block is sent once per layer: in the step that fills it, or in the prompt's last step for a
trailing partial block. Blocks the decode worker already holds (``KVGrant.num_cached_blocks``) are
not sent. Nothing reuses a finished request's blocks before its ack (ARCHITECTURE.md, step 4): the
only thread that allocates blocks (new requests, onboarding, the next schedule) is the one waiting
for the ack, and it waits before its next step.

Tensor parallel (``ranks``, pool_runtime/rank_group.py): this worker is rank 0. Each step's inputs
and the blocks it sends go to the other ranks before the forward; every rank sends the KV heads it
holds to the decode ranks that own them (pool_runtime/tp_handoff.py), and a request's first token
is returned only once every rank's writes are committed.

Thread model: ``submit`` and ``cancel`` are thread-safe (they queue a command); everything else —
engine, sender — is touched only by the thread calling ``step`` (the loop thread from
``start_loop``, or a test stepping by hand). Lifecycle: construct -> start_loop (or step by hand)
-> submit / prefill / cancel -> close (idempotent; fails what is left, so no block stays in use).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

from engine.model_runner import StepInputs
from engine.parallel import RankGroupBroken
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from kv_transfer.base import BaseSender
from kv_transfer.heads import KVShardLayout
from kv_transfer.protocol import KVTransferError
from pool_runtime.build import EvictionLog, build_engine, build_transport
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import FirstToken, KVGrant, PoolError, WorkRequest
from pool_runtime.rank_group import RankGroup, SendPlan
from pool_runtime.reports import WorkerLoad
from pool_runtime.tp_handoff import ShardSender, worker_layout

_TOMBSTONES = 4096  # cancelled request ids remembered, to refuse a prefill that arrives after its cancel


class Cancelled(PoolError):
    """The request was cancelled by its caller."""


@dataclass(slots=True)
class _Job:
    req: WorkRequest
    grant: KVGrant
    seq: Sequence  # the engine's (engine.sequence(request_id)): blocks, cached and computed tokens
    future: Future[FirstToken]
    on_first: Callable[[FirstToken], None] | None
    sent_upto: int = 0  # blocks [0, sent_upto) of the prompt have been sent (all layers)
    error: str = ""
    kv_bytes: int = 0
    kv_start_ns: int = 0  # time.time_ns() of the first send_layer
    kv_layers: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Plan:
    job: _Job
    lo: int  # first prompt block to send this step
    hi: int  # one past the last


@dataclass(slots=True)
class _Faults:
    """Test hooks: die (SIGKILL, as a crash would) after sending a layer of a named request; or
    hold the loop at a layer of a named request (the chaos tests' stage marker:
    :meth:`PrefillWorker.pause_at_layer`)."""

    crash_after_layer: dict[str, int] = field(default_factory=dict)
    # request id -> (layer, before the send?, marker file, longest hold in seconds)
    pause_at_layer: dict[str, tuple[int, bool, str, float]] = field(default_factory=dict)
    # request ids whose cancel is in the loop's inbox (a held request's cancel ends its hold)
    cancel_queued: set[str] = field(default_factory=set)
    holding: str = ""  # the request held now

    def hold(self, request_id: str, layer: int, before: bool) -> None:
        """Hold here if a pause is set for this point: create the marker file, then wait until the
        test deletes it, or the request's cancel is queued (so a test can cancel at exactly this
        stage: the loop handles the cancel at its next step), or the hold times out (so a forgotten
        pause cannot wedge a worker)."""
        key = request_id if request_id in self.pause_at_layer else "*"  # "*": the next request
        pause = self.pause_at_layer.get(key)
        if pause is None or pause[:2] != (layer, before):
            return
        del self.pause_at_layer[key]
        _, _, marker, longest = pause
        with open(marker, "w"):
            pass
        deadline = time.monotonic() + longest
        self.holding = request_id
        try:
            while os.path.exists(marker) and request_id not in self.cancel_queued:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        finally:
            self.holding = ""


class PrefillWorker:
    role = "prefill"

    def __init__(self, config: WorkerConfig, ranks: RankGroup | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.ranks = ranks
        self.engine, self.tier_store = build_engine(config, ranks.tp if ranks is not None else None)
        self.evictions = EvictionLog(self.engine)
        self.block_size = config.engine.block_size
        self.num_layers = self.engine.kv_layout.num_layers
        # what each rank holds, as the engine split the model (heads, or MLA's latent on every rank)
        self.kv_layout: KVShardLayout = worker_layout(
            self.engine.model_config,
            self.block_size,
            self.engine.model.parallel,
            config.engine.kv_cache_dtype,
        )
        # every backend's sender is a BaseSender, which also has flush() (not in the KVSender protocol)
        self.sender = cast(BaseSender, build_transport(config).sender(self.engine.kv_cache))
        self.shard = ShardSender(self.sender, self.kv_layout, rank=0)  # the heads rank 0 sends
        self._step_plans: list[_Plan] = []
        if ranks is not None:
            self.engine.runner.publish = self._publish
        self._jobs: dict[str, _Job] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # recent cancels, oldest first
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False
        self.faults = _Faults()

    # -- thread-safe API ----------------------------------------------------------------------------
    def submit(
        self, req: WorkRequest, grant: KVGrant, on_first: Callable[[FirstToken], None] | None = None
    ) -> Future[FirstToken]:
        """Queue ``req``; the future resolves once the decode worker committed its KV.
        ``on_first`` is called (on the loop thread, before the ack) with the sampled first token
        (``committed=False``)."""
        fut: Future[FirstToken] = Future()
        if self._closed:
            fut.set_exception(PoolError(f"prefill worker {self.worker_id} is closed"))
            return fut
        self._inbox.put(("add", (req, grant, fut, on_first)))
        self._wake.set()
        return fut

    def prefill(self, req: WorkRequest, grant: KVGrant) -> FirstToken:
        """Blocking: prefill ``req`` into ``grant`` and return the first token once the decode
        worker has committed the KV. Needs the loop thread (``start_loop``)."""
        return self.submit(req, grant).result()

    def cancel(self, request_id: str) -> threading.Event:
        """Stop the request wherever it is (queued, computing, sending). The returned event is set
        once the loop has handled it: nothing more is written to the decode worker after that, and
        the request's blocks are freed."""
        done = threading.Event()
        self._inbox.put(("cancel", (request_id, done)))
        if self.faults.pause_at_layer or self.faults.holding:  # the pause seam is in use (tests)
            self.faults.cancel_queued.add(request_id)
        self._wake.set()
        return done

    def take_evictions(self) -> list[bytes]:
        """Hashes of the prefix blocks evicted since the last call (for the router's block index)."""
        return self.evictions.take()

    def load(self) -> WorkerLoad:
        bm, sch, onboarder = self.engine.block_manager, self.engine.scheduler, self.engine.onboarder
        queued = sum(j.seq.num_tokens - j.seq.num_computed_tokens for j in list(self._jobs.values()))
        return WorkerLoad(
            self.worker_id,
            self.role,
            waiting=sch.num_waiting + (onboarder.num_pending if onboarder is not None else 0),
            queue_tokens=queued,
            running=sch.num_running,
            used_blocks=bm.num_used_blocks,
            free_blocks=bm.num_free_blocks,
            total_blocks=bm.num_blocks,
            cached_blocks=bm.num_cached_blocks,
            tensor_parallel_size=self.kv_layout.tp_size,
            decode_step_s=self.engine.step_costs.decode_step_s() or 0.0,
            prefill_tokens_per_s=self.engine.step_costs.prefill_tokens_per_s() or 0.0,
        )

    def crash_after_layer(self, request_id: str, layer: int, rank: int = 0) -> None:
        """Test hook: SIGKILL this process (or tensor-parallel rank ``rank``'s) right after ``layer``
        of ``request_id`` is sent."""
        if rank == 0:
            self.faults.crash_after_layer[request_id] = layer
        else:
            assert self.ranks is not None, "a one-rank worker has no rank > 0"
            self.ranks.crash_after_layer(rank, request_id, layer)

    def pause_at_layer(
        self, request_id: str, layer: int, marker: str, before: bool = False, longest_s: float = 60.0
    ) -> None:
        """Test hook: when the loop reaches ``layer`` of ``request_id`` (before its KV is sent, or
        right after), create the file ``marker`` and hold the loop until the file is deleted (at
        most ``longest_s``). A test then knows the request's stage for sure and acts on it there
        (cancel, SIGKILL) — a condition to wait on, not a sleep. ``request_id`` "*" pauses whichever
        request reaches that point first. Off unless set; one-shot."""
        self.faults.pause_at_layer[request_id] = (layer, before, marker, longest_s)

    def clear_pauses(self) -> None:
        """Test hook: forget every pause not reached yet."""
        self.faults.pause_at_layer.clear()
        self.faults.cancel_queued.clear()

    # -- the loop -------------------------------------------------------------------------------------
    def start_loop(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"prefill-{self.worker_id}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                busy = self.step()
            except Exception as e:  # a bug or a device error: fail what is in flight, keep serving
                if isinstance(e, RankGroupBroken) and self.ranks is not None:
                    self.ranks.fail(e)  # a rank is gone: the worker cannot step again (the actor ends)
                for job in list(self._jobs.values()):
                    if self.ranks is not None and self.ranks.broken is None:
                        with contextlib.suppress(Exception):  # the other ranks drop it too
                            self.ranks.abandon(job.req.request_id, 0.0)
                    self._drop(job)
                    if not job.future.done():
                        job.future.set_exception(PoolError(f"prefill worker {self.worker_id} failed: {e!r}"))
                continue
            if not busy:
                self._wake.wait(0.01)
                self._wake.clear()

    def step(self) -> bool:
        """Handle queued commands and run one engine step; False when there was nothing to do."""
        self._drain_inbox()
        plans: list[_Plan] | None = None  # None: nothing was scheduled

        def on_batch(out: SchedulerOutput) -> Callable[[int], None] | None:
            nonlocal plans
            plans = todo = self._step_plans = self._plan(out)
            if not todo:
                return None
            return lambda layer: self._send_layer(todo, layer)

        outs = self.engine.step(on_layer=on_batch)
        for p in plans or ():
            p.job.sent_upto = max(p.job.sent_upto, p.hi)
        for o in outs:  # each one a first token: the engine finished the request (max_tokens=1)
            job = self._jobs.get(o.request_id)
            if job is not None:
                self._complete(job, o.new_token_ids[0], o.logprobs[0], o.top_logprobs[0])
        onboarding = self.engine.onboarder is not None and self.engine.onboarder.num_pending > 0
        return plans is not None or bool(outs) or onboarding

    def _plan(self, out: SchedulerOutput) -> list[_Plan]:
        """Which prompt blocks each scheduled request sends this step: the ones this chunk fills
        (and, on the last chunk, the partial tail block)."""
        bs = self.block_size
        plans: list[_Plan] = []
        for entry in out.scheduled:
            job = self._jobs[entry.seq.request_id]
            end = entry.start + entry.num_new_tokens
            hi = -(-end // bs) if end == entry.seq_len else end // bs
            lo = max(job.sent_upto, job.grant.num_cached_blocks)
            if hi > lo and not job.error:
                plans.append(_Plan(job, lo, hi))
        return plans

    def _publish(self, inputs: StepInputs) -> None:
        """Rank 0 of a tensor-parallel worker: this step, and what every rank sends after each layer."""
        assert self.ranks is not None
        sends = [
            SendPlan(
                p.job.req.request_id, p.job.seq.block_table[p.lo : p.hi], p.lo - p.job.grant.num_cached_blocks
            )
            for p in self._step_plans
            if not p.job.error
        ]
        self.ranks.step(inputs, sends, {s.request_id: self._jobs[s.request_id].grant for s in sends})

    def _send_layer(self, plans: list[_Plan], layer: int) -> None:
        for p in plans:
            job = p.job
            if job.error:
                continue
            if not job.kv_start_ns:
                job.kv_start_ns = time.time_ns()
            job.kv_layers.add(layer)
            self.faults.hold(job.req.request_id, layer, before=True)
            try:
                job.kv_bytes += self.shard.send_layer(
                    job.grant, layer, job.seq.block_table[p.lo : p.hi], p.lo - job.grant.num_cached_blocks
                )
            except (KVTransferError, ValueError) as e:
                job.error = str(e)
            if self.faults.crash_after_layer.get(job.req.request_id) == layer:
                os.kill(os.getpid(), signal.SIGKILL)
            self.faults.hold(job.req.request_id, layer, before=False)

    def _complete(self, job: _Job, token: int, logprob: float | None, top: Any) -> None:
        """The engine sampled ``job``'s first token (and finished the request): hand the token to
        the caller, wait for the decode worker's commit ack, then resolve the caller's future."""
        rid = job.req.request_id
        error = job.error
        reason = self._finish_reason(job, token)
        if job.on_first is not None and not error:
            first = FirstToken(rid, token, self.worker_id, logprob, top, job.seq.num_cached_tokens)
            first.finish_reason, first.committed = reason, False
            job.on_first(first)

        def finish_mine() -> None:
            nonlocal error
            if error:
                self.shard.abandon(job.grant, 0.0)
                return
            try:
                self.shard.finish(job.grant, self.config.ack_timeout_s)
            except KVTransferError as e:
                error = str(e)

        if self.ranks is None:
            finish_mine()
        else:  # every rank waits for the commits of the decode ranks it wrote to, at once
            rank_error, nbytes = self.ranks.finish([rid], self.config.ack_timeout_s, finish_mine)[rid]
            error, job.kv_bytes = error or rank_error, job.kv_bytes + nbytes
        self._jobs.pop(rid, None)
        if error:
            job.future.set_exception(
                KVTransferError(f"{rid}: handoff to {job.grant.worker_id} failed: {error}")
            )
        else:
            t = (time.time_ns() - job.kv_start_ns) / 1e9 if job.kv_start_ns else 0.0
            job.future.set_result(
                FirstToken(
                    rid,
                    token,
                    self.worker_id,
                    logprob,
                    top,
                    job.seq.num_cached_tokens,
                    job.kv_bytes,
                    kv_transfer_start_ns=job.kv_start_ns,
                    kv_transfer_s=t,
                    kv_layers=len(job.kv_layers),
                    finish_reason=reason,
                )
            )

    def _finish_reason(self, job: _Job, token: int) -> str | None:
        """Whether the first token ends the request under its own parameters (the engine ran it
        with max_tokens=1, so its own finish says nothing): EOS, a stop id, max_tokens, length."""
        seq = Sequence(job.req.request_id, job.req.prompt_token_ids, job.req.params)
        seq.output_token_ids.append(token)
        reason = self.engine.stop_reason(seq, token)
        return reason.value if reason is not None else None

    def _drop(self, job: _Job) -> None:
        """Abort the request in the engine (its full prompt blocks stay as cached prefix; an
        onboarding one returns its blocks once their copies end) and forget it."""
        self.engine.abort(job.req.request_id)
        self._jobs.pop(job.req.request_id, None)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(*arg)
            elif kind == "cancel":
                self._cancel(arg[0])
                arg[1].set()

    def _add(
        self,
        req: WorkRequest,
        grant: KVGrant,
        fut: Future[FirstToken],
        on_first: Callable[[FirstToken], None] | None,
    ) -> None:
        rid = req.request_id
        if rid in self._cancelled:
            # The cancel overtook the request (two concurrent calls): the decode side has already
            # freed the destination blocks, so nothing may be written to them.
            fut.set_exception(Cancelled(f"{rid}: cancelled before it started"))
            return
        if rid in self._jobs:
            fut.set_exception(PoolError(f"request {rid!r} is already being prefilled here"))
            return
        first_only = dataclasses.replace(req.params, max_tokens=1)  # the decode worker does the rest
        try:
            self.engine.add_request(list(req.prompt_token_ids), first_only, rid)
        except ValueError as e:
            fut.set_exception(PoolError(f"{rid}: {e}"))
            return
        seq = self.engine.sequence(rid)
        assert seq is not None
        self._jobs[rid] = _Job(req, grant, seq, fut, on_first)

    def _cancel(self, request_id: str) -> None:
        self._cancelled[request_id] = None
        while len(self._cancelled) > _TOMBSTONES:
            self._cancelled.popitem(last=False)
        job = self._jobs.get(request_id)
        if job is None:
            return
        # Let posted writes land before the decode worker reuses the blocks, then drop the
        # request's sender state (finish with no time left abandons it), on every rank.
        timeout = self.config.ack_timeout_s
        if self.ranks is None:
            self.shard.abandon(job.grant, timeout)
        else:
            with contextlib.suppress(RankGroupBroken):
                self.ranks.abandon(request_id, timeout, lambda: self.shard.abandon(job.grant, timeout))
        self._drop(job)
        job.future.set_exception(Cancelled(f"{request_id}: cancelled"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        self._drain_inbox()
        for rid in list(self._jobs):
            self._cancel(rid)
        self.sender.close()
        self.engine.close()
        if self.ranks is not None:
            self.ranks.close()
