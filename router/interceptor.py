"""The gRPC front door's guard: every call is admitted by router/security.py's :class:`Guard`
before its handler runs (API key from the ``authorization`` metadata, the caller's rate limit).

Refusals leave through router/errors.py's ``status_for`` like the servicer's own errors:
``UNAUTHENTICATED`` (no key, a wrong key), ``RESOURCE_EXHAUSTED`` (rate limit). Health checks
(``grpc.health.v1.Health``) pass without a key when ``allow_unauthenticated_health`` is set.
The check runs inside the call (it needs the peer's address, known only there), wrapping the
handler of whichever kind the method is.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from router.errors import RouterError, status_for
from router.security import Guard

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class GuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        health = method.startswith(HEALTH_PREFIX)
        credential = _metadata(handler_call_details, "authorization")
        guard = self.guard

        async def admit(context: grpc.aio.ServicerContext) -> None:
            try:
                await guard.admit(credential, context.peer(), health=health)
            except RouterError as e:
                code, details = status_for(e)
                await context.abort(code, details)

        if handler.unary_unary is not None:
            wrap, inner = grpc.unary_unary_rpc_method_handler, handler.unary_unary
        elif handler.unary_stream is not None:
            wrap, inner = grpc.unary_stream_rpc_method_handler, handler.unary_stream
        elif handler.stream_unary is not None:
            wrap, inner = grpc.stream_unary_rpc_method_handler, handler.stream_unary
        else:
            wrap, inner = grpc.stream_stream_rpc_method_handler, handler.stream_stream
        return wrap(
            _guarded(inner, admit),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _guarded(inner: Any, admit: Callable[[Any], Awaitable[None]]) -> Any:
    """``inner`` with ``admit(context)`` first, of the same shape: a streaming handler is an async
    generator (the servicer's) or a coroutine that writes to its context (health's Watch)."""
    if inspect.isasyncgenfunction(inner):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await admit(context)
            async for response in inner(request, context):
                yield response

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        return await inner(request, context)

    return call


def _metadata(details: grpc.HandlerCallDetails, name: str) -> str | None:
    for key, value in details.invocation_metadata or ():  # type: ignore[attr-defined]
        if key == name:
            return value if isinstance(value, str) else value.decode()
    return None
