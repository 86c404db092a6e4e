"""The in-process backend: one ``LLMEngine`` stepped by a dedicated thread, fed by the asyncio router.

::

    event loop (gRPC)                         engine thread
    generate() --("add", live)--> inbox ----> add_request / abort, then step()
        ^                                        |
        +--- loop.call_soon_threadsafe(sink.put_nowait, chunk) <--+

The engine is not thread-safe, so only the thread touches it; the loop talks to it through one
thread-safe inbox (adds and aborts keep their order) and each request's asyncio queue. Closing a
request's generator before its last chunk sends an abort, which frees its KV blocks in the engine.
An engine ``ValueError`` on ``add_request`` fails that request alone (INVALID_ARGUMENT); any other
exception in the step loop kills the backend: every live request and every later one gets
UNAVAILABLE.

Lifecycle: construct (loads the model, starts the thread) -> ``generate`` concurrently -> ``close``
(idempotent: stops the thread, aborts what is left, so ``load().used_blocks`` returns to 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.detokenizer import IncrementalDetokenizer
from engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from pool_runtime.reports import WorkerLoad
from router.backend import (
    BackendLoad,
    BackendModelInfo,
    BackendRequest,
    Chunk,
    ChunkStats,
    decode_ids,
    encode_chat,
    finish_reason_name,
    make_detokenizer,
    model_info,
)
from router.errors import BackendUnavailable, InvalidRequest

WORKER_ID = "local"
_STOP = object()


@dataclass(slots=True)
class _Live:
    """A request the engine thread is serving, and where its chunks go."""

    request: BackendRequest
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue[Chunk | BaseException]
    received: float = 0.0  # monotonic: when the thread added it to the engine
    started: float | None = None  # monotonic: start of the first step that computed its prompt
    num_tokens: int = 0


def _field_of(message: str) -> str:
    # The engine's ValueErrors are prose; name the request field they are about.
    if "request id" in message:
        return "request_id"
    if "prompt" in message or "token ids" in message:
        return "prompt"
    return "request"


class EngineBackend:
    """A :class:`router.backend.Backend` over one in-process engine (worker name ``"local"``)."""

    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        model_name: str = "demo",
        max_tokens_limit: int | None = None,
        default_max_tokens: int = 64,
    ) -> None:
        # token ids only: the front door makes the text (router/front_door.py)
        self._engine = LLMEngine(dataclasses.replace(engine_config, detokenize=False))
        eng = self._engine
        self._info = model_info(
            eng.model_config,
            model_name,
            engine_config.block_size,
            engine_config.dtype,
            eng.max_model_len,
            max_tokens_limit,
            eng.eos_token_ids,
            default_max_tokens,
        )
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._load = WorkerLoad(WORKER_ID, "both", total_blocks=eng.block_manager.num_blocks)
        self._alive = True
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    # -- the Backend protocol (called on the event loop) ------------------------------------------
    def model_info(self) -> BackendModelInfo:
        return self._info

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self._engine.tokenizer
        if tok is None:
            raise InvalidRequest("prompt", "this model has no tokenizer: send prompt token_ids")
        return tok.encode(text, add_special_tokens)

    def tokenize_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return encode_chat(self._engine.tokenizer, messages, add_generation_prompt)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return decode_ids(self._engine.tokenizer, token_ids, skip_special_tokens)

    def detokenizer(self, request: BackendRequest) -> IncrementalDetokenizer | None:
        return make_detokenizer(self._engine.tokenizer, request)

    def load(self) -> BackendLoad:
        copy = dataclasses.replace(self._load)
        return BackendLoad(alive=self._alive and not self._closed, workers=[copy])

    async def generate(self, request: BackendRequest) -> AsyncGenerator[Chunk, None]:
        if self._closed or not self._alive:
            raise BackendUnavailable("the engine backend is not running")
        live = _Live(request, asyncio.get_running_loop(), asyncio.Queue())
        self._inbox.put(("add", live))
        done = False
        try:
            while True:
                item = await live.sink.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:  # cancelled, deadline, or the consumer stopped early: free its blocks
                self._inbox.put(("abort", request.request_id))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(_STOP)
        self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while self._drain(block=not self._engine.has_unfinished()):
                if self._engine.has_unfinished():
                    t0 = time.monotonic()
                    outputs = self._engine.step()
                    self._mark_started(t0)
                    for out in outputs:
                        self._deliver_output(out)
                self._publish_load()
        except BaseException as e:  # a broken engine must not leave clients waiting forever
            error = e
        finally:
            self._alive = False
            reason = f"engine stopped: {type(error).__name__}: {error}" if error else "backend closed"
            for live in list(self._live.values()):
                self._send(live, BackendUnavailable(reason))
            self._live.clear()
            try:
                self._engine.close()
            finally:
                self._publish_load()

    def _drain(self, block: bool) -> bool:
        """Apply queued adds and aborts; False once close() asked the thread to stop."""
        while True:
            try:
                op = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if op is _STOP:
                return False
            kind, arg = op
            if kind == "add":
                self._add(arg)
            elif kind == "abort" and self._live.pop(arg, None) is not None:
                self._engine.abort(arg)

    def _add(self, live: _Live) -> None:
        req = live.request
        try:
            self._engine.add_request(req.prompt_token_ids, req.params, request_id=req.request_id)
        except ValueError as e:
            self._send(live, InvalidRequest(_field_of(str(e)), str(e)))
            return
        live.received = time.monotonic()
        self._live[req.request_id] = live

    def _mark_started(self, step_start: float) -> None:
        for rid, live in self._live.items():
            if live.started is None:
                seq = self._engine.scheduler.get(rid)
                if seq is None or seq.num_computed_tokens > 0:
                    live.started = step_start

    def _deliver_output(self, out: RequestOutput) -> None:
        live = self._live.get(out.request_id)
        if live is None:  # aborted while this step ran
            return
        first = live.num_tokens == 0
        live.num_tokens += len(out.new_token_ids)
        chunk = Chunk(
            out.new_token_ids,
            out.text,
            finish_reason_name(out.finish_reason) if out.finished else None,
            out.logprobs,
            out.top_logprobs,
            produced_at=time.monotonic(),
        )
        if out.finished or first:
            now = time.monotonic()
            started = live.started if live.started is not None else live.received
            stats = ChunkStats(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=live.num_tokens,
                cached_tokens=out.num_cached_tokens,
                queue_time_s=max(0.0, started - live.request.arrival) if live.request.arrival else 0.0,
                backend_time_s=now - live.received,
                prefill_worker=WORKER_ID,
                decode_worker=WORKER_ID,
            )
            if out.finished:
                del self._live[out.request_id]
                chunk.stats = stats
            else:
                chunk.partial = stats
        self._send(live, chunk)

    @staticmethod
    def _send(live: _Live, item: Chunk | BaseException) -> None:
        # RuntimeError: the client's event loop is gone, so nothing is waiting for this item.
        with contextlib.suppress(RuntimeError):
            live.loop.call_soon_threadsafe(live.sink.put_nowait, item)

    def _publish_load(self) -> None:
        sched, bm = self._engine.scheduler, self._engine.block_manager
        queue_tokens = sum(s.num_tokens for s in getattr(sched, "waiting", ()))
        # One assignment: readers on the loop thread see a whole snapshot, never a half-updated one.
        self._load = WorkerLoad(
            WORKER_ID,
            "both",
            running=sched.num_running,
            waiting=sched.num_waiting,
            queue_tokens=queue_tokens,
            used_blocks=bm.num_used_blocks,
            total_blocks=bm.num_blocks,
        )
