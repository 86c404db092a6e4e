"""The ``tandem.v1.Tandem`` gRPC servicer: validate, delegate to a Backend, convert. Nothing else.

Generate: wire message -> ``GenerateInput`` -> the shared front door (router/front_door.py: checks,
tokenizing, admission slot, ``backend.generate``, telemetry) -> one GenerateResponse per chunk,
usage and timings on the last. Every failure leaves through :func:`map_errors`, the one place
exceptions become status codes (see :mod:`router.errors`). A cancelled or expired call closes the
backend stream, which releases the request downstream.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.admission import AdmissionQueue
from router.backend import Backend, Chunk
from router.errors import status_for
from router.front_door import FrontDoor, RequestTiming
from router.telemetry import Telemetry
from router.validation import GenerateInput, ValidationError

_DISAGG_FROM_WIRE = {
    pb.DISAGGREGATION_UNSPECIFIED: None,
    pb.DISAGGREGATION_AUTO: "auto",
    pb.DISAGGREGATION_ALWAYS: "always",
    pb.DISAGGREGATION_NEVER: "never",
}
_DISAGG_TO_WIRE = {v: k for k, v in _DISAGG_FROM_WIRE.items() if v}
_FINISH_TO_WIRE = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "abort": pb.FINISH_REASON_CANCELLED,
}


def map_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions of a unary or server-streaming handler into gRPC statuses (the one place)."""

    async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code, details = status_for(exc)
        await context.abort(code, details)

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async with aclosing(fn(self, request, context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await _abort(context, e)

        return stream

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, e)

    return unary


def to_input(req: pb.GenerateRequest) -> GenerateInput:
    """The wire request as plain values; unset optional fields become ``None``."""
    s = req.sampling
    kind = req.WhichOneof("prompt")
    return GenerateInput(
        model=req.model,
        prompt_text=req.text if kind == "text" else None,
        prompt_token_ids=list(req.token_ids.ids) if kind == "token_ids" else None,
        prompt_chat=[{"role": m.role, "content": m.content} for m in req.chat.messages]
        if kind == "chat"
        else None,
        add_generation_prompt=req.chat.add_generation_prompt
        if req.chat.HasField("add_generation_prompt")
        else True,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p if s.HasField("top_p") else None,
        min_p=s.min_p,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        request_id=req.request_id,
        disaggregation=_DISAGG_FROM_WIRE.get(req.disaggregation, f"<enum {req.disaggregation}>"),
    )


def _to_response(request_id: str, chunk: Chunk, with_logprobs: bool) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=chunk.token_ids, text=chunk.text)
    if with_logprobs:
        for tok, lp, top in zip(chunk.token_ids, chunk.logprobs, chunk.top_logprobs, strict=False):
            msg.logprobs.append(
                pb.TokenLogprobs(
                    token_id=tok,
                    logprob=lp if lp is not None else 0.0,
                    top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in (top or [])],
                )
            )
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH_TO_WIRE.get(chunk.finish_reason, pb.FINISH_REASON_ERROR)
    return msg


class TandemServicer(pb_grpc.TandemServicer):
    def __init__(
        self,
        backend: Backend,
        admission: AdmissionQueue,
        telemetry: Telemetry | None = None,
        *,
        default_disaggregation: str = "never",
        routing_policy: str = "local",
        version: str = "0",
        front_door: FrontDoor | None = None,
    ) -> None:
        self.backend = backend
        self.admission = admission
        self.front = front_door or FrontDoor(
            backend, admission, telemetry, default_disaggregation=default_disaggregation
        )
        self.telemetry = self.front.telemetry
        self.default_disaggregation = default_disaggregation
        self.routing_policy = routing_policy
        self.version = version

    @map_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        timing = RequestTiming(time.monotonic(), "grpc")
        breq = self.front.prepare(to_input(request), timing.arrival)
        with_logprobs = breq.params.logprobs is not None
        timing.prepared()
        async for chunk in self.front.stream(breq, timing):
            msg = _to_response(breq.request_id, chunk, with_logprobs)
            timing.handed(chunk)
            st = chunk.stats
            if st is not None:
                msg.usage.CopyFrom(
                    pb.Usage(
                        prompt_tokens=st.prompt_tokens,
                        completion_tokens=st.completion_tokens,
                        cached_tokens=st.cached_tokens,
                    )
                )
                msg.timings.CopyFrom(
                    pb.Timings(
                        queue_time_s=st.queue_time_s,
                        time_to_first_token_s=timing.ttft_s,
                        total_time_s=time.monotonic() - timing.arrival,
                        prefill_worker=st.prefill_worker,
                        decode_worker=st.decode_worker,
                        kv_bytes_moved=st.kv_bytes_moved,
                        disaggregated=st.disaggregated,
                        backend_time_s=st.backend_time_s,
                        router_request_time_s=timing.router_request_s,
                        router_token_time_s=timing.router_token_s,
                    )
                )
            yield msg

    @map_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        info = self.backend.model_info()
        lim = info.limits
        if request.model and request.model != lim.name:
            raise ValidationError("model", f"unknown model {request.model!r}; served: {[lim.name]}")
        return pb.GetModelInfoResponse(
            models=[
                pb.ModelInfo(
                    name=lim.name,
                    fingerprint=info.fingerprint,
                    max_context_length=lim.max_context_length,
                    max_tokens_limit=lim.max_tokens_limit,
                    vocab_size=lim.vocab_size or 0,
                    block_size=info.block_size,
                    dtype=info.dtype,
                    eos_token_ids=list(info.eos_token_ids),
                )
            ]
        )

    @map_errors
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        load = self.backend.load()
        return pb.GetServerInfoResponse(
            version=self.version,
            routing_policy=self.routing_policy,
            disaggregation=_DISAGG_TO_WIRE.get(self.default_disaggregation, pb.DISAGGREGATION_UNSPECIFIED),
            workers=[
                pb.WorkerInfo(
                    worker_id=w.worker_id,
                    role=w.role,
                    node=w.node,
                    queue_tokens=w.queue_tokens,
                    running_seqs=w.running,
                    waiting_seqs=w.waiting,
                    used_blocks=w.used_blocks,
                    total_blocks=w.total_blocks,
                )
                for w in load.workers
            ]
            if load.alive
            else [],
            max_queue=self.admission.max_queue,
            max_concurrency=self.admission.max_concurrency,
            in_flight=self.admission.in_flight,
            queued=self.admission.queued,
        )
