"""The OpenAI-compatible HTTP app (FastAPI) over the shared front door: :func:`build_app` is the one
place it is put together.

::

    POST /v1/completions          prompt: a string, a list of strings, token ids, lists of token ids
    POST /v1/chat/completions     messages through the model's chat template; content: string or parts
    GET  /v1/models               the served model: id, root, max_model_len
    GET  /health                  200 while a backend worker is live, else 503
    POST /tokenize, /detokenize   the model's tokenizer (vLLM's shapes)
    GET  /metrics                 Prometheus text: the tandem: families of router/metrics.py

Requests go through router/front_door.py like gRPC's: the same checks, admission queue (one per
server, shared by both front doors), backend, cancel path and telemetry. A client that goes away
releases its request: a streamed one when Starlette cancels the response stream, a non-streamed one
through :func:`_unless_disconnected`, which cancels the request when the connection closes first.

The edge (:class:`_Edge`, plain ASGI, outermost) stamps each request's arrival when its whole body
is in, before anything parses it (router overhead counts from there), and refuses bodies over
``max_request_bytes`` (413).
Outside it, :class:`router.http.guard.GuardMiddleware` admits each request by API key and rate
limit (router/security.py) before any body is read; TLS is uvicorn's (router/http/server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import InvalidRequest, RouterError
from router.front_door import FrontDoor
from router.http.errors import (
    BodyTooLarge,
    HTTPError,
    ModelNotFound,
    error_body,
    pydantic_errors,
    response_parts,
)
from router.http.generation import Generation
from router.http.guard import GuardMiddleware
from router.http.openai import Plan, chat_messages, chat_plan, completion_plan, model_card
from router.http.options import HttpOptions
from router.http.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from router.metrics import CONTENT_TYPE
from router.validation import ValidationError

__all__ = ["HttpOptions", "build_app"]
ARRIVAL = "tandem.arrival"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it; never reaches the client
T = TypeVar("T")


def build_app(front: FrontDoor, options: HttpOptions) -> FastAPI:
    """The HTTP app of one server over its front door."""
    app = FastAPI(title="Tandem", summary="OpenAI-compatible API of a Tandem router", version="1")
    api = _Api(front, options)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"], response_model=None)
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"], response_model=None)
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"])
    app.add_api_route("/metrics", api.metrics, methods=["GET"], response_model=None)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        status, body, headers = response_parts(exc)
        return JSONResponse(body, status, headers=headers)

    async def bad_body(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return await refused(request, pydantic_errors(list(exc.errors())))

    async def http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, HTTPError):  # FastAPI wraps what the body reader raised
            return await refused(request, exc.__cause__)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        body = error_body(
            f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error", None, kind
        )
        return JSONResponse(body, exc.status_code, headers=dict(exc.headers or {}))

    app.add_exception_handler(RequestValidationError, bad_body)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    for cls in (HTTPError, ValidationError, RouterError):
        app.add_exception_handler(cls, refused)
    app.add_middleware(_Edge, max_request_bytes=options.max_request_bytes)
    app.add_middleware(GuardMiddleware, guard=front.guard)  # outermost: added last
    return app


class _Api:
    def __init__(self, front: FrontDoor, options: HttpOptions) -> None:
        self.front = front
        self.options = options
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        return await self._generate(completion_plan(body, self.front.bounds), request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        return await self._generate(chat_plan(body, self.front.bounds), request)

    async def models(self) -> dict[str, Any]:
        lim = self.front.limits
        card = model_card(lim.name, self.options.model_root or lim.name, lim.max_context_length, self.created)
        return {"object": "list", "data": [card]}

    async def health(self) -> Response:
        if self.front.backend.load().alive and not self.front.admission.closed:
            return Response(status_code=200)
        body = error_body("no live backend worker", "service_unavailable_error", None, "backend_unavailable")
        return JSONResponse(body, 503)

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        backend = self.front.backend
        try:
            if body.messages is not None:
                ids = backend.tokenize_chat(chat_messages(body.messages), body.add_generation_prompt)
            elif body.prompt is not None:
                ids = (
                    backend.tokenize(body.prompt)
                    if body.add_special_tokens
                    else backend.tokenize(body.prompt, add_special_tokens=False)
                )
            else:
                raise ValidationError("prompt", "give prompt or messages")
        except InvalidRequest as e:
            raise ValidationError(
                "messages" if e.field.startswith("prompt.chat") else "prompt", e.message
            ) from None
        out: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": self.front.limits.max_context_length,
            "tokens": ids,
        }
        if body.return_token_strs:
            out["token_strs"] = [self.token_text(t) for t in ids]
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        vocab = self.front.limits.vocab_size
        bad = next((t for t in body.tokens if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise ValidationError("tokens", f"token id {bad} is outside the vocabulary [0, {vocab})")
        return {"prompt": self.front.backend.detokenize(body.tokens)}

    async def metrics(self) -> Response:
        prom = self.front.telemetry.prometheus
        if prom is None:
            raise HTTPError(
                404, "metrics: this server exports no Prometheus metrics", "invalid_request_error"
            )
        return Response(prom.render(), media_type=CONTENT_TYPE)

    # -- internals ------------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.front.backend.detokenize(
                [token_id], skip_special_tokens=False
            )
        return text

    def _check_model(self, name: str | None) -> None:
        if name and name not in self.front.models:
            raise ModelNotFound(name, sorted(self.front.models))

    async def _generate(self, plan: Plan, request: Request) -> Response:
        arrival = request.scope.get(ARRIVAL) or time.monotonic()
        gen = Generation(self.front, plan, arrival, self.token_text)
        if plan.stream:
            return EventSourceResponse(
                gen.events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        result = await _unless_disconnected(request, gen.complete)
        if result is None:  # nobody to answer: uvicorn drops what is sent to a closed connection
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(result)


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """``work()``, or None once it was cancelled because the client disconnected first (its backend
    streams close, so its KV blocks come back)."""
    task = asyncio.ensure_future(work())

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return None
    return task.result()


class _Edge:
    """Plain ASGI, outermost: stamps the arrival time (the body complete); a body over the limit is a 413."""

    def __init__(self, app: ASGIApp, max_request_bytes: int) -> None:
        self.app = app
        self.limit = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL] = time.monotonic()
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            status, body, headers = response_parts(BodyTooLarge(self.limit))
            await JSONResponse(body, status, headers=headers)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a chunked body without a length: caught while reading it
                    raise BodyTooLarge(self.limit)
                if not message.get("more_body", False):
                    # the whole request is here (as gRPC's handler gets a whole message): the router's
                    # time counts from now, not while the client was still sending
                    scope[ARRIVAL] = time.monotonic()
            return message

        await self.app(scope, counted, send)
