"""One completions or chat completions request, run through the shared front door.

::

    Generation(front, plan, ...)   every choice prepared (checks, tokenizing) and admission checked
                                   before anything is sent: a bad request is a real 400 / 429 / 503
    await complete()               the choices concurrently -> one JSON response (usage included)
    events()                       SSE event bytes (FastAPI's encoder), one per backend chunk:
        data: {chunk}\\n\\n ...    id, object, created, model, choices[{index, text | delta, logprobs,
                                   finish_reason}]; the first chat chunk carries the role with its
                                   first token (no role-only chunk); the last content chunk carries
                                   finish_reason; usage: null on every chunk, or the running usage
                                   with continuous_usage_stats
        data: {usage chunk}\\n\\n  choices [] and the totals, only with stream_options.include_usage
        data: [DONE]\\n\\n
    a failure after the first byte: data: {"error": {...}}\\n\\n, then data: [DONE]\\n\\n

A chunk with tokens but no text yet (a UTF-8 character split across tokens, a possible stop string
held back) is not sent on its own: its tokens and logprobs ride with the next chunk that has text,
or with the last. Several choices stream concurrently, each in a task feeding one queue; closing the
stream (the client went away: Starlette cancels it) cancels them all, which closes each backend
stream and frees its blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.sse import format_sse_event

from router.backend import BackendRequest, Chunk, ChunkStats
from router.errors import BackendUnavailable, InvalidRequest
from router.front_door import FrontDoor, RequestTiming
from router.http.errors import error_event
from router.http.openai import FINISH_REASONS, ChoiceText, Logprobs, Plan, choice_json, timings, usage
from router.validation import ValidationError

DONE = format_sse_event(data_str="[DONE]")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(slots=True)
class _Choice:
    index: int
    prompt: int  # which prompt of the request
    request: BackendRequest
    timing: RequestTiming
    logprobs: Logprobs | None
    first: bool = True  # no event sent yet
    tokens: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_lps: list[float | None] = field(default_factory=list)
    pending_tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    stats: ChunkStats | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)


class Generation:
    def __init__(
        self, front: FrontDoor, plan: Plan, arrival: float, token_text: Callable[[int], str]
    ) -> None:
        self.front, self.plan = front, plan
        chat = plan.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.object = (
            ("chat.completion.chunk" if chat else "text_completion")
            if plan.stream
            else ("chat.completion" if chat else "text_completion")
        )
        self.created = int(time.time())
        self.model = front.limits.name
        self.choices: list[_Choice] = []
        for p, inp in enumerate(plan.inputs):
            try:
                breq = front.prepare(inp, arrival, fill_context=plan.fill_context)
            except (ValidationError, InvalidRequest) as e:
                raise plan.translate(e) from None
            for i in range(plan.n):
                params = breq.params
                if i and params.seed is not None:
                    params = dataclasses.replace(params, seed=params.seed + i)
                req = dataclasses.replace(breq, request_id=f"{self.id}-{p * plan.n + i}", params=params)
                lp = Logprobs(plan.kind, token_text) if plan.logprobs is not None else None
                self.choices.append(_Choice(p * plan.n + i, p, req, RequestTiming(arrival, "http"), lp))
        front.admission.check(len(self.choices))
        for c in self.choices:
            c.timing.prepared()

    # -- not streamed ---------------------------------------------------------------------------------
    async def complete(self) -> dict[str, Any]:
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._collect(c)) for c in self.choices]
        except* Exception as group:
            raise self._translate(group.exceptions[0]) from None
        results = [t.result() for t in tasks]
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [
                choice_json(self.plan.kind, r, c.logprobs) for r, c in zip(results, self.choices, strict=True)
            ],
            "usage": self._total_usage(),
        }

    async def _collect(self, c: _Choice) -> ChoiceText:
        out = ChoiceText(c.index)
        async for chunk in self.front.stream(c.request, c.timing):
            out.text.append(chunk.text)
            out.token_ids += chunk.token_ids
            out.logprobs += chunk.logprobs
            out.top_logprobs += chunk.top_logprobs
            c.timing.handed(chunk)
            if chunk.finish_reason is not None:
                out.finish_reason = _finish(chunk.finish_reason)
            if chunk.stats is not None:
                c.stats = out.stats = chunk.stats
                if self.plan.return_timings:
                    out.timings = timings(chunk.stats, c.timing, time.monotonic() - c.timing.arrival)
        return out

    # -- streamed -------------------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for c, chunk in self._chunks():
                event = self._event(c, chunk)
                if event is not None:
                    yield format_sse_event(data_str=_dumps(event))
            if self.plan.include_usage:
                final = self._envelope([])
                final["usage"] = self._total_usage()
                yield format_sse_event(data_str=_dumps(final))
        except Exception as e:  # the status line went out already: the error is an event
            yield format_sse_event(data_str=_dumps(error_event(self._translate(e))))
        yield DONE

    async def _chunks(self) -> AsyncIterator[tuple[_Choice, Chunk]]:
        if len(self.choices) == 1:
            (c,) = self.choices
            async for chunk in self.front.stream(c.request, c.timing):
                yield c, chunk
            return
        queue: asyncio.Queue[tuple[_Choice, Chunk | None, BaseException | None]] = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            try:
                async for chunk in self.front.stream(c.request, c.timing):
                    queue.put_nowait((c, chunk, None))
                queue.put_nowait((c, None, None))
            except Exception as e:
                queue.put_nowait((c, None, e))

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            remaining = len(tasks)
            while remaining:
                c, item, error = await queue.get()
                if error is not None:
                    raise error
                if item is None:
                    remaining -= 1
                else:
                    yield c, item
        finally:
            for t in tasks:
                t.cancel()  # each closes its backend stream: the request's blocks come back

    def _event(self, c: _Choice, chunk: Chunk) -> dict[str, Any] | None:
        c.tokens += len(chunk.token_ids)
        if not chunk.text and chunk.finish_reason is None:
            c.pending_ids += chunk.token_ids
            c.pending_lps += chunk.logprobs
            c.pending_tops += chunk.top_logprobs
            c.timing.handed(chunk)
            return None
        finish = _finish(chunk.finish_reason) if chunk.finish_reason is not None else None
        choice: dict[str, Any] = {"index": c.index}
        if self.plan.kind == "chat":
            choice["delta"] = (
                {"role": "assistant", "content": chunk.text} if c.first else {"content": chunk.text}
            )
        else:
            choice["text"] = chunk.text
        c.first = False
        if c.logprobs is not None:
            ids, lps, tops = (
                c.pending_ids + chunk.token_ids,
                c.pending_lps + chunk.logprobs,
                c.pending_tops + chunk.top_logprobs,
            )
            choice["logprobs"] = c.logprobs.render(ids, lps, tops)
            c.pending_ids, c.pending_lps, c.pending_tops = [], [], []
        else:
            choice["logprobs"] = None
        choice["finish_reason"] = finish
        event = self._envelope([choice])
        c.timing.handed(chunk)
        if chunk.stats is not None:
            c.stats = chunk.stats
            if self.plan.return_timings:
                choice["timings"] = timings(chunk.stats, c.timing, time.monotonic() - c.timing.arrival)
        if self.plan.include_usage:
            cached = c.stats.cached_tokens if c.stats is not None else None
            event["usage"] = usage(c.prompt_tokens, c.tokens, cached) if self.plan.continuous_usage else None
        return event

    # -- both -----------------------------------------------------------------------------------------
    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _total_usage(self) -> dict[str, Any]:
        """Each prompt counted once (its first choice's cached tokens), every choice's tokens."""
        prompt = cached = completion = 0
        for c in self.choices:
            st = c.stats
            completion += st.completion_tokens if st is not None else c.tokens
            if c.index % self.plan.n == 0:
                prompt += c.prompt_tokens
                cached += st.cached_tokens if st is not None else 0
        return usage(prompt, completion, cached)

    def _translate(self, e: BaseException) -> BaseException:
        return self.plan.translate(e) if isinstance(e, ValidationError | InvalidRequest) else e


def _finish(reason: str) -> str:
    if reason in FINISH_REASONS:
        return reason
    raise BackendUnavailable(f"the request ended without finishing ({reason})")
