"""What the worker actors of both pools add for observability: a tracer of their own, and the G2 / G3
occupancy the router's tier gauges and ``tandem status`` report (G1 comes with every ``load()``).

Mixed into ``PrefillActor`` and ``DecodeActor`` (prefill_pool/pool.py, decode_pool/pool.py), which
open their spans under the trace context the router passes with each call; the worker classes
themselves stay free of Ray and OpenTelemetry.
"""

from __future__ import annotations

from typing import Any

from pool_runtime.reports import TierUsage
from pool_runtime.tracing import SpanRecord, TelemetryConfig, WorkerTracing, setup_worker_tracing


class ActorTelemetry:
    worker_id: str
    role: str
    tier_store: Any  # memory_tiers.tier_store.TierStore | None
    tracing: WorkerTracing

    def setup_tracing(self, config: TelemetryConfig | None) -> None:
        self.tracing = setup_worker_tracing(config, f"tandem-{self.role}", self.worker_id)

    def take_spans(self) -> list[SpanRecord]:
        """The spans this worker finished since the last call (exporter ``memory``; else [])."""
        return self.tracing.take_spans()

    def tiers(self) -> list[int]:
        """[G2 used blocks, G2 capacity blocks, G3 used bytes, G3 capacity bytes]; zeros: no tiers
        (``tandem status``)."""
        store = self.tier_store
        if store is None:
            return [0, 0, 0, 0]
        m = store.metrics()
        return [m.g2_used_blocks, m.g2_capacity_blocks, m.g3_used_bytes, m.g3_capacity_bytes]

    def tier_usage(self) -> list[TierUsage]:
        """G2 and G3 occupancy (empty without lower tiers)."""
        store = self.tier_store
        if store is None:
            return []
        m = store.metrics()
        out = [TierUsage(self.worker_id, self.role, "G2", m.g2_used_blocks, m.g2_occupancy)]
        if m.g3_capacity_bytes:
            out.append(TierUsage(self.worker_id, self.role, "G3", m.g3_blocks, m.g3_occupancy))
        return out
