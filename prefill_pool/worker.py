"""PrefillWorker: computes prompts in chunks and streams each layer's KV to a decode worker's blocks.

One ``step`` is one forward pass of the engine's scheduler (chunked prefill, prefix caching and
batching of several prompts come from it), with a hook after every layer::

    schedule()  -> chunks of several prompts, e.g. [r1: tokens 0..15 | r2: tokens 32..40]
    forward     -> after layer l's K/V are written: send_layer(dest, l, blocks filled so far)
    update()    -> full blocks enter the prefix cache
    last chunk  -> sample the first token, wait for the decode worker's commit ack, then free
                   the blocks (they stay in the prefix cache for the next prompt that shares them)

A block is sent once per layer: in the step that fills it, or in the prompt's last step for a
trailing partial block. Blocks the decode worker already holds (``KVGrant.num_cached_blocks``) are
not sent. The KV of the prompt's blocks is released only after the ack (ARCHITECTURE.md, step 4).

Thread model: ``submit`` and ``cancel`` are thread-safe (they queue a command); everything else —
engine, sender — is touched only by the thread calling ``step`` (the loop thread from
``start_loop``, or a test stepping by hand). Lifecycle: construct -> start_loop (or step by hand)
-> submit / prefill / cancel -> close (idempotent; fails what is left, so no block stays in use).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from decode_pool.handoff import FirstToken, KVGrant, PoolError, WorkerConfig, WorkerLoad, WorkRequest
from decode_pool.runtime import EvictionLog, make_engine, make_kv_transport
from engine.attention import AttentionMetadata
from engine.model import Model
from engine.scheduler import SchedulerOutput
from engine.sequence import FinishReason, Sequence
from kv_transfer.base import BaseSender
from kv_transfer.protocol import KVTransferError

_TOMBSTONES = 4096  # cancelled request ids remembered, to refuse a prefill that arrives after its cancel


class Cancelled(PoolError):
    """The request was cancelled by its caller."""


@dataclass(slots=True)
class _Job:
    req: WorkRequest
    grant: KVGrant
    seq: Sequence
    future: Future[FirstToken]
    sent_upto: int = 0  # blocks [0, sent_upto) of the prompt have been sent (all layers)
    error: str = ""
    kv_bytes: int = 0
    kv_start_ns: int = 0  # time.time_ns() of the first send_layer
    kv_layers: set[int] = field(default_factory=set)


class _LayerHook:
    """The engine's model, with ``on_layer`` passed to every forward (ModelRunner calls forward)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.on_layer: Any = None

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model.forward(ids, pos, kv, meta, on_layer=self.on_layer)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


@dataclass(slots=True)
class _Plan:
    job: _Job
    lo: int  # first prompt block to send this step
    hi: int  # one past the last


@dataclass(slots=True)
class _Faults:
    """Test hooks: die (SIGKILL, as a crash would) after sending a layer of a named request."""

    crash_after_layer: dict[str, int] = field(default_factory=dict)


class PrefillWorker:
    role = "prefill"

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self.engine = make_engine(config)
        self.evictions = EvictionLog(self.engine)
        self.block_size = config.block_size
        self.num_layers = self.engine.kv_layout.num_layers
        # every backend's sender is a BaseSender, which also has flush() (not in the KVSender protocol)
        self.sender = cast(BaseSender, make_kv_transport(config).sender(self.engine.kv_cache))
        self._hook = _LayerHook(self.engine.model)
        self.engine.runner.model = self._hook  # type: ignore[assignment]
        self._jobs: dict[str, _Job] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()  # recent cancels, oldest first
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False
        self.faults = _Faults()

    # -- thread-safe API ----------------------------------------------------------------------------
    def submit(self, req: WorkRequest, grant: KVGrant) -> Future[FirstToken]:
        fut: Future[FirstToken] = Future()
        if self._closed:
            fut.set_exception(PoolError(f"prefill worker {self.worker_id} is closed"))
            return fut
        self._inbox.put(("add", (req, grant, fut)))
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
        self._wake.set()
        return done

    def take_evictions(self) -> list[bytes]:
        """Hashes of the prefix blocks evicted since the last call (for the router's block index)."""
        return self.evictions.take()

    def load(self) -> WorkerLoad:
        bm, sch = self.engine.block_manager, self.engine.scheduler
        queued = sum(j.seq.num_tokens - j.seq.num_computed_tokens for j in list(self._jobs.values()))
        return WorkerLoad(
            self.worker_id,
            self.role,
            waiting=sch.num_waiting,
            queue_tokens=queued,
            running=sch.num_running,
            used_blocks=bm.num_used_blocks,
            free_blocks=bm.num_free_blocks,
            total_blocks=bm.num_blocks,
            cached_blocks=bm.num_cached_blocks,
        )

    def crash_after_layer(self, request_id: str, layer: int) -> None:
        """Test hook: SIGKILL this process right after ``layer`` of ``request_id`` is sent."""
        self.faults.crash_after_layer[request_id] = layer

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
                for job in list(self._jobs.values()):
                    self._drop(job, FinishReason.ABORT)
                    if not job.future.done():
                        job.future.set_exception(PoolError(f"prefill worker {self.worker_id} failed: {e!r}"))
                continue
            if not busy:
                self._wake.wait(0.01)
                self._wake.clear()

    def step(self) -> bool:
        """Handle queued commands and run one forward pass; False when there was nothing to do."""
        self._drain_inbox()
        sch = self.engine.scheduler
        out = sch.schedule()
        if not out.scheduled:
            return False
        plans = self._plan(out)
        self._hook.on_layer = lambda layer: self._send_layer(plans, layer)
        try:
            logits = self.engine.runner.execute(out)  # (R, V)
        finally:
            self._hook.on_layer = None
        sch.update(out)
        for p in plans:
            p.job.sent_upto = max(p.job.sent_upto, p.hi)
        completing = [e.seq for e in out.scheduled if e.completes]
        if completing:
            jobs = [self._jobs[s.request_id] for s in completing]
            sampled = self.engine.sampler.sample(
                logits,
                [j.req.params for j in jobs],
                [j.req.seed for j in jobs],
                [s.num_tokens for s in completing],  # the position of the first output token
                [(s.prompt_token_ids, s.output_token_ids) for s in completing],
            )
            for i, job in enumerate(jobs):
                self._complete(job, sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i])
        return True

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

    def _send_layer(self, plans: list[_Plan], layer: int) -> None:
        for p in plans:
            job = p.job
            if job.error:
                continue
            if not job.kv_start_ns:
                job.kv_start_ns = time.time_ns()
            job.kv_layers.add(layer)
            try:
                self.sender.send_layer(
                    job.grant.dest,
                    layer,
                    job.seq.block_table[p.lo : p.hi],
                    block_offset=p.lo - job.grant.num_cached_blocks,
                )
                job.kv_bytes += (p.hi - p.lo) * self.engine.kv_layout.layer_block_bytes
            except (KVTransferError, ValueError) as e:
                job.error = str(e)
            if self.faults.crash_after_layer.get(job.req.request_id) == layer:
                os.kill(os.getpid(), signal.SIGKILL)

    def _complete(self, job: _Job, token: int, logprob: float | None, top: Any) -> None:
        rid = job.req.request_id
        error = job.error
        if not error:
            try:
                self.sender.finish(job.grant.dest, self.config.ack_timeout_s)
            except KVTransferError as e:
                error = str(e)
        self._drop(job, FinishReason.STOP if not error else FinishReason.ABORT)
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
                )
            )

    def _drop(self, job: _Job, reason: FinishReason) -> None:
        """Free the request's blocks (full prompt blocks stay as cached prefix) and forget it."""
        self.engine.scheduler.finish(job.seq, reason)
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

    def _add(self, req: WorkRequest, grant: KVGrant, fut: Future[FirstToken]) -> None:
        rid = req.request_id
        if rid in self._cancelled:
            # The cancel overtook the request (two concurrent calls): the decode side has already
            # freed the destination blocks, so nothing may be written to them.
            fut.set_exception(Cancelled(f"{rid}: cancelled before it started"))
            return
        if rid in self._jobs:
            fut.set_exception(PoolError(f"request {rid!r} is already being prefilled here"))
            return
        seq = Sequence(rid, list(req.prompt_token_ids), req.params)
        try:
            self.engine.scheduler.add(seq)
        except ValueError as e:
            fut.set_exception(PoolError(f"{rid}: {e}"))
            return
        self._jobs[rid] = _Job(req, grant, seq, fut)

    def _cancel(self, request_id: str) -> None:
        self._cancelled[request_id] = None
        while len(self._cancelled) > _TOMBSTONES:
            self._cancelled.popitem(last=False)
        job = self._jobs.get(request_id)
        if job is None:
            return
        if job.kv_bytes:
            # Let posted writes land before the decode worker reuses the blocks, then drop the
            # request's sender state (finish with no time left abandons it).
            with contextlib.suppress(KVTransferError):
                self.sender.flush(job.grant.dest, self.config.ack_timeout_s)
            with contextlib.suppress(KVTransferError):
                self.sender.finish(job.grant.dest, 0.0)
        self._drop(job, FinishReason.ABORT)
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
