"""OpenTelemetry for the router: its tracer and meter, and the metrics it records per request.

The trace context that joins a request's spans across processes, and each worker's tracer, live in
pool_runtime/tracing.py (the workers import that, never the router)::

    router process                       worker processes (Ray actors)
    tandem.generate (servicer) ─────┬─── tandem.route (pools backend, same process)
                          carrier ──┼──▶ tandem.kv_reserve   decode actor: blocks held for the KV
                          carrier ──┼──▶ tandem.prefill      prefill actor: cached / computed tokens
                                    │      └─ tandem.kv_transfer   first layer posted -> commit ack
                          carrier ──┴──▶ tandem.decode       decode actor: start -> last token taken

Exporters (pool_runtime.tracing.EXPORTERS): ``none`` (no-op API objects: no span, no instrument, no
per-token work), ``console`` (stdout), ``otlp`` (when ``opentelemetry-exporter-otlp`` is installed;
otherwise a warning and none), ``memory`` (tests: the router's ``span_exporter`` /
``metric_reader``). Providers are owned by the returned objects, not installed globally, so several
servers (tests) coexist in one process.

Every measurement is taken once, by a ``record_*`` method, and goes to the OpenTelemetry instruments
and, when the server exposes ``GET /metrics`` (``setup_telemetry(prometheus=True)``), to the
``tandem:`` Prometheus families of router/metrics.py (named after vLLM's).

Router metrics: ``tandem.ttft``, ``tandem.inter_token_latency``, ``tandem.queue_time``,
``tandem.e2e_latency`` (s); ``tandem.generation_tokens``, ``tandem.kv_transfer.failures`` and
``tandem.disaggregation.decisions`` (counters);
``tandem.kv_transfer.bytes`` (counter), ``tandem.kv_transfer.duration`` (s) and
``tandem.kv_transfer.throughput`` (GB/s) per committed handoff; ``tandem.prefix.prompt_tokens`` and
``tandem.prefix.cached_tokens`` (counters: hit rate = cached / prompt); observable gauges
``tandem.tier.used_blocks`` and ``tandem.tier.occupancy`` per worker and tier (G1 / G2 / G3), read
from the sources registered with :meth:`Telemetry.add_tier_source` when the reader collects (the
workers report them as pool_runtime.reports.TierUsage).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

from pool_runtime.reports import TierUsage
from pool_runtime.tracing import DEFAULT_OTLP_ENDPOINT, make_tracer_provider, resolve_exporter
from router.metrics import PrometheusMetrics

log = logging.getLogger(__name__)
# Histogram buckets: the SDK's defaults (0, 5, 10, 25, ...) put every latency in the first bucket.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GBPS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 400.0)


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
    e2e_latency: Any = None  # Histogram
    generation_tokens: Any = None  # Counter
    kv_transfer_failures: Any = None  # Counter
    disaggregation_decisions: Any = None  # Counter
    exporter: str = "none"
    prometheus: PrometheusMetrics | None = None  # the /metrics families, when a server exposes them
    span_exporter: Any = None  # InMemorySpanExporter with exporter="memory"
    metric_reader: Any = None  # InMemoryMetricReader with exporter="memory"
    tier_sources: list[Callable[[], Iterable[TierUsage]]] = field(default_factory=list)
    _providers: tuple[Any, ...] = ()

    @property
    def enabled(self) -> bool:
        """False for ``none`` without Prometheus: callers skip work whose only use is a metric."""
        return self.exporter != "none" or self.prometheus is not None

    # -- per request (the front doors, router/front_door.py) ----------------------------------------
    def record_first_token(self, seconds: float, model: str = "") -> None:
        self.ttft.record(seconds)
        if self.prometheus is not None:
            self.prometheus.ttft.labels(model).observe(seconds)

    def record_token_gap(self, seconds_per_token: float, model: str = "") -> None:
        """One chunk after the first: the time since the previous one, per token it carries."""
        self.inter_token_latency.record(seconds_per_token)
        if self.prometheus is not None:
            self.prometheus.itl.labels(model).observe(seconds_per_token)

    def record_finished(
        self,
        model: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        queue_time_s: float,
        e2e_s: float,
    ) -> None:
        """A request that streamed its last chunk."""
        self.queue_time.record(queue_time_s)
        self.e2e_latency.record(e2e_s)
        self.generation_tokens.add(completion_tokens)
        p = self.prometheus
        if p is not None:
            p.queue_time.labels(model).observe(queue_time_s)
            p.e2e.labels(model).observe(e2e_s)
            p.request_prompt_tokens.labels(model).observe(prompt_tokens)
            p.request_generation_tokens.labels(model).observe(completion_tokens)
            p.prompt_tokens.labels(model).inc(prompt_tokens)
            p.generation_tokens.labels(model).inc(completion_tokens)
            p.request_success.labels(model, finish_reason).inc()

    def record_overhead(self, front_door: str, request_s: float, token_s: float, tokens: int) -> None:
        """The router's own time for one request: ``request_s`` before the backend, ``token_s`` handing
        its ``tokens`` on (Prometheus only: the gRPC timings carry them too)."""
        p = self.prometheus
        if p is not None:
            p.request_overhead.labels(front_door).observe(request_s)
            if tokens:
                p.token_overhead.labels(front_door).observe(token_s / tokens)

    # -- per handoff and route (the pools backend) --------------------------------------------------
    def record_transfer(self, kv_bytes: int, seconds: float, prefill_worker: str, decode_worker: str) -> None:
        """One committed handoff: ``kv_bytes`` moved, first layer posted -> commit ack in ``seconds``."""
        attrs = {"tandem.prefill_worker": prefill_worker, "tandem.decode_worker": decode_worker}
        self.kv_transfer_bytes.add(kv_bytes, attrs)
        p = self.prometheus
        if p is not None:
            p.kv_bytes.labels(prefill_worker, decode_worker).inc(kv_bytes)
        if seconds > 0 and kv_bytes > 0:
            self.kv_transfer_duration.record(seconds, attrs)
            self.kv_transfer_throughput.record(kv_bytes / seconds / 1e9, attrs)
            if p is not None:
                p.kv_seconds.labels(prefill_worker, decode_worker).observe(seconds)
                p.kv_gbps.labels(prefill_worker, decode_worker).observe(kv_bytes / seconds / 1e9)

    def record_transfer_failure(self, prefill_worker: str, decode_worker: str, reason: str) -> None:
        """A handoff that failed (``reason``: "transfer" or "worker_died"); the request is retried."""
        attrs = {"tandem.prefill_worker": prefill_worker, "tandem.decode_worker": decode_worker}
        self.kv_transfer_failures.add(1, {**attrs, "tandem.reason": reason})
        if self.prometheus is not None:
            self.prometheus.kv_failures.labels(prefill_worker, decode_worker, reason).inc()

    def record_route(self, mode: str, disaggregated: bool) -> None:
        """A routing decision for a request that asked for ``mode`` (auto / always / never)."""
        decision = "disaggregated" if disaggregated else "local"
        self.disaggregation_decisions.add(1, {"tandem.mode": mode, "tandem.decision": decision})
        if self.prometheus is not None:
            self.prometheus.disaggregation.labels(mode, decision).inc()

    def record_prefix(self, prompt_tokens: int, cached_tokens: int, worker: str) -> None:
        """One request's prompt: ``cached_tokens`` of ``prompt_tokens`` came from ``worker``'s cache."""
        attrs = {"tandem.worker": worker}
        self.prefix_prompt_tokens.add(prompt_tokens, attrs)
        self.prefix_cached_tokens.add(cached_tokens, attrs)
        if self.prometheus is not None:
            self.prometheus.prefix_queries.labels(worker).inc(prompt_tokens)
            self.prometheus.prefix_hits.labels(worker).inc(cached_tokens)

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


def _build(tracer: trace.Tracer, meter: metrics.Meter, prometheus: bool = False, **kwargs: Any) -> Telemetry:
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
        hist("tandem.e2e_latency", "s", "arrival to last token"),
        meter.create_counter("tandem.generation_tokens", description="tokens generated"),
        meter.create_counter("tandem.kv_transfer.failures", description="failed KV handoffs"),
        meter.create_counter("tandem.disaggregation.decisions", description="routing decisions"),
        **kwargs,
    )
    if prometheus:
        tel.prometheus = PrometheusMetrics(tel._tiers)

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
    exporter: str = "none",
    otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT,
    service_name: str = "tandem-router",
    prometheus: bool = False,
) -> Telemetry:
    """The router's telemetry; ``prometheus``: also the /metrics families (an HTTP front door's)."""
    exporter = resolve_exporter(exporter)
    if exporter == "none":
        return _build(trace.NoOpTracer(), metrics.NoOpMeterProvider().get_meter("tandem.router"), prometheus)

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        InMemoryMetricReader,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": service_name})
    tracer_provider, span_exporter = make_tracer_provider(exporter, otlp_endpoint, resource)
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
        prometheus,
        exporter=exporter,
        span_exporter=span_exporter,
        metric_reader=reader,
        _providers=(tracer_provider, meter_provider),
    )
