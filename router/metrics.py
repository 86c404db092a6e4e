"""The router's Prometheus metrics: ``tandem:`` families named after vLLM's, one registry per server.

Nothing here measures anything: router/telemetry.py's ``Telemetry`` records each measurement once
and hands it to the OpenTelemetry instruments and, when a server serves ``GET /metrics``, to these
families. What is a state rather than an event (requests running / waiting, KV usage, tier
occupancy, admission) is read when Prometheus scrapes, from the sources registered with
:meth:`PrometheusMetrics.watch` and the telemetry's tier sources::

    recorded per request / chunk / handoff           read at scrape time
    tandem:time_to_first_token_seconds      h        tandem:num_requests_running{worker}      g
    tandem:inter_token_latency_seconds      h        tandem:num_requests_waiting{worker}      g
    tandem:e2e_request_latency_seconds      h        tandem:kv_cache_usage_perc{worker}       g
    tandem:request_queue_time_seconds       h        tandem:kv_cache_used_blocks{worker}      g
    tandem:request_prompt_tokens            h        tandem:tier_used_blocks{worker,tier}     g
    tandem:request_generation_tokens        h        tandem:tier_usage_perc{worker,tier}      g
    tandem:prompt_tokens_total              c        tandem:router_requests_in_flight         g
    tandem:generation_tokens_total          c        tandem:router_requests_queued            g
    tandem:request_success_total{finished_reason}    tandem:router_requests_shed_total        c
    tandem:prefix_cache_queries_total{worker}  c  (prompt tokens looked up)
    tandem:prefix_cache_hits_total{worker}     c  (of them, served from a cache)
    tandem:kv_transfer_bytes_total{prefill_worker,decode_worker}        c
    tandem:kv_transfer_seconds{...}  h   tandem:kv_transfer_gbps{...}   h
    tandem:kv_transfer_failures_total{prefill_worker,decode_worker,reason}  c
    tandem:disaggregation_decisions_total{mode,decision}   c  (mode asked; prefill pool or local)
    tandem:router_request_overhead_seconds{front_door}     h  (router time before the backend)
    tandem:router_token_overhead_seconds{front_door}       h  (per token: produced -> handed on)

(h histogram, c counter, g gauge.) Request-level families carry ``model_name``, as vLLM's do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pool_runtime.reports import TierUsage

log = logging.getLogger(__name__)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OVERHEAD_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
GBPS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 400.0)

# vLLM turns the ``*_created`` series off too: they double the output and no dashboard reads them.
prometheus_client.disable_created_metrics()


class PrometheusMetrics:
    """Lifecycle: construct -> ``watch`` the live sources (a front door does) -> ``render`` per scrape."""

    def __init__(self, tier_sources: Callable[[], Iterable[TierUsage]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, model = self.registry, ["model_name"]

        def hist(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=r, buckets=buckets)

        self.ttft = hist(
            "tandem:time_to_first_token_seconds", "Time to first token.", model, LATENCY_BUCKETS_S
        )
        self.itl = hist(
            "tandem:inter_token_latency_seconds", "Time between streamed tokens.", model, LATENCY_BUCKETS_S
        )
        self.e2e = hist(
            "tandem:e2e_request_latency_seconds", "Arrival to last token.", model, LATENCY_BUCKETS_S
        )
        self.queue_time = hist(
            "tandem:request_queue_time_seconds", "Arrival to start of prefill.", model, LATENCY_BUCKETS_S
        )
        self.request_prompt_tokens = hist(
            "tandem:request_prompt_tokens", "Prompt tokens per request.", model, TOKEN_BUCKETS
        )
        self.request_generation_tokens = hist(
            "tandem:request_generation_tokens", "Generated tokens per request.", model, TOKEN_BUCKETS
        )
        self.prompt_tokens = Counter("tandem:prompt_tokens", "Prompt tokens processed.", model, registry=r)
        self.generation_tokens = Counter("tandem:generation_tokens", "Tokens generated.", model, registry=r)
        self.request_success = Counter(
            "tandem:request_success", "Finished requests.", [*model, "finished_reason"], registry=r
        )
        self.prefix_queries = Counter(
            "tandem:prefix_cache_queries",
            "Prompt tokens looked up in a prefix cache.",
            ["worker"],
            registry=r,
        )
        self.prefix_hits = Counter(
            "tandem:prefix_cache_hits", "Prompt tokens served from a prefix cache.", ["worker"], registry=r
        )
        pair = ["prefill_worker", "decode_worker"]
        self.kv_bytes = Counter("tandem:kv_transfer_bytes", "KV bytes moved to decode.", pair, registry=r)
        self.kv_seconds = hist(
            "tandem:kv_transfer_seconds", "First layer posted to commit ack.", pair, LATENCY_BUCKETS_S
        )
        self.kv_gbps = hist(
            "tandem:kv_transfer_gbps", "KV bytes / transfer duration (GB/s).", pair, GBPS_BUCKETS
        )
        self.kv_failures = Counter(
            "tandem:kv_transfer_failures",
            "Failed KV handoffs (retried elsewhere).",
            [*pair, "reason"],
            registry=r,
        )
        self.disaggregation = Counter(
            "tandem:disaggregation_decisions",
            "Routing decisions: prefill on the prefill pool (disaggregated) or on the decode worker (local).",
            ["mode", "decision"],
            registry=r,
        )
        self.request_overhead = hist(
            "tandem:router_request_overhead_seconds",
            "Router time before the backend (parsing, validation, tokenizing), per request.",
            ["front_door"],
            OVERHEAD_BUCKETS_S,
        )
        self.token_overhead = hist(
            "tandem:router_token_overhead_seconds",
            "Router time per streamed token, from the backend producing it to handing it to the transport.",
            ["front_door"],
            OVERHEAD_BUCKETS_S,
        )
        self._live = _LiveCollector(tier_sources or (lambda: ()))
        r.register(self._live)

    def watch(self, load: Callable[[], Any] | None = None, admission: Any = None) -> None:
        """Read the backend's worker loads (``Backend.load``) and the admission queue at each scrape."""
        if load is not None:
            self._live.load = load
        if admission is not None:
            self._live.admission = admission

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _LiveCollector(Collector):
    """The gauges Prometheus reads when it scrapes: never fails a scrape because one source did."""

    def __init__(self, tiers: Callable[[], Iterable[TierUsage]]) -> None:
        self.tiers = tiers
        self.load: Callable[[], Any] | None = None
        self.admission: Any = None

    def describe(self) -> Iterator[Any]:
        return iter(())  # known only at collect time; an empty describe keeps registration lazy

    def collect(self) -> Iterator[Any]:
        worker = ["worker", "role"]
        running = GaugeMetricFamily(
            "tandem:num_requests_running", "Sequences running on a worker.", labels=worker
        )
        waiting = GaugeMetricFamily(
            "tandem:num_requests_waiting", "Sequences waiting on a worker.", labels=worker
        )
        usage = GaugeMetricFamily(
            "tandem:kv_cache_usage_perc", "KV blocks in use / total (0-1).", labels=worker
        )
        used = GaugeMetricFamily("tandem:kv_cache_used_blocks", "KV blocks in use.", labels=worker)
        try:
            workers = self.load().workers if self.load is not None else []
        except Exception:
            log.debug("load source failed", exc_info=True)
            workers = []
        for w in workers:
            labels = [w.worker_id, w.role]
            running.add_metric(labels, w.running)
            waiting.add_metric(labels, w.waiting)
            used.add_metric(labels, w.used_blocks)
            usage.add_metric(labels, w.used_blocks / w.total_blocks if w.total_blocks else 0.0)
        yield from (running, waiting, usage, used)

        tier = ["worker", "role", "tier"]
        blocks = GaugeMetricFamily("tandem:tier_used_blocks", "Blocks held per tier (G1/G2/G3).", labels=tier)
        occ = GaugeMetricFamily("tandem:tier_usage_perc", "Tier used / capacity (0-1).", labels=tier)
        try:
            tiers = list(self.tiers())
        except Exception:
            log.debug("tier source failed", exc_info=True)
            tiers = []
        for t in tiers:
            blocks.add_metric([t.worker_id, t.role, t.tier], t.used_blocks)
            occ.add_metric([t.worker_id, t.role, t.tier], t.occupancy)
        yield from (blocks, occ)

        a = self.admission
        if a is not None:
            yield GaugeMetricFamily(
                "tandem:router_requests_in_flight", "Requests holding an admission slot.", value=a.in_flight
            )
            yield GaugeMetricFamily(
                "tandem:router_requests_queued", "Requests waiting for an admission slot.", value=a.queued
            )
            yield CounterMetricFamily(
                "tandem:router_requests_shed",
                "Requests refused because the queue was full.",
                value=a.num_shed,
            )
