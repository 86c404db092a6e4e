"""The HTTP front door's one mapping from exceptions to statuses and OpenAI error objects.

::

    ValidationError / InvalidRequest, a body of the wrong shape   400 invalid_request_error (param: the field)
    ModelNotFound, an unknown path                                 404 (code model_not_found / not_found)
    a body over the size limit                                     413 request_too_large
    Unauthenticated (no API key, a wrong one)                      401 invalid_api_key, WWW-Authenticate
    RateLimited (the caller's token bucket is empty)               429 rate_limit_exceeded, Retry-After
    Overloaded (the admission queue is full)                       429 server_overloaded, Retry-After
    BackendUnavailable (no live worker, draining)                  503 backend_unavailable, Retry-After
    anything else                                                  500 server_error (a bug)

Every body is ``{"error": {"message", "type", "param", "code"}}``; the message starts with the
field's name, as gRPC's details do. A failure after a stream has started cannot change the status:
it is sent as one ``data: {"error": ...}`` event (:func:`error_event`) before ``data: [DONE]``.
"""

from __future__ import annotations

import logging
from typing import Any

from router.errors import BackendUnavailable, InvalidRequest, Overloaded, RateLimited, Unauthenticated
from router.validation import ValidationError

log = logging.getLogger(__name__)
RETRY_AFTER_S = "1"
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class HTTPError(Exception):
    """A refusal with its status and OpenAI error fields."""

    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class ModelNotFound(HTTPError):
    def __init__(self, name: str, served: list[str]) -> None:
        super().__init__(
            404,
            f"model: the model {name!r} does not exist; served: {served}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


class BodyTooLarge(HTTPError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body over {limit} bytes", "invalid_request_error", None, "request_too_large"
        )


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(exc: BaseException) -> HTTPError:
    """The HTTPError a failed request is answered with."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ValidationError | InvalidRequest):
        return HTTPError(400, str(exc), "invalid_request_error", exc.field, "invalid_value")
    if isinstance(exc, Unauthenticated):
        return HTTPError(401, str(exc), "authentication_error", None, "invalid_api_key")
    if isinstance(exc, RateLimited):
        return HTTPError(429, str(exc), "rate_limit_error", None, "rate_limit_exceeded")
    if isinstance(exc, Overloaded):
        return HTTPError(429, str(exc) or "server overloaded", "rate_limit_error", None, "server_overloaded")
    if isinstance(exc, BackendUnavailable):
        return HTTPError(
            503, str(exc) or "no live backend", "service_unavailable_error", None, "backend_unavailable"
        )
    log.error("request failed", exc_info=exc)
    return HTTPError(
        500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None, "internal_error"
    )


def response_parts(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for a failed request."""
    e = http_error(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if e.status in (429, 503) else {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = exc.retry_after_header
    if e.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tandem"'
    return e.status, error_body(e.message, e.type, e.param, e.code), headers


def error_event(exc: BaseException) -> dict[str, Any]:
    """A mid-stream failure, as the data of one SSE event (the status line went out already)."""
    e = http_error(exc)
    body = error_body(e.message, e.type, e.param, e.code)
    body["error"]["status"] = e.status
    return body


def pydantic_errors(errors: list[dict[str, Any]]) -> HTTPError:
    """A body of the wrong shape (FastAPI's RequestValidationError): a 400 naming the first field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ""
    for p in loc:
        if p in _TYPE_TAGS or not p.replace("_", "").isalnum():
            break  # pydantic's tag of a union member ("str", "list[int]"), not a field
        param += f"[{p}]" if p.isdigit() else (f".{p}" if param else p)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return HTTPError(
        400, f"{param or 'body'}: {msg}{more}", "invalid_request_error", param or None, "invalid_value"
    )
