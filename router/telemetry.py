"""OpenTelemetry for the router: one tracer and one meter, exporters chosen by configuration.

Exporters: ``none`` (no-op API objects, no cost), ``console`` (stdout), ``otlp`` (when
``opentelemetry-exporter-otlp`` is installed; otherwise a warning and none), ``memory`` (tests read
``span_exporter.get_finished_spans()`` and ``metric_reader.get_metrics_data()``).

The router opens one span per Generate request (``tandem.generate``) with the request's id, model,
prompt and completion token counts, workers and finish reason, and records three histograms:
``tandem.ttft`` (s), ``tandem.inter_token_latency`` (s), ``tandem.queue_time`` (s). Providers are
owned by the returned :class:`Telemetry`, not installed globally, so several servers (tests) coexist.
Context propagation into Ray calls comes with the prefill/decode pools.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace

log = logging.getLogger(__name__)
EXPORTERS = ("none", "console", "otlp", "memory")


@dataclass(slots=True)
class Telemetry:
    tracer: trace.Tracer
    ttft: Any  # Histogram
    inter_token_latency: Any
    queue_time: Any
    exporter: str = "none"
    span_exporter: Any = None  # InMemorySpanExporter with exporter="memory"
    metric_reader: Any = None  # InMemoryMetricReader with exporter="memory"
    _providers: tuple[Any, ...] = ()

    def shutdown(self) -> None:
        for p in self._providers:
            try:
                p.shutdown()
            except Exception:  # exporting at exit must never fail a shutdown
                log.debug("telemetry provider shutdown failed", exc_info=True)
        self._providers = ()


def _instruments(meter: metrics.Meter) -> tuple[Any, Any, Any]:
    return (
        meter.create_histogram("tandem.ttft", unit="s", description="time to first token"),
        meter.create_histogram("tandem.inter_token_latency", unit="s", description="time between chunks"),
        meter.create_histogram("tandem.queue_time", unit="s", description="arrival to start of prefill"),
    )


def setup_telemetry(
    exporter: str = "none", otlp_endpoint: str = "http://127.0.0.1:4317", service_name: str = "tandem-router"
) -> Telemetry:
    if exporter not in EXPORTERS:
        raise ValueError(f"telemetry exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("tracing exporter 'otlp' needs opentelemetry-exporter-otlp; tracing is off")
            exporter = "none"
    if exporter == "none":
        meter = metrics.NoOpMeterProvider().get_meter("tandem.router")
        return Telemetry(trace.NoOpTracer(), *_instruments(meter), exporter="none")

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        InMemoryMetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    span_exporter = reader = None
    if exporter == "memory":
        span_exporter = InMemorySpanExporter()
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        reader = InMemoryMetricReader()
        metric_reader: Any = reader
    elif exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        metric_reader = PeriodicExportingMetricReader(ConsoleMetricExporter(), export_interval_millis=60_000)
    else:  # otlp
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
        metric_reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint))
    meter_provider = MeterProvider(resource=resource, metric_readers=[metric_reader])
    return Telemetry(
        tracer_provider.get_tracer("tandem.router"),
        *_instruments(meter_provider.get_meter("tandem.router")),
        exporter=exporter,
        span_exporter=span_exporter,
        metric_reader=reader,
        _providers=(tracer_provider, meter_provider),
    )
