"""Tracing across the pools: the W3C trace context every Ray call carries, and a worker's tracer.

The carrier is a small ``{"traceparent": ...}`` dict (:func:`inject_context`, ``None`` when there is
no sampled span, so untraced calls carry nothing) passed as an extra argument of the actor calls;
the actor opens its spans under :func:`extract_context`, so they join the request's trace. Workers
build their tracer with :func:`setup_worker_tracing` from the same :class:`TelemetryConfig` as the
router (router/telemetry.py builds the router's tracer and meter on the helpers here).

Exporters: ``none`` (a no-op tracer: callers skip span work), ``console``, ``otlp`` (when its
package is installed), ``memory`` (tests: a worker's finished spans come back as plain
:class:`SpanRecord` values from ``take_spans()``, over Ray).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

log = logging.getLogger(__name__)
EXPORTERS = ("none", "console", "otlp", "memory")
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4317"
MAX_KEPT_SPANS = 10_000  # a worker's in-memory exporter (tests) keeps at most this many undrained


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What the router and every worker export with (``router.tracing`` in the deployment YAML)."""

    exporter: str = "none"
    otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"telemetry exporter must be one of {EXPORTERS}, got {self.exporter!r}")


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """A finished span as plain values: what a worker's ``take_spans()`` returns over Ray."""

    name: str
    trace_id: int
    span_id: int
    parent_span_id: int | None
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str  # "UNSET" | "OK" | "ERROR"
    service: str

    @classmethod
    def from_span(cls, span: Any) -> SpanRecord:
        """From an SDK ``ReadableSpan``."""
        ctx, parent = span.context, span.parent
        return cls(
            span.name,
            ctx.trace_id,
            ctx.span_id,
            parent.span_id if parent is not None else None,
            span.start_time or 0,
            span.end_time or 0,
            dict(span.attributes or {}),
            span.status.status_code.name,
            str(span.resource.attributes.get("service.name", "")),
        )


# -- trace context across processes -------------------------------------------------------------------
def inject_context() -> dict[str, str] | None:
    """The current span's W3C trace context as a carrier dict; ``None`` when nothing is traced."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: dict[str, str] | None) -> Context | None:
    """The parent context a worker opens its spans under (``None``: a new trace)."""
    return propagate.extract(carrier) if carrier else None


# -- exporters ----------------------------------------------------------------------------------------
def resolve_exporter(exporter: str) -> str:
    """``exporter`` as it will run: ``otlp`` without its package installed falls back to ``none``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"telemetry exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "otlp":
        try:
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        except ImportError:
            log.warning("tracing exporter 'otlp' needs opentelemetry-exporter-otlp; tracing is off")
            return "none"
    return exporter


def make_tracer_provider(
    exporter: str, otlp_endpoint: str, resource: Any, memory: Any = None
) -> tuple[Any, Any]:
    """(TracerProvider, its in-memory span exporter or None) for a resolved, enabled exporter;
    ``memory`` is the exporter to use for ``memory`` (default: the SDK's InMemorySpanExporter)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=resource)
    if exporter == "memory":
        if memory is None:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        return provider, memory
    if exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:  # otlp
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider, None


# -- a worker -----------------------------------------------------------------------------------------
@dataclass(slots=True)
class WorkerTracing:
    """A worker process's tracer. ``enabled`` False: a no-op tracer, and callers skip span work."""

    tracer: trace.Tracer
    enabled: bool = False
    span_exporter: Any = None  # InMemorySpanExporter with exporter="memory"
    _provider: Any = None

    def take_spans(self) -> list[SpanRecord]:
        """The spans finished since the last call (``memory`` only; else empty)."""
        if self.span_exporter is None:
            return []
        return [SpanRecord.from_span(s) for s in self.span_exporter.drain()]

    def shutdown(self) -> None:
        if self._provider is not None:
            try:
                self._provider.shutdown()
            except Exception:  # flushing at exit must never fail a close
                log.debug("worker tracer shutdown failed", exc_info=True)
            self._provider = None


def setup_worker_tracing(config: TelemetryConfig | None, service_name: str, worker_id: str) -> WorkerTracing:
    exporter = resolve_exporter(config.exporter) if config is not None else "none"
    if exporter == "none":
        return WorkerTracing(trace.NoOpTracer())
    from opentelemetry.sdk.resources import Resource

    assert config is not None
    resource = Resource.create({"service.name": service_name, "tandem.worker_id": worker_id})
    provider, memory = make_tracer_provider(exporter, config.otlp_endpoint, resource, _draining_exporter())
    return WorkerTracing(provider.get_tracer(service_name), True, memory, provider)


def _draining_exporter() -> Any:
    """An in-memory span exporter whose ``drain`` hands each finished span out once (bounded: a
    worker nobody drains keeps only its last ``MAX_KEPT_SPANS``)."""
    import threading
    from collections import deque

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class DrainingExporter(SpanExporter):
        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._spans: deque[Any] = deque(maxlen=MAX_KEPT_SPANS)

        def export(self, spans: Any) -> SpanExportResult:
            with self._lock:
                self._spans.extend(spans)
            return SpanExportResult.SUCCESS

        def drain(self) -> list[Any]:
            with self._lock:
                out = list(self._spans)
                self._spans.clear()
            return out

    return DrainingExporter()
