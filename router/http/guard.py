"""The HTTP front door's guard (plain ASGI, outermost): every request is admitted by
router/security.py's :class:`Guard` before its body is read: the ``Authorization: Bearer KEY``
header, the caller's rate limit. Refusals are router/http/errors.py's: 401 with
``WWW-Authenticate: Bearer``, 429 with ``Retry-After``, each an OpenAI error object.
``GET /health`` passes without a key when ``allow_unauthenticated_health`` is set.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from router.errors import RouterError
from router.http.errors import response_parts
from router.security import Guard

HEALTH_PATHS = frozenset({"/health"})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.guard.open:
            await self.app(scope, receive, send)
            return
        credential = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None
        )
        client = scope.get("client")
        try:
            await self.guard.admit(
                credential, client[0] if client else "", health=scope["path"] in HEALTH_PATHS
            )
        except RouterError as e:
            status, body, headers = response_parts(e)
            await JSONResponse(body, status, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)
