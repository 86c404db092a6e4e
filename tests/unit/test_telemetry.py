"""router/telemetry.py and pool_runtime/tracing.py without servers: the W3C context that joins a
worker's spans to the router's trace, the worker tracer's drained spans, and the router's transfer /
prefix / tier metrics read through the in-memory reader."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace

from pool_runtime.reports import TierUsage
from pool_runtime.tracing import (
    SpanRecord,
    TelemetryConfig,
    extract_context,
    inject_context,
    setup_worker_tracing,
)
from router.telemetry import setup_telemetry

pytestmark = pytest.mark.unit


def _metrics(tel: Any) -> dict[str, Any]:
    data = tel.metric_reader.get_metrics_data()  # None when nothing was recorded or observed
    return (
        {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        if data
        else {}
    )


def _points(metric: Any) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {tuple(sorted(p.attributes.items())): p for p in metric.data.data_points}


def test_worker_span_joins_the_router_trace_through_the_carrier() -> None:
    tel = setup_telemetry("memory")
    worker = setup_worker_tracing(TelemetryConfig("memory"), "tandem-decode", "decode-0")
    assert inject_context() is None  # no span: the call carries nothing
    with tel.tracer.start_as_current_span("tandem.generate") as root:
        carrier = inject_context()
    assert carrier is not None and set(carrier) == {"traceparent"}
    # what crosses the Ray call is a plain dict; the worker opens its span under it
    parent = extract_context(dict(carrier))
    tracer = worker.tracer
    with tracer.start_as_current_span("tandem.decode", parent), tracer.start_as_current_span("inner"):
        pass
    (router_span,) = tel.span_exporter.get_finished_spans()
    inner, decode = worker.take_spans()
    assert worker.take_spans() == []  # handed out once
    ctx = root.get_span_context()
    assert decode.name == "tandem.decode" and decode.service == "tandem-decode"
    assert (decode.trace_id, decode.parent_span_id) == (ctx.trace_id, ctx.span_id)
    assert (inner.trace_id, inner.parent_span_id) == (ctx.trace_id, decode.span_id)
    assert SpanRecord.from_span(router_span).span_id == ctx.span_id
    assert extract_context(None) is None
    tel.shutdown()
    worker.shutdown()


def test_tracing_off_is_a_no_op() -> None:
    off = setup_worker_tracing(None, "tandem-prefill", "prefill-0")
    assert not off.enabled and isinstance(off.tracer, trace.NoOpTracer)
    assert off.take_spans() == []
    none = setup_worker_tracing(TelemetryConfig("none"), "tandem-prefill", "prefill-0")
    assert not none.enabled
    tel = setup_telemetry("none")
    assert not tel.enabled and tel.metric_reader is None
    with tel.tracer.start_as_current_span("tandem.generate"):
        assert inject_context() is None  # a no-op span is not propagated
    tel.record_transfer(100, 0.5, "p", "d")  # no-op instruments accept the calls
    tel.record_prefix(10, 4, "p")
    with pytest.raises(ValueError, match="exporter must be one of"):
        TelemetryConfig("jaeger")
    with pytest.raises(ValueError, match="exporter must be one of"):
        setup_telemetry("jaeger")


def test_transfer_and_prefix_metrics() -> None:
    tel = setup_telemetry("memory")
    tel.record_transfer(8192, 0.002, "prefill-0", "decode-0")
    tel.record_transfer(16384, 0.004, "prefill-0", "decode-0")
    tel.record_transfer(4096, 0.0, "prefill-0", "decode-1")  # no timing: bytes only
    tel.record_prefix(48, 32, "decode-1")
    tel.record_prefix(20, 0, "decode-1")
    tel.record_prefix(7, 0, "prefill-0")
    m = _metrics(tel)
    pair0 = (("tandem.decode_worker", "decode-0"), ("tandem.prefill_worker", "prefill-0"))
    pair1 = (("tandem.decode_worker", "decode-1"), ("tandem.prefill_worker", "prefill-0"))
    moved = _points(m["tandem.kv_transfer.bytes"])
    assert (moved[pair0].value, moved[pair1].value) == (8192 + 16384, 4096)
    gbps = _points(m["tandem.kv_transfer.throughput"])
    assert set(gbps) == {pair0}
    assert gbps[pair0].count == 2
    assert gbps[pair0].sum == pytest.approx(8192 / 0.002 / 1e9 + 16384 / 0.004 / 1e9, rel=1e-12)
    assert (gbps[pair0].min, gbps[pair0].max) == pytest.approx((4.096e-3, 4.096e-3))
    dur = _points(m["tandem.kv_transfer.duration"])[pair0]
    assert (dur.count, dur.sum) == (2, pytest.approx(0.006))
    prompt = _points(m["tandem.prefix.prompt_tokens"])
    cached = _points(m["tandem.prefix.cached_tokens"])
    d1, p0 = (("tandem.worker", "decode-1"),), (("tandem.worker", "prefill-0"),)
    assert (prompt[d1].value, cached[d1].value, prompt[p0].value, cached[p0].value) == (68, 32, 7, 0)
    tel.shutdown()


def test_tier_gauges_read_the_registered_sources() -> None:
    tel = setup_telemetry("memory")
    tiers = [
        TierUsage("decode-0", "decode", "G1", 12, 0.75),
        TierUsage("decode-0", "decode", "G2", 3, 0.125),
        TierUsage("prefill-0", "prefill", "G3", 9, 0.5),
    ]

    def source() -> list[TierUsage]:
        return tiers

    def broken() -> list[TierUsage]:
        raise RuntimeError("a worker went away")

    tel.add_tier_source(broken)  # must not hide the others
    tel.add_tier_source(source)
    m = _metrics(tel)
    used, occ = _points(m["tandem.tier.used_blocks"]), _points(m["tandem.tier.occupancy"])

    def key(t: TierUsage) -> tuple[tuple[str, str], ...]:
        return (("tandem.role", t.role), ("tandem.tier", t.tier), ("tandem.worker", t.worker_id))

    assert {k: p.value for k, p in used.items()} == {key(t): t.used_blocks for t in tiers}
    assert {k: p.value for k, p in occ.items()} == {key(t): t.occupancy for t in tiers}
    tiers[0] = TierUsage("decode-0", "decode", "G1", 2, 0.125)  # read again at every collection
    assert _points(_metrics(tel)["tandem.tier.used_blocks"])[key(tiers[0])].value == 2
    tel.remove_tier_source(source)
    tel.remove_tier_source(source)  # idempotent
    assert _metrics(tel) == {}  # no source left: no observation
    tel.shutdown()
