"""OpenTelemetry for Tandem: the router's tracer and meter, each worker's tracer, and the W3C trace
context that joins them into one trace per request.

::

    router process                       worker processes (Ray actors)
    tandem.generate (servicer) ─────┬─── tandem.route (pools backend, same process)
                          carrier ──┼──▶ tandem.kv_reserve   decode actor: blocks held for the KV
                          carrier ──┼──▶ tandem.prefill      prefill actor: cached / computed tokens
                                    │      └─ tandem.kv_transfer   first layer posted -> commit ack
                          carrier ──┴──▶ tandem.decode       decode actor: start -> last token taken

The carrier is a small ``{"traceparent": ...}`` dict (:func:`inject_context`, ``None`` when there is
no sampled span, so untraced calls carry nothing) passed as an extra argument of the actor calls;
the actor opens its spans under :func:`extract_context`. Workers build their tracer with
:func:`setup_worker_tracing` from the same :class:`TelemetryConfig` as the router.

Exporters: ``none`` (no-op API objects: no span, no instrument, no per-token work), ``console``
(stdout), ``otlp`` (when ``opentelemetry-exporter-otlp`` is installed; otherwise a warning and
none), ``memory`` (tests: the router's ``span_exporter`` / ``metric_reader``, a worker's
``take_spans()``). Providers are owned by the returned objects, not installed globally, so several
servers (tests) coexist in one process.

Router metrics: ``tandem.ttft``, ``tandem.inter_token_latency``, ``tandem.queue_time`` (s);
``tandem.kv_transfer.bytes`` (counter), ``tandem.kv_transfer.duration`` (s) and
``tandem.kv_transfer.throughput`` (GB/s) per committed handoff; ``tandem.prefix.prompt_tokens`` and
``tandem.prefix.cached_tokens`` (counters: hit rate = cached / prompt); observable gauges
``tandem.tier.used_blocks`` and ``tandem.tier.occupancy`` per worker and tier (G1 / G2 / G3), read
from the sources registered with :meth:`Telemetry.add_tier_source` when the reader collects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context

log = logging.getLogger(__name__)
EXPORTERS = ("none", "console", "otlp", "memory")
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4317"
# Histogram buckets: the SDK's defaults (0, 5, 10, 25, ...) put every latency in the first bucket.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_KEPT_SPANS = 10_000  # a worker's in-memory exporter (tests) keeps at most this many undrained
GBPS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 400.0)


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What the router and every worker export with (``router.tracing`` in the deployment YAML)."""

    exporter: str = "none"
    otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"telemetry exporter must be one of {EXPORTERS}, got {self.exporter!r}")


@dataclass(frozen=True, slots=True)
class TierUsage:
    """One tier of one worker, as the tier gauges report it."""

    worker_id: str
    role: str
    tier: str  # "G1" | "G2" | "G3"
    used_blocks: int
    occupancy: float  # 0..1 of the tier's capacity (G3: bytes)


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


# -- the router ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Telemetry:
    tracer: trace.Tracer
    ttft: Any  # Histogram
    inter_token_latency: Any
    queue_time: Any
    kv_transfer_bytes: Any = None  # Counter
    kv_transfer_duration: Any = None  # Histogram
    kv_transfer_throughput: Any = None  # Histogram
    prefix_prompt_tokens: Any = None  # Counter
    prefix_cached_tokens: Any = None  # Counter
    exporter: str = "none"
    span_exporter: Any = None  # InMemorySpanExporter with exporter="memory"
    metric_reader: Any = None  # InMemoryMetricReader with exporter="memory"
    tier_sources: list[Callable[[], Iterable[TierUsage]]] = field(default_factory=list)
    _providers: tuple[Any, ...] = ()

    @property
    def enabled(self) -> bool:
        """False for ``none``: callers skip work whose only use is a metric."""
        return self.exporter != "none"

    def record_transfer(self, kv_bytes: int, seconds: float, prefill_worker: str, decode_worker: str) -> None:
        """One committed handoff: ``kv_bytes`` moved, first layer posted -> commit ack in ``seconds``."""
        attrs = {"tandem.prefill_worker": prefill_worker, "tandem.decode_worker": decode_worker}
        self.kv_transfer_bytes.add(kv_bytes, attrs)
        if seconds > 0 and kv_bytes > 0:
            self.kv_transfer_duration.record(seconds, attrs)
            self.kv_transfer_throughput.record(kv_bytes / seconds / 1e9, attrs)

    def record_prefix(self, prompt_tokens: int, cached_tokens: int, worker: str) -> None:
        """One request's prompt: ``cached_tokens`` of ``prompt_tokens`` came from ``worker``'s cache."""
        attrs = {"tandem.worker": worker}
        self.prefix_prompt_tokens.add(prompt_tokens, attrs)
        self.prefix_cached_tokens.add(cached_tokens, attrs)

    def add_tier_source(self, source: Callable[[], Iterable[TierUsage]]) -> None:
        self.tier_sources.append(source)

    def remove_tier_source(self, source: Callable[[], Iterable[TierUsage]]) -> None:
        if source in self.tier_sources:
            self.tier_sources.remove(source)

    def _tiers(self) -> Iterator[TierUsage]:
        for source in list(self.tier_sources):
            try:
                yield from source()
            except Exception:  # a metric collection must never fail because one source did
                log.debug("tier source failed", exc_info=True)

    def shutdown(self) -> None:
        for p in self._providers:
            try:
                p.shutdown()
            except Exception:  # exporting at exit must never fail a shutdown
                log.debug("telemetry provider shutdown failed", exc_info=True)
        self._providers = ()


def _resolve(exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise ValueError(f"telemetry exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "otlp":
        try:
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        except ImportError:
            log.warning("tracing exporter 'otlp' needs opentelemetry-exporter-otlp; tracing is off")
            return "none"
    return exporter


def _tracer_provider(exporter: str, otlp_endpoint: str, resource: Any, memory: Any = None) -> tuple[Any, Any]:
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


def _build(tracer: trace.Tracer, meter: metrics.Meter, **kwargs: Any) -> Telemetry:
    def hist(name: str, unit: str, description: str, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> Any:
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
        )

    tel = Telemetry(
        tracer,
        hist("tandem.ttft", "s", "time to first token"),
        hist("tandem.inter_token_latency", "s", "time between chunks, per token"),
        hist("tandem.queue_time", "s", "arrival to start of prefill"),
        meter.create_counter("tandem.kv_transfer.bytes", unit="By", description="KV bytes moved to decode"),
        hist("tandem.kv_transfer.duration", "s", "first layer posted to commit ack"),
        hist("tandem.kv_transfer.throughput", "GB/s", "KV bytes / transfer duration", GBPS_BUCKETS),
        meter.create_counter("tandem.prefix.prompt_tokens", description="prompt tokens of finished requests"),
        meter.create_counter("tandem.prefix.cached_tokens", description="prompt tokens served from a cache"),
        **kwargs,
    )

    def used(options: Any) -> Iterator[metrics.Observation]:
        for t in tel._tiers():
            yield metrics.Observation(t.used_blocks, _tier_attrs(t))

    def occupancy(options: Any) -> Iterator[metrics.Observation]:
        for t in tel._tiers():
            yield metrics.Observation(t.occupancy, _tier_attrs(t))

    meter.create_observable_gauge("tandem.tier.used_blocks", [used], description="blocks held per tier")
    meter.create_observable_gauge(
        "tandem.tier.occupancy", [occupancy], unit="1", description="used / capacity"
    )
    return tel


def _tier_attrs(t: TierUsage) -> dict[str, str]:
    return {"tandem.worker": t.worker_id, "tandem.role": t.role, "tandem.tier": t.tier}


def setup_telemetry(
    exporter: str = "none", otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT, service_name: str = "tandem-router"
) -> Telemetry:
    exporter = _resolve(exporter)
    if exporter == "none":
        return _build(trace.NoOpTracer(), metrics.NoOpMeterProvider().get_meter("tandem.router"))

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        InMemoryMetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": service_name})
    tracer_provider, span_exporter = _tracer_provider(exporter, otlp_endpoint, resource)
    reader = None
    if exporter == "memory":
        reader = InMemoryMetricReader()
        metric_reader: Any = reader
    elif exporter == "console":
        metric_reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=60_000)
    else:  # otlp
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        metric_reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint))
    meter_provider = MeterProvider(resource=resource, metric_readers=[metric_reader])
    return _build(
        tracer_provider.get_tracer("tandem.router"),
        meter_provider.get_meter("tandem.router"),
        exporter=exporter,
        span_exporter=span_exporter,
        metric_reader=reader,
        _providers=(tracer_provider, meter_provider),
    )


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
    exporter = _resolve(config.exporter) if config is not None else "none"
    if exporter == "none":
        return WorkerTracing(trace.NoOpTracer())
    from opentelemetry.sdk.resources import Resource

    assert config is not None
    resource = Resource.create({"service.name": service_name, "tandem.worker_id": worker_id})
    provider, memory = _tracer_provider(exporter, config.otlp_endpoint, resource, _draining_exporter())
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
