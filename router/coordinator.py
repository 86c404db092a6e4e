"""Pools: one request's path through a prefill worker and a decode worker, as an async token stream.

This is the API a router backend calls::

    pools = Pools(prefill_handles, decode_handles, disaggregation="always")
    async for chunk in pools.submit(PoolRequest(rid, prompt_ids, params)):   # TokenChunk deltas
        ...                      # the last chunk has finished=True (finish_reason, error if failed)
    await pools.cancel(rid)      # or close the iterator / cancel the task iterating it
    await pools.load()           # [WorkerLoad] of every worker, for the router's cost model

Per request (``always``, or ``auto`` with a long prompt)::

    pick prefill ─▶ decode.reserve(its KV layout) ─▶ prefill.prefill ─▶ decode.start ─▶ decode.take ...
                       │ dead / failed: decode.cancel, reserve again, next prefill worker
    decode dead at any point: resume on the next decode worker from prompt + tokens streamed so far
    (same seed: the sampler's (seed, position) rule continues the stream identically)

``never`` prefills on the decode worker (conditional disaggregation); ``auto`` lets the request
decide (the router sets ``always`` / ``never`` per request from its cost model), else prompts of at
least ``auto_min_prompt_tokens`` tokens go to the prefill pool. Every way out — finish, caller
cancel, failure — leaves no block held on any live worker. Pure asyncio over the handle protocols:
no torch and no Ray here (decode_pool/pool.py and prefill_pool/pool.py adapt Ray actors).

Tracing: the handles pass the caller's current trace context with each call (pool_runtime/tracing.py),
so the workers' spans join the request's trace; a retried prefill or a resumed decode adds an event
to that current span. ``PoolRequest.on_handoff`` sees every committed handoff, ``on_handoff_failure``
every failed one (transfer metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from opentelemetry import trace

from engine.sampling_params import SamplingParams
from kv_transfer.heads import KVShardLayout
from kv_transfer.protocol import KVTransferError, NoRoomError
from pool_runtime.handoff import (
    DISAGGREGATION_MODES,
    UNKNOWN_REQUEST,
    FirstToken,
    InvalidWorkRequest,
    KVGrant,
    PoolError,
    TokenChunk,
    WorkerDied,
    WorkRequest,
)
from pool_runtime.reports import WorkerLoad

log = logging.getLogger(__name__)


class PrefillHandle(Protocol):
    worker_id: str

    async def kv_layout(self) -> KVShardLayout | None:
        """Its KV pool's layout (model, dtype, block size, heads over its tensor-parallel ranks),
        which the decode worker checks and plans the handoff by; None: the decode worker's model
        on one rank."""
        ...

    async def prefill(self, req: WorkRequest, grant: KVGrant) -> FirstToken: ...

    async def cancel(self, request_id: str) -> None: ...

    async def load(self) -> WorkerLoad: ...


class DecodeHandle(Protocol):
    worker_id: str

    async def reserve(self, req: WorkRequest, source: KVShardLayout | None = None) -> KVGrant: ...

    async def start(self, request_id: str, first: FirstToken) -> None: ...

    async def submit_local(self, req: WorkRequest) -> None: ...

    async def take(self, request_id: str, timeout_s: float) -> list[TokenChunk]: ...

    async def cancel(self, request_id: str) -> bool: ...

    async def load(self) -> WorkerLoad: ...


@dataclass(slots=True)
class PoolRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    disaggregation: str | None = None  # None: the pools' default; "always" | "never" | "auto"
    prefill_worker: str | None = None  # placement chosen by the router (None: round robin)
    decode_worker: str | None = None
    deadline_s: float | None = None  # from submit; past it the request is cancelled ("deadline exceeded")
    # called with each committed handoff's FirstToken (KV bytes, transfer timing) and its decode
    # worker's id, e.g. for metrics
    on_handoff: Callable[[FirstToken, str], None] | None = None
    # called with (prefill worker, decode worker, "transfer" | "worker_died") for each handoff that
    # failed and is retried, e.g. for metrics
    on_handoff_failure: Callable[[str, str, str], None] | None = None


@dataclass(slots=True)
class _Live:
    req: PoolRequest
    params: SamplingParams  # with the seed fixed
    streamed: list[int] = field(default_factory=list)
    prefill: PrefillHandle | None = None  # set while a prefill call is in flight
    decode: DecodeHandle | None = None  # set while a decode worker holds the request
    cancelled: bool = False
    cancel_reason: str = "cancelled"
    done: bool = False  # the decode worker sent the last chunk (and so released the request itself)
    prefill_attempts: int = 0
    decode_attempts: int = 0
    firsts: list[FirstToken] = field(default_factory=list)  # one per successful prefill attempt

    def work(self) -> WorkRequest:
        """The request as a worker gets it now: resumed requests carry their streamed tokens."""
        n = len(self.streamed)
        params = dataclasses.replace(self.params, max_tokens=self.params.max_tokens - n)
        return WorkRequest(self.req.request_id, self.req.prompt_token_ids + self.streamed, params)


H = TypeVar("H", PrefillHandle, DecodeHandle)


class _CallerCancelled(Exception):
    pass


class Pools:
    """Lifecycle: construct over live handles -> ``submit`` concurrently -> ``close`` (cancels
    what is in flight)."""

    def __init__(
        self,
        prefill: Sequence[PrefillHandle],
        decode: Sequence[DecodeHandle],
        disaggregation: str = "always",
        max_attempts: int = 3,
        auto_min_prompt_tokens: int = 64,
        take_timeout_s: float = 1.0,
    ) -> None:
        if disaggregation not in DISAGGREGATION_MODES:
            raise ValueError(f"disaggregation must be one of {DISAGGREGATION_MODES}, got {disaggregation!r}")
        if not decode:
            raise ValueError("at least one decode worker is needed")
        if disaggregation == "always" and not prefill:
            raise ValueError("disaggregation 'always' needs a prefill worker")
        self.prefill = list(prefill)
        self.decode = list(decode)
        self.disaggregation = disaggregation
        self.max_attempts = max_attempts
        self.auto_min_prompt_tokens = auto_min_prompt_tokens
        self.take_timeout_s = take_timeout_s
        self._rr_prefill = itertools.count()
        self._rr_decode = itertools.count()
        self._live: dict[str, _Live] = {}

    # -- public --------------------------------------------------------------------------------------
    async def submit(self, req: PoolRequest) -> AsyncIterator[TokenChunk]:
        """Stream the request's token chunks; the last has ``finished``. Failures end the stream
        with ``finish_reason="abort"`` and ``error``; closing the iterator cancels the request."""
        rid = req.request_id
        if rid in self._live:
            raise PoolError(f"request {rid!r} is already in flight")
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
        live = _Live(req, dataclasses.replace(req.params, seed=seed))
        self._live[rid] = live
        timer = None
        if req.deadline_s is not None:
            timer = asyncio.get_running_loop().call_later(
                req.deadline_s, lambda: asyncio.ensure_future(self.cancel(rid, "deadline exceeded"))
            )
        try:
            async for chunk in self._serve(live):
                yield chunk
        finally:
            if timer is not None:
                timer.cancel()
            self._live.pop(rid, None)
            if not live.done:
                await asyncio.shield(self._release(live))

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        """Cancel a request in flight (its stream ends with ``error=reason``); False if unknown."""
        live = self._live.get(request_id)
        if live is None or live.cancelled:
            return False
        live.cancelled, live.cancel_reason = True, reason
        await self._release(live)
        return True

    async def load(self) -> list[WorkerLoad]:
        out: list[WorkerLoad] = []
        handles: list[PrefillHandle | DecodeHandle] = [*self.prefill, *self.decode]
        for h in handles:
            with contextlib.suppress(Exception):  # a dead worker reports nothing
                out.append(await h.load())
        return out

    async def close(self) -> None:
        for rid in list(self._live):
            await self.cancel(rid)

    # -- one request ---------------------------------------------------------------------------------
    def _mode(self, req: PoolRequest) -> str:
        mode = req.disaggregation or self.disaggregation
        if mode == "auto":
            mode = "always" if len(req.prompt_token_ids) >= self.auto_min_prompt_tokens else "never"
        if mode == "always" and not self.prefill:
            mode = "never"
        return mode

    async def _serve(self, live: _Live) -> AsyncIterator[TokenChunk]:
        rid = live.req.request_id
        mode = self._mode(live.req)
        dead_decode: set[str] = set()
        while True:
            d = self._pick(self.decode, self._rr_decode, dead_decode, live.req.decode_worker)
            if d is None or live.decode_attempts >= self.max_attempts:
                msg = f"no decode worker left after {live.decode_attempts} attempts"
                yield self._error(live, msg, "unavailable")
                return
            live.decode_attempts += 1
            live.decode = d
            try:
                if mode == "never":
                    await d.submit_local(live.work())
                else:
                    await self._handoff(live, d)
                if live.cancelled:
                    raise _CallerCancelled
                while True:
                    for c in await d.take(rid, self.take_timeout_s):
                        if c.error.startswith(UNKNOWN_REQUEST):
                            if live.cancelled:
                                raise _CallerCancelled
                            raise WorkerDied(f"decode worker {d.worker_id} lost {rid} (restarted?)")
                        live.streamed += c.token_ids
                        live.done = c.finished
                        if c.finished and live.firsts:
                            self._annotate(live, c)
                        yield c
                        if c.finished:
                            return
            except _CallerCancelled:
                yield self._error(live, live.cancel_reason)
                return
            except WorkerDied as e:
                live.decode = None
                if live.cancelled:
                    yield self._error(live, live.cancel_reason)
                    return
                dead_decode.add(d.worker_id)  # resume on another one
                _event("tandem.decode_resume", d.worker_id, e, streamed=len(live.streamed))
            except (PoolError, KVTransferError) as e:
                if live.cancelled:
                    yield self._error(live, live.cancel_reason)
                    return
                yield self._error(live, _brief(e), _error_kind(e))
                return

    async def _handoff(self, live: _Live, d: DecodeHandle) -> None:
        """Reserve on ``d``, prefill on a prefill worker (retrying on another one when it dies or the
        transfer fails), then start the request on ``d``. Raises WorkerDied if ``d`` dies."""
        rid = live.req.request_id
        work = live.work()
        dead_prefill: set[str] = set()
        last_error = ""
        while live.prefill_attempts < self.max_attempts:
            p = self._pick(self.prefill, self._rr_prefill, dead_prefill, live.req.prefill_worker)
            if p is None:
                break
            try:
                layout = await p.kv_layout()
            except WorkerDied as e:
                dead_prefill.add(p.worker_id)
                last_error = f"prefill on {p.worker_id} failed: {_brief(e)}"
                continue
            # d checks that it can take p's KV (IncompatibleKV: a clear error, nothing held)
            grant = await d.reserve(work, layout)
            if live.cancelled:  # the cancel may have reached d before the reservation did
                raise _CallerCancelled
            live.prefill_attempts += 1
            live.prefill = p
            try:
                first = await p.prefill(work, grant)
            except (WorkerDied, KVTransferError, PoolError) as e:
                live.prefill = None
                if live.cancelled:
                    raise _CallerCancelled from e
                if isinstance(e, PoolError) and not isinstance(e, KVTransferError):
                    await d.cancel(rid)
                    raise
                last_error = f"prefill on {p.worker_id} failed: {_brief(e)}"
                dead_prefill.add(p.worker_id)
                _notify(live.req.on_handoff_failure, p.worker_id, d.worker_id, _failure_reason(e))
                _event("tandem.prefill_retry", p.worker_id, e)
                await d.cancel(rid)  # frees the reservation; raises WorkerDied if d is the dead one
                continue
            live.prefill = None
            live.firsts.append(first)
            _notify(live.req.on_handoff, first, d.worker_id)
            if live.cancelled:
                raise _CallerCancelled
            await d.start(rid, first)
            return
        await d.cancel(rid)
        raise PoolError(f"{rid}: prefill failed {live.prefill_attempts} times; last: {last_error}")

    async def _release(self, live: _Live) -> None:
        """Cancel on whatever workers hold the request: the prefill worker first, so that nothing is
        written into the decode worker's blocks after they are freed."""
        rid = live.req.request_id
        p, d = live.prefill, live.decode
        if p is not None:
            with contextlib.suppress(Exception):
                await p.cancel(rid)
        if d is not None:
            with contextlib.suppress(Exception):
                await d.cancel(rid)

    def _error(self, live: _Live, error: str, kind: str = "") -> TokenChunk:
        if not kind:
            kind = "deadline" if error == "deadline exceeded" else "cancelled" if live.cancelled else "failed"
        return TokenChunk(
            live.req.request_id, [], finished=True, finish_reason="abort", error=error, error_kind=kind
        )

    @staticmethod
    def _annotate(live: _Live, last: TokenChunk) -> None:
        """The handoff's facts on the last chunk: who prefilled, KV bytes sent, its cached tokens."""
        last.prefill_worker = live.firsts[-1].worker_id
        last.kv_bytes = sum(f.kv_bytes for f in live.firsts)
        last.prefill_cached_tokens = live.firsts[-1].num_cached_tokens

    @staticmethod
    def _pick(
        handles: list[H], rr: itertools.count[int], exclude: set[str], preferred: str | None
    ) -> H | None:
        alive = [h for h in handles if h.worker_id not in exclude]
        if not alive:
            return None
        for h in alive:
            if h.worker_id == preferred:
                return h
        return alive[next(rr) % len(alive)]


def _notify(observer: Callable[..., None] | None, *args: object) -> None:
    """Tell an observer (metrics) about a handoff; an observer must never fail the request."""
    if observer is not None:
        try:
            observer(*args)
        except Exception:
            log.warning("handoff observer %r failed", observer, exc_info=True)


def _failure_reason(e: BaseException) -> str:
    return "worker_died" if isinstance(e, WorkerDied) else "transfer"


def _event(name: str, worker_id: str, e: BaseException, **attrs: int) -> None:
    """A failover on the request's current span (a no-op when it is not recorded)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, {"tandem.worker": worker_id, "tandem.error": str(e), **attrs})


def _brief(e: BaseException) -> str:
    """What a client may read of a worker's failure: the original exception's message (Ray's
    re-raised form carries the worker's whole traceback, with colour codes) on one line."""
    cause = getattr(e, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else e)
    text = _ANSI.sub("", text).strip()
    return text.splitlines()[-1].strip() if text else type(e).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error_kind(e: BaseException) -> str:
    """TokenChunk.error_kind of a failure (Ray re-raises a worker's exception as its own class)."""
    if isinstance(e, NoRoomError):
        return "overloaded"
    if isinstance(e, InvalidWorkRequest):
        return "invalid"
    return "failed"
