"""One trace per request across the router and the Ray workers, and the router's transfer, prefix and
tier metrics, through a real gRPC server over real prefill / decode actors (KV over NIXL).

Every process exports to memory: the router's spans and metrics are read from its exporter and
reader, each worker's spans from its actor's ``take_spans()``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pool_runtime.tracing import SpanRecord, TelemetryConfig
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request
from router.telemetry import setup_telemetry
from tests.ray_fixture import ray_cluster, running_pools  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BLOCK = 16
BLOCK_BYTES = 8192  # the tiny model: 2 layers x K,V x 2 KV heads x 16 tokens x 32 dims x fp32
LAYERS = 2
PREFILL_BLOCKS = 8  # small, so a few prompts evict cached blocks into G2
G2_BLOCKS = 32


@pytest.fixture(scope="module")
def workers(checkpoint: Path, ray_cluster: None) -> Iterator[tuple[list, list]]:  # noqa: F811
    from engine.llm_engine import EngineConfig
    from memory_tiers.tier_store import TierConfig
    from pool_runtime.actors import PoolSpec
    from pool_runtime.config import WorkerConfig

    traced = TelemetryConfig("memory")
    spec = PoolSpec(replicas=1, num_cpus=0.5, max_restarts=0)
    pcfg = WorkerConfig(
        EngineConfig(model=checkpoint, block_size=BLOCK, num_blocks=PREFILL_BLOCKS),
        tiers=TierConfig(host_bytes=G2_BLOCKS * BLOCK_BYTES),
        kv_backend="nixl",
    )
    dcfg = WorkerConfig(EngineConfig(model=checkpoint, block_size=BLOCK, num_blocks=64), kv_backend="nixl")
    with running_pools(pcfg, spec, decode_cfg=dcfg, telemetry=traced) as pools:
        yield pools


@contextlib.asynccontextmanager
async def serving(workers: tuple[list, list], checkpoint: Path, tel: Any) -> AsyncIterator[tuple[Any, Any]]:
    """(a stub of a TandemServer over the workers, its PoolsBackend), both on ``tel``."""
    from memory_tiers.metadata import InProcessMetadataStore
    from router.coordinator import Pools
    from router.pools_backend import PoolsBackend
    from router.server import TandemServer
    from router.topology import Placement, Topology

    prefill, decode = workers
    backend = PoolsBackend.over_pools(
        Pools(prefill, decode, disaggregation="auto"),
        checkpoint,
        InProcessMetadataStore(),
        topology=Topology.build({h.worker_id: Placement("node-a") for h in prefill + decode}),
        load_interval_s=0.05,
        telemetry=tel,
    )
    await backend.start()
    server = TandemServer(backend, port=0, telemetry=tel, default_disaggregation="auto")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            yield pb_grpc.TandemStub(ch), backend
    finally:
        await server.stop(1.0)


async def _final(
    stub: Any, prompt: list[int], rid: str, mode: str, max_tokens: int = 5
) -> pb.GenerateResponse:
    req = build_request(prompt, max_tokens=max_tokens, ignore_eos=True, request_id=rid, disaggregation=mode)
    msgs = [m async for m in stub.Generate(req)]
    assert sum(len(m.token_ids) for m in msgs) == max_tokens
    return msgs[-1]


def _worker_spans(workers: tuple[list, list]) -> list[SpanRecord]:
    import ray

    prefill, decode = workers
    return [s for h in prefill + decode for s in ray.get(h.actor.take_spans.remote())]


def _metrics(tel: Any) -> dict[str, Any]:
    data = tel.metric_reader.get_metrics_data()
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 500 + 3 for i in range(n)]


def test_one_trace_per_request_and_the_transfer_and_prefix_metrics(workers, checkpoint: Path) -> None:
    tel = setup_telemetry("memory")
    _worker_spans(workers)  # whatever an earlier test left
    a = _prompt(1, 40)  # 2 full blocks + 8 tokens
    c = a[:32] + _prompt(2, 9)  # a's two full blocks, then its own
    b = _prompt(3, 21)

    async def main() -> dict[str, pb.GenerateResponse]:
        async with serving(workers, checkpoint, tel) as (stub, _):
            return {
                "a": await _final(stub, a, "a", "always"),
                "b": await _final(stub, b, "b", "never"),
                "c": await _final(stub, c, "c", "always"),
            }

    out = asyncio.run(main())
    router = [SpanRecord.from_span(s) for s in tel.span_exporter.get_finished_spans()]
    spans = router + _worker_spans(workers)
    gen = {s.attributes["tandem.request_id"]: s for s in spans if s.name == "tandem.generate"}
    assert set(gen) == {"a", "b", "c"} and all(s.parent_span_id is None for s in gen.values())
    assert len({s.trace_id for s in gen.values()}) == 3  # one trace per request
    by_trace: dict[int, dict[str, list[SpanRecord]]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, {}).setdefault(s.name, []).append(s)
    assert set(by_trace) == {s.trace_id for s in gen.values()}  # no span outside the three traces

    def one(rid: str, name: str) -> SpanRecord:
        (s,) = by_trace[gen[rid].trace_id][name]
        return s

    for rid, blocks_sent, cached_tokens, cached_on_decode in (("a", 3, 0, 0), ("c", 1, 32, 2)):
        g, prompt = gen[rid], {"a": a, "c": c}[rid]
        assert set(by_trace[g.trace_id]) == {
            "tandem.generate", "tandem.route", "tandem.kv_reserve", "tandem.prefill", "tandem.kv_transfer",
            "tandem.decode",
        }  # fmt: skip
        route, reserve, pre = (
            one(rid, "tandem.route"),
            one(rid, "tandem.kv_reserve"),
            one(rid, "tandem.prefill"),
        )
        xfer, dec = one(rid, "tandem.kv_transfer"), one(rid, "tandem.decode")
        # router -> prefill -> transfer, router -> decode
        assert route.parent_span_id == reserve.parent_span_id == g.span_id
        assert pre.parent_span_id == g.span_id and xfer.parent_span_id == pre.span_id
        assert dec.parent_span_id == g.span_id
        assert (route.service, pre.service, dec.service) == (
            "tandem-router",
            "tandem-prefill",
            "tandem-decode",
        )
        assert reserve.attributes["tandem.kv_reserve.cached_blocks"] == cached_on_decode
        assert reserve.attributes["tandem.kv_reserve.blocks"] == 3 - cached_on_decode
        assert pre.attributes["tandem.prompt_tokens"] == len(prompt)
        assert pre.attributes["tandem.prefill.cached_tokens"] == cached_tokens == out[rid].usage.cached_tokens
        assert pre.attributes["tandem.prefill.computed_tokens"] == len(prompt) - cached_tokens
        moved = out[rid].timings.kv_bytes_moved
        assert xfer.attributes["tandem.kv_transfer.bytes"] == moved == blocks_sent * BLOCK_BYTES
        assert xfer.attributes["tandem.kv_transfer.layers"] == LAYERS
        dur = xfer.attributes["tandem.kv_transfer.duration_s"]
        assert dur > 0 and xfer.end_ns - xfer.start_ns == round(dur * 1e9)
        assert xfer.attributes["tandem.kv_transfer.gbps"] == moved / dur / 1e9
        assert pre.start_ns <= xfer.start_ns and xfer.end_ns <= pre.end_ns
        # the decode is started with the first token, as soon as the prefill sampled it, while the
        # handoff completes behind it: it starts after the transfer began, ends after the ack
        assert xfer.start_ns <= dec.start_ns and pre.end_ns <= dec.end_ns
        assert (
            dec.attributes["tandem.decode.tokens"] == 5
            and dec.attributes["tandem.decode.local_prefill"] is False
        )
        assert dec.attributes["tandem.finish_reason"] == "length" and dec.status == "UNSET"
        assert g.attributes["tandem.kv_bytes_moved"] == moved

    # conditional disaggregation: no prefill worker, the decode span is the request's only worker span
    assert set(by_trace[gen["b"].trace_id]) == {"tandem.generate", "tandem.route", "tandem.decode"}
    dec_b = one("b", "tandem.decode")
    assert dec_b.parent_span_id == gen["b"].span_id
    assert dec_b.attributes["tandem.decode.local_prefill"] is True
    assert (dec_b.attributes["tandem.prompt_tokens"], dec_b.attributes["tandem.decode.tokens"]) == (21, 5)

    m = _metrics(tel)
    pair = {"tandem.prefill_worker": "prefill-0", "tandem.decode_worker": "decode-0"}
    (moved,) = m["tandem.kv_transfer.bytes"].data.data_points
    assert dict(moved.attributes) == pair
    assert moved.value == out["a"].timings.kv_bytes_moved + out["c"].timings.kv_bytes_moved == 4 * BLOCK_BYTES
    (gbps,) = m["tandem.kv_transfer.throughput"].data.data_points
    gbps_spans = [one(r, "tandem.kv_transfer").attributes["tandem.kv_transfer.gbps"] for r in ("a", "c")]
    assert gbps.count == 2 and gbps.sum == pytest.approx(sum(gbps_spans), rel=1e-12)
    assert (gbps.min, gbps.max) == (min(gbps_spans), max(gbps_spans))
    prompt_pts = {
        p.attributes["tandem.worker"]: p.value for p in m["tandem.prefix.prompt_tokens"].data.data_points
    }
    cached_pts = {
        p.attributes["tandem.worker"]: p.value for p in m["tandem.prefix.cached_tokens"].data.data_points
    }
    assert prompt_pts == {"prefill-0": len(a) + len(c), "decode-0": len(b)}
    assert cached_pts == {"prefill-0": 32, "decode-0": out["b"].usage.cached_tokens}
    assert cached_pts["decode-0"] == 0
    tel.shutdown()


def test_tier_gauges_report_each_worker_and_tier(workers, checkpoint: Path) -> None:
    import ray

    tel = setup_telemetry("memory")
    prefill, decode = workers

    def gauges() -> dict[tuple[str, str], tuple[int, float]]:
        m = _metrics(tel)
        used = {(p.attributes["tandem.worker"], p.attributes["tandem.tier"]): p.value
                for p in m["tandem.tier.used_blocks"].data.data_points}  # fmt: skip
        occ = {(p.attributes["tandem.worker"], p.attributes["tandem.tier"]): p.value
               for p in m["tandem.tier.occupancy"].data.data_points}  # fmt: skip
        assert set(used) == set(occ)
        return {k: (used[k], occ[k]) for k in used}

    async def main() -> None:
        async with serving(workers, checkpoint, tel) as (stub, backend):
            # distinct prompts of two full blocks each overflow the prefill worker's 8 G1 blocks
            for i in range(6):
                await _final(stub, _prompt(10 + i, 2 * BLOCK + 3), f"t{i}", "always", max_tokens=2)
            # a long stream holds decode blocks while the gauges are read
            long = stub.Generate(
                build_request(_prompt(30, 20), max_tokens=1000, ignore_eos=True, disaggregation="never")
            )
            await long.read()
            loads = {w.worker_id: w for w in await backend.refresh()}
            tiers = await backend.refresh_tiers()
            g = gauges()
            (g2,) = ray.get(prefill[0].actor.tier_usage.remote())
            assert g2 == tiers["prefill-0"][0] and tiers["decode-0"] == []  # the decode worker has no G2
            assert set(g) == {("prefill-0", "G1"), ("decode-0", "G1"), ("prefill-0", "G2")}
            assert g2.tier == "G2" and g2.used_blocks > 0  # evicted blocks were offloaded
            assert g[("prefill-0", "G2")] == (g2.used_blocks, g2.used_blocks / G2_BLOCKS)
            d = loads["decode-0"]
            assert d.used_blocks >= 2  # the long stream's prompt and its first generated tokens
            assert g[("decode-0", "G1")] == (d.used_blocks, d.used_blocks / 64)
            p = loads["prefill-0"]
            assert g[("prefill-0", "G1")] == (p.used_blocks, p.used_blocks / PREFILL_BLOCKS)
            long.cancel()
        # the backend closed: its source is gone, nothing is observed any more
        assert "tandem.tier.used_blocks" not in _metrics(tel)

    asyncio.run(main())
    tel.shutdown()


def test_untraced_workers_cost_no_spans(checkpoint: Path, ray_cluster: None) -> None:  # noqa: F811
    """Workers built without a telemetry config trace nothing, even under a traced router."""
    import ray

    from decode_pool.pool import build_decode_pool
    from engine.llm_engine import EngineConfig
    from pool_runtime.actors import PoolSpec, shutdown
    from pool_runtime.config import WorkerConfig

    (d,) = build_decode_pool(
        WorkerConfig(EngineConfig(model=checkpoint, block_size=BLOCK, num_blocks=16), kv_backend="nixl"),
        PoolSpec(replicas=1, num_cpus=0.25, max_restarts=0),
        prefix="untraced",
    )
    try:
        tel = setup_telemetry("memory")

        async def main() -> list[int]:
            from engine.sampling_params import SamplingParams
            from router.coordinator import PoolRequest, Pools

            pools = Pools([], [d], disaggregation="never")
            with tel.tracer.start_as_current_span("tandem.generate"):
                req = PoolRequest("u", _prompt(5, 10), SamplingParams(max_tokens=3, ignore_eos=True))
                return [t async for c in pools.submit(req) for t in c.token_ids]

        assert len(asyncio.run(main())) == 3
        assert ray.get(d.actor.take_spans.remote()) == []
        assert [s.name for s in tel.span_exporter.get_finished_spans()] == ["tandem.generate"]
        tel.shutdown()
    finally:
        shutdown([d])
