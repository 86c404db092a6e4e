"""What the coordinator makes of a worker's failure: the one line a client may read, the error kind
a front door maps to a status code, the span event of a failover, and observers that must never
fail a request. Pure (OpenTelemetry's API only)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from opentelemetry import trace

from kv_transfer.protocol import NoRoomError
from pool_runtime.handoff import InvalidWorkRequest, WorkerDied

log = logging.getLogger(__name__)


def notify(observer: Callable[..., None] | None, *args: object) -> None:
    """Tell an observer (metrics) about a handoff; an observer must never fail the request."""
    if observer is not None:
        try:
            observer(*args)
        except Exception:
            log.warning("handoff observer %r failed", observer, exc_info=True)


def failure_reason(e: BaseException) -> str:
    return "worker_died" if isinstance(e, WorkerDied) else "transfer"


def event(name: str, worker_id: str, e: BaseException, **attrs: int) -> None:
    """A failover on the request's current span (a no-op when it is not recorded)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, {"tandem.worker": worker_id, "tandem.error": str(e), **attrs})


def brief(e: BaseException) -> str:
    """What a client may read of a worker's failure: the original exception's message (Ray's
    re-raised form carries the worker's whole traceback, with colour codes) on one line."""
    cause = getattr(e, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else e)
    text = _ANSI.sub("", text).strip()
    return text.splitlines()[-1].strip() if text else type(e).__name__


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_kind(e: BaseException) -> str:
    """TokenChunk.error_kind of a failure (Ray re-raises a worker's exception as its own class)."""
    if isinstance(e, NoRoomError):
        return "overloaded"
    if isinstance(e, InvalidWorkRequest):
        return "invalid"
    return "failed"
