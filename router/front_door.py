"""What both front doors (the gRPC servicer, the OpenAI HTTP app) share: one request, from its plain
values to its stream of chunks, through the same checks, admission queue, backend and telemetry.

::

    caller ----------admit()---> API key, rate limit (router/security.py's Guard; before the body)
    GenerateInput --prepare()--> check_request (the model's and the server's limits) -> backend
                                 alive? -> tokenize (a chat through the model's template)
                                 -> check_prompt_length -> BackendRequest
    stream(request, timing) ---> admission slot (bounded; a full queue sheds) -> backend.generate
                                 -> Chunk ... (the last carries stats)
        per chunk:     its text, made here from the token ids by the request's one incremental
                       detokenizer (stop strings found here: a match ends the stream and cancels
                       the request downstream); TTFT / inter-token latency recorded; the front door
                       converts the chunk to its wire form, then calls ``timing.handed(chunk)``
        after the last: queue time, prefix hits, token counts, end-to-end latency, the request's
                       outcome and the router's overhead recorded (router/telemetry.py)

Closing the stream (a gRPC cancel or deadline, an HTTP client gone) closes the backend's stream,
which releases the request downstream: its KV blocks, its admission slot. Errors are the plain
exceptions of router/errors.py and router/validation.py; each front door maps them to its own
codes in one place. No gRPC, no HTTP here.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace

from engine.detokenizer import IncrementalDetokenizer
from router.admission import AdmissionQueue
from router.backend import Backend, BackendRequest, Chunk, ChunkStats
from router.errors import BackendUnavailable
from router.security import Guard, KeyStore
from router.telemetry import Telemetry, setup_telemetry
from router.validation import (
    GenerateInput,
    ModelLimits,
    RequestLimits,
    ValidationError,
    check_prompt_length,
    check_request,
    effective_max_tokens,
    to_sampling_params,
)


@dataclass(slots=True)
class RequestTiming:
    """Where one request's time went, as the router saw it (time.monotonic() values)."""

    arrival: float  # the front door received the request (HTTP: before parsing its body)
    front_door: str = "grpc"  # "grpc" | "http"
    router_request_s: float = 0.0  # before the backend: parsing, validation, tokenizing (no admission wait)
    router_token_s: float = 0.0  # summed over chunks: the backend produced it -> handed to the transport
    first_at: float | None = None
    last_at: float = 0.0

    def prepared(self) -> None:
        """The request passed every check and is about to go to the backend."""
        self.router_request_s = time.monotonic() - self.arrival

    def handed(self, chunk: Chunk) -> None:
        """``chunk`` was converted and is about to be handed to the transport."""
        if chunk.produced_at:
            self.router_token_s += time.monotonic() - chunk.produced_at

    @property
    def ttft_s(self) -> float:
        return (self.first_at - self.arrival) if self.first_at is not None else 0.0


class FrontDoor:
    """Shared by the front doors of one server: one backend, one admission queue, one telemetry,
    one guard (who may call, how often) and one set of request limits."""

    def __init__(
        self,
        backend: Backend,
        admission: AdmissionQueue,
        telemetry: Telemetry | None = None,
        *,
        default_disaggregation: str = "never",
        bounds: RequestLimits = RequestLimits(),
        guard: Guard | None = None,
    ) -> None:
        self.backend = backend
        self.bounds = bounds
        self.guard = guard or Guard(KeyStore())
        self.admission = admission
        self.telemetry = telemetry or setup_telemetry("none")
        self.default_disaggregation = default_disaggregation
        self.limits = backend.model_info().limits
        self.models = {self.limits.name: self.limits}
        if self.telemetry.prometheus is not None:
            self.telemetry.prometheus.watch(load=backend.load, admission=admission)

    def check_model(self, name: str) -> ModelLimits:
        """The served model a request names (empty: the only one); ValidationError ``model`` if unknown."""
        return check_request(GenerateInput(model=name, prompt_token_ids=[0]), self.models)

    def prepare(self, inp: GenerateInput, arrival: float, *, fill_context: bool = False) -> BackendRequest:
        """Every check before the backend, and the tokenizing; ``fill_context``: an unset max_tokens
        means as many as the context leaves (OpenAI's chat), not the model's default."""
        limits = check_request(inp, self.models, self.bounds)
        if not self.backend.load().alive:
            raise BackendUnavailable("no live backend worker")
        prompt = inp.prompt_token_ids
        if inp.prompt_chat is not None:
            prompt = self.backend.tokenize_chat(inp.prompt_chat, inp.add_generation_prompt)
        elif prompt is None:
            prompt = self.backend.tokenize(inp.prompt_text or "")
        if fill_context and inp.max_tokens is None:
            room = min(limits.max_tokens_limit, limits.max_context_length - len(prompt))
            if room <= 0:
                raise ValidationError(
                    "prompt",
                    f"has {len(prompt)} tokens, leaving no room to generate in the context length "
                    f"{limits.max_context_length} of model {limits.name!r}",
                )
            inp.max_tokens = room
        check_prompt_length(len(prompt), effective_max_tokens(inp, limits), limits, self.bounds)
        return BackendRequest(
            request_id=inp.request_id or uuid.uuid4().hex,
            prompt_token_ids=list(prompt),
            params=to_sampling_params(inp, limits),
            model=limits.name,
            disaggregation=inp.disaggregation or self.default_disaggregation,
            arrival=arrival,
        )

    async def stream(self, breq: BackendRequest, timing: RequestTiming) -> AsyncIterator[Chunk]:
        """The request's chunks, with their text and telemetry; closing it cancels the request
        downstream. A backend that streams token ids only gets its text made here, once, by one
        incremental detokenizer per request, which also finds the stop strings: a match ends the
        stream at that token (finish_reason "stop") and cancels the rest downstream.

        The request's span is current only while the backend runs (around each of its steps), never
        across a ``yield``: a client that goes away closes this generator from another context,
        where OpenTelemetry could not detach a context attached here."""
        tel, model = self.telemetry, breq.model
        span = tel.tracer.start_span(
            "tandem.generate",
            attributes={
                "tandem.request_id": breq.request_id,
                "tandem.model": model,
                "tandem.front_door": timing.front_door,
                "tandem.prompt_tokens": len(breq.prompt_token_ids),
                "tandem.max_tokens": breq.params.max_tokens,
            },
        )
        ctx = trace.set_span_in_context(span)
        try:
            async with self.admission.slot():
                timing.last_at = timing.arrival
                text = _Text(self.backend.detokenizer(breq), breq, time.monotonic())
                agen = self.backend.generate(breq)
                try:
                    while True:
                        token = otel_context.attach(ctx)
                        try:
                            chunk = await anext(agen)
                        except StopAsyncIteration:
                            break
                        finally:
                            otel_context.detach(token)
                        last = text.apply(chunk)
                        self._record(chunk, timing, span, model)
                        yield chunk
                        if chunk.stats is not None:
                            tel.record_overhead(
                                timing.front_door, timing.router_request_s, timing.router_token_s, text.tokens
                            )
                        if last:
                            break  # a stop string ended it before the backend did: cancel the rest
                finally:
                    token = otel_context.attach(ctx)
                    try:
                        await agen.aclose()
                    finally:
                        otel_context.detach(token)
        finally:
            span.end()

    def _record(self, chunk: Chunk, timing: RequestTiming, span: trace.Span, model: str) -> None:
        tel = self.telemetry
        now = time.monotonic()
        if timing.first_at is None:
            timing.first_at = now
            tel.record_first_token(now - timing.arrival, model)
        elif chunk.token_ids:
            tel.record_token_gap((now - timing.last_at) / len(chunk.token_ids), model)
        timing.last_at = now
        st = chunk.stats
        if st is None:
            return
        tel.record_finished(
            model,
            chunk.finish_reason or "",
            st.prompt_tokens,
            st.completion_tokens,
            st.queue_time_s,
            now - timing.arrival,
        )
        tel.record_prefix(st.prompt_tokens, st.cached_tokens, st.prefill_worker)
        span.set_attribute("tandem.completion_tokens", st.completion_tokens)
        span.set_attribute("tandem.cached_tokens", st.cached_tokens)
        span.set_attribute("tandem.decode_worker", st.decode_worker)
        span.set_attribute("tandem.prefill_worker", st.prefill_worker)
        span.set_attribute("tandem.kv_bytes_moved", st.kv_bytes_moved)
        span.set_attribute("tandem.finish_reason", chunk.finish_reason or "")


class _Text:
    """One request's text at the front door: its detokenizer (None: the backend's chunks carry
    text), the tokens seen, and the stats known so far (for a stop string's early end)."""

    __slots__ = ("detok", "request", "started", "tokens", "partial")

    def __init__(self, detok: IncrementalDetokenizer | None, request: BackendRequest, started: float) -> None:
        self.detok = detok
        self.request = request
        self.started = started
        self.tokens = 0
        self.partial: ChunkStats | None = None

    def apply(self, chunk: Chunk) -> bool:
        """Give ``chunk`` its text; True when a stop string ended the request at one of its tokens
        (the chunk is cut after that token and becomes the last, with stats)."""
        if chunk.partial is not None:
            self.partial = chunk.partial
        detok = self.detok
        if detok is None:
            self.tokens += len(chunk.token_ids)
            return False
        pieces = []
        for i, t in enumerate(chunk.token_ids):
            pieces.append(detok.step(t))
            if detok.stopped:
                keep = i + 1
                del chunk.token_ids[keep:], chunk.logprobs[keep:], chunk.top_logprobs[keep:]
                chunk.text = "".join(pieces)
                self.tokens += keep
                if chunk.finish_reason is None or chunk.stats is None:
                    chunk.finish_reason = "stop"
                    chunk.stats = self._stats()
                else:
                    chunk.finish_reason, chunk.stats.completion_tokens = "stop", self.tokens
                return True
        self.tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            pieces.append(detok.flush())
        chunk.text = "".join(pieces)
        return False

    def _stats(self) -> ChunkStats:
        """The last chunk's stats when the front door ends the request: what the backend told so
        far, with the tokens counted here."""
        p = self.partial
        now = time.monotonic()
        if p is None:
            return ChunkStats(len(self.request.prompt_token_ids), self.tokens, 0, 0.0, now - self.started)
        return dataclasses.replace(p, completion_tokens=self.tokens, backend_time_s=now - self.started)
