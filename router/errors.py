"""The router's error vocabulary and its one mapping to gRPC status codes (the HTTP front door's
mapping to HTTP statuses and OpenAI error objects is router/http/errors.py).

Backends and the admission queue raise these plain exceptions (no gRPC import needed); the servicer's
single exception-mapping decorator turns them, and :class:`router.validation.ValidationError`, into
status codes. Anything else is a bug and becomes ``INTERNAL``.

    ValidationError / InvalidRequest  -> INVALID_ARGUMENT  (message starts with the field's name)
    Overloaded                        -> RESOURCE_EXHAUSTED (bounded queue full: shed, don't wait)
    BackendUnavailable                -> UNAVAILABLE        (no live worker can take the request)
    Unauthenticated                   -> UNAUTHENTICATED    (no API key, or an unknown one)
    RateLimited                       -> RESOURCE_EXHAUSTED (the caller's token bucket is empty)
"""

from __future__ import annotations

import math

import grpc

from router.validation import ValidationError


class RouterError(Exception):
    """Base of the errors a request can fail with on purpose."""


class InvalidRequest(RouterError):
    """The backend refused one request's input (e.g. the engine's own checks); other requests go on."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Overloaded(RouterError):
    """The admission queue is full: the request is shed instead of waiting without bound."""


class BackendUnavailable(RouterError):
    """No live backend worker: the engine thread died, or the backend is closed or draining."""


class Unauthenticated(RouterError):
    """No credential, or one that matches no key (the message never repeats what was presented)."""


class RateLimited(RouterError):
    """The caller's token bucket is empty (router/security.py): ``retry_after_s`` until it refills."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, at least 1 (HTTP's Retry-After)."""
        return str(max(1, math.ceil(self.retry_after_s)))


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details string a failed request is answered with."""
    if isinstance(exc, ValidationError | InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, RateLimited | Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "server overloaded"
    if isinstance(exc, BackendUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc) or "no live backend"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
