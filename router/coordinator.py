"""Pools: one request's path through a prefill worker and a decode worker, as an async token stream.

This is the API a router backend calls::

    pools = Pools(prefill_handles, decode_handles, disaggregation="always")
    async for chunk in pools.submit(PoolRequest(rid, prompt_ids, params)):   # TokenChunk deltas
        ...                      # the last chunk has finished=True (finish_reason, error if failed)
    await pools.cancel(rid)      # or close the iterator / cancel the task iterating it
    await pools.load()           # [WorkerLoad] of every worker, for the router's cost model

Per request (``always``, or ``auto`` with a long prompt)::

    pick prefill ─▶ decode.reserve(its KV layout, channel) ─▶ prefill.prefill (a stream of two):
                       first token sampled ──▶ to the client at once; decode.start(first)
                       committed ──▶ the decode worker streams the rest over the router's channel
                       │ dead / failed (before or after the first token): decode.cancel, reserve
                       │ again, next prefill worker (after the first token: from prompt + first)
    decode dead at any point: resume on the next decode worker — or, with none left, on the same one
    once Ray has restarted it (up to ``restart_wait_s``) — from prompt + tokens streamed so far (same
    seed: the sampler's (seed, position) rule continues the stream identically)

Tokens come from the decode workers' token streams (router/token_streams.py): one stream per decode
worker for this router's ``channel``, fanned out to the requests; a request subscribes before it is
started, so none of its chunks can go by unseen.

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
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from engine.sampling_params import SamplingParams
from kv_transfer.protocol import KVTransferError
from pool_runtime.handoff import (
    DISAGGREGATION_MODES,
    FirstToken,
    PoolError,
    Route,
    TokenChunk,
    WorkerDied,
    WorkRequest,
)
from pool_runtime.reports import WorkerLoad
from router.failures import brief, error_kind, event, failure_reason, notify
from router.pool_handles import DecodeHandle, PrefillHandle
from router.token_streams import Subscription, TokenStreams

log = logging.getLogger(__name__)


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
    firsts: list[FirstToken] = field(default_factory=list)  # one per committed prefill attempt
    sub: Subscription | None = None  # where its tokens arrive, while a decode worker holds it
    attempt: int = 0  # Route.attempt of its latest reservation / local prefill
    finished_early: bool = False  # the prefill worker's first token ended it
    start_error: str = ""  # the decode worker refused this attempt's start

    def work(self) -> WorkRequest:
        """The request as a worker gets it now: resumed requests carry their streamed tokens."""
        n = len(self.streamed)
        params = dataclasses.replace(self.params, max_tokens=self.params.max_tokens - n)
        return WorkRequest(self.req.request_id, self.req.prompt_token_ids + self.streamed, params)


H = TypeVar("H", PrefillHandle, DecodeHandle)


class _CallerCancelled(Exception):
    pass


class _DecodeDied(WorkerDied):
    """The decode worker died while the handoff was in flight (not the prefill worker's fault)."""


class Pools:
    """Lifecycle: construct over live handles -> ``submit`` concurrently -> ``close`` (cancels
    what is in flight, stops the token streams)."""

    def __init__(
        self,
        prefill: Sequence[PrefillHandle],
        decode: Sequence[DecodeHandle],
        disaggregation: str = "always",
        max_attempts: int = 3,
        auto_min_prompt_tokens: int = 64,
        restart_wait_s: float = 60.0,
        channel: str | None = None,
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
        self.restart_wait_s = restart_wait_s  # how long a request waits for a dead decode worker's restart
        # this router's channel on every decode worker (unique: several routers may share the pools)
        self.streams = TokenStreams(channel or f"router-{uuid.uuid4().hex[:16]}")
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
        if live.sub is not None:  # wake the request where it waits for tokens
            live.sub.put(_CallerCancelled())
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
        await self.streams.close()

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
            d = await self._decode_worker(live, dead_decode)
            if d is None:
                msg = f"no decode worker left after {live.decode_attempts} attempts"
                yield self._error(live, msg, "unavailable")
                return
            live.decode_attempts += 1
            live.decode = d
            live.sub = sub = self.streams.subscribe(d, rid)
            try:
                await self.streams.connected(d, self.restart_wait_s)
                if mode == "never":
                    await d.submit_local(live.work(), self._route(live, sub))
                else:
                    async for first in self._handoff(live, d, sub):
                        yield first
                    if live.finished_early:
                        return
                if live.cancelled:
                    raise _CallerCancelled
                while True:
                    c = await sub.get()
                    if c.error:
                        if live.cancelled:
                            raise _CallerCancelled
                        c.error_kind = c.error_kind or "failed"
                        yield c
                        return
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
            except (WorkerDied, _DecodeDied) as e:
                live.decode = None
                if live.cancelled:
                    yield self._error(live, live.cancel_reason)
                    return
                dead_decode.add(d.worker_id)  # resume elsewhere (or on it, once restarted)
                event("tandem.decode_resume", d.worker_id, e, streamed=len(live.streamed))
            except (PoolError, KVTransferError) as e:
                if live.cancelled:
                    yield self._error(live, live.cancel_reason)
                    return
                yield self._error(live, brief(e), error_kind(e))
                return
            finally:
                self.streams.unsubscribe(sub)
                live.sub = None

    async def _decode_worker(self, live: _Live, dead: set[str]) -> DecodeHandle | None:
        """The next decode worker for the request: a live one; with none left, the first dead one
        to answer again (Ray restarts a dead worker), waiting up to ``restart_wait_s``."""
        if live.decode_attempts >= self.max_attempts:
            return None
        d = self._pick(self.decode, self._rr_decode, dead, live.req.decode_worker)
        if d is not None or not dead:
            return d
        deadline = time.monotonic() + self.restart_wait_s
        while time.monotonic() < deadline and not live.cancelled:
            for h in self.decode:
                try:
                    await asyncio.wait_for(h.load(), timeout=max(0.1, deadline - time.monotonic()))
                except Exception:  # still down (or restarting)
                    continue
                dead.discard(h.worker_id)
                return h
            await asyncio.sleep(0.25)
        return None

    async def _handoff(self, live: _Live, d: DecodeHandle, sub: Subscription) -> AsyncIterator[TokenChunk]:
        """Reserve on ``d``, prefill on a prefill worker (retrying on another one when it dies or the
        transfer fails), yield the first token the moment it is sampled, start the request on
        ``d`` and see the handoff through. Raises WorkerDied if ``d`` dies."""
        rid = live.req.request_id
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
                last_error = f"prefill on {p.worker_id} failed: {brief(e)}"
                continue
            work = live.work()
            # d checks that it can take p's KV (IncompatibleKV: a clear error, nothing held)
            grant = await d.reserve(work, layout, self._route(live, sub))
            if live.cancelled:  # the cancel may have reached d before the reservation did
                raise _CallerCancelled
            live.prefill_attempts += 1
            live.prefill = p
            live.start_error = ""
            streamed_first = False
            try:
                # A multi-rank decode worker is started once every rank committed (the prefill's
                # second item): its rank 0 cannot see whether its other ranks' KV has landed yet
                start_early = not grant.rank_dests
                async for first in p.prefill(work, grant):
                    if first.committed:
                        live.firsts.append(first)
                        notify(live.req.on_handoff, first, d.worker_id)
                        if streamed_first:  # the commit behind a first token already streamed
                            if not start_early:
                                await self._start(live, p, d, first)
                            continue
                    streamed_first = True
                    if live.cancelled:  # sampled as the cancel came: nothing more goes out
                        raise _CallerCancelled
                    chunk = self._first_chunk(live, first, len(work.prompt_token_ids), d.worker_id)
                    yield chunk
                    if chunk.finished:  # nothing to start: the release path frees d's blocks
                        return
                    if live.cancelled:
                        raise _CallerCancelled
                    if start_early or first.committed:
                        await self._start(live, p, d, first)
            except _DecodeDied:
                raise
            except (WorkerDied, KVTransferError, PoolError) as e:
                live.prefill = None
                if live.cancelled:
                    raise _CallerCancelled from e
                if isinstance(e, PoolError) and not isinstance(e, KVTransferError):
                    await d.cancel(rid)
                    raise
                last_error = f"prefill on {p.worker_id} failed: {brief(e)}"
                dead_prefill.add(p.worker_id)
                notify(live.req.on_handoff_failure, p.worker_id, d.worker_id, failure_reason(e))
                event("tandem.prefill_retry", p.worker_id, e)
                await d.cancel(rid)  # frees the reservation; raises WorkerDied if d is the dead one
                continue  # from prompt + what was streamed (a first token, if it was)
            live.prefill = None
            if live.start_error:  # committed, yet the decode worker refused to start it
                raise PoolError(f"{rid}: decode worker {d.worker_id} did not start it: {live.start_error}")
            return
        await d.cancel(rid)
        raise PoolError(f"{rid}: prefill failed {live.prefill_attempts} times; last: {last_error}")

    async def _start(self, live: _Live, p: PrefillHandle, d: DecodeHandle, first: FirstToken) -> None:
        """Start the request on ``d`` with its first token (the handoff still completing). A dead
        ``d`` is the decode worker's failure, not the prefill's: the request resumes elsewhere (the
        prefill worker finds out from its transport; it is not cancelled, which would bar the
        request id there). A refusal (the reservation failed meanwhile: a bad digest, an expired
        lease) is left to the prefill stream, which reports the handoff's own error."""
        rid = live.req.request_id
        try:
            await d.start(rid, first)
        except WorkerDied:
            live.prefill = None
            raise _DecodeDied(d.worker_id) from None
        except PoolError as e:
            live.start_error = brief(e)

    def _route(self, live: _Live, sub: Subscription) -> Route:
        """A new attempt's route: this router's channel, and a tag the worker echoes on every chunk."""
        live.attempt += 1
        sub.next_attempt(live.attempt)
        return Route(self.streams.channel, live.attempt)

    def _first_chunk(
        self, live: _Live, first: FirstToken, prompt_tokens: int, decode_worker: str
    ) -> TokenChunk:
        """The prefill worker's first token as the stream's chunk. When it ends the request it is
        the last chunk, but the request is not ``done``: the decode worker still holds its KV,
        which the release path frees."""
        live.streamed.append(first.token_id)
        done = first.finish_reason is not None
        live.finished_early = done
        chunk = TokenChunk(
            live.req.request_id,
            [first.token_id],
            finished=done,
            finish_reason=first.finish_reason,
            logprobs=[first.logprob],
            top_logprobs=[first.top_logprobs],
            worker_id=decode_worker,  # the worker that serves the request from here on
            num_prompt_tokens=prompt_tokens,
            num_cached_tokens=first.num_cached_tokens,
            produced_at=time.monotonic(),
            prefill_worker=first.worker_id,
            prefill_cached_tokens=first.num_cached_tokens,
            kv_bytes=sum(f.kv_bytes for f in live.firsts),
        )
        return chunk

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
