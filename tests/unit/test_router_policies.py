"""router.cost_model + router.policies: routing choices and predicted TTFTs, computed by hand.

Unless a test says otherwise: 16-token blocks, every worker prefills 1000 tokens/s, links are
shm 10 GB/s / ib 20 GB/s / tcp 1 GB/s, no overlap credit, no handoff overhead.
"""

from __future__ import annotations

import dataclasses

import pytest

from router.cost_model import (
    Candidate,
    CostParams,
    RoutingRequest,
    cached_tokens,
    price_colocated,
    price_disaggregated,
)
from router.policies import (
    NoRouteError,
    RoutingContext,
    cost_model,
    get_policy,
    least_loaded,
    round_robin,
)
from router.topology import Placement, Topology

pytestmark = pytest.mark.unit

GBPS = {"same_process": 50.0, "nvlink": 100.0, "shm": 10.0, "pcie": 20.0, "ib": 20.0, "tcp": 1.0}
ROOM = {"G1": 1000}


def _topo(**nodes: tuple[str, str]) -> Topology:
    return Topology.build({w: Placement(node=n, rack=r) for w, (n, r) in nodes.items()}, link_gbps=GBPS)


def _ctx(topo: Topology, kv_bytes_per_token: int = 1000, **kw: float) -> RoutingContext:
    params = CostParams(
        kv_bytes_per_token=kv_bytes_per_token, block_size=16, default_prefill_tokens_per_s=1000.0
    )
    return RoutingContext(topology=topo, params=dataclasses.replace(params, **kw))  # type: ignore[arg-type]


def _w(
    wid: str, role: str, queue: int = 0, running: int = 0, free: dict[str, int] | None = None, **kw: float
) -> Candidate:
    return Candidate(wid, role, queue, running, ROOM if free is None else free, **kw)  # type: ignore[arg-type]


def _req(n: int, cached: dict[str, int] | None = None, mode: str = "auto") -> RoutingRequest:
    hashes = [bytes([i]) * 16 for i in range(n // 16)]
    return RoutingRequest(n, hashes, cached or {}, mode)


SAME_NODE = _topo(p1=("n1", "r1"), p2=("n1", "r1"), d1=("n1", "r1"), d2=("n1", "r1"))


def test_prefix_holder_wins_when_its_cache_saves_enough() -> None:
    # 256 tokens = 16 blocks; p2 holds the first 8 (128 tokens). KV 256 * 1000 B over shm = 25.6 us.
    workers = [_w("p1", "prefill"), _w("p2", "prefill"), _w("d1", "decode", queue=1000)]
    req = _req(256, {"p2": 8})
    d = cost_model(req, workers, _ctx(SAME_NODE))
    assert (d.prefill_worker, d.decode_worker, d.disaggregate) == ("p2", "d1", True)
    assert d.cached_tokens == 128
    assert d.kv_bytes == 256_000
    assert d.predicted_ttft_s == pytest.approx(0.128 + 0.0000256, rel=1e-12)
    # p1: 0.256 + 25.6 us; colocated on d1: 1.0 queue + 0.256 prefill = 1.256.
    # With 200 tokens queued at p2 (0.2 s) its cache no longer pays: 0.328 > 0.256.
    workers[1] = _w("p2", "prefill", queue=200)
    d = cost_model(req, workers, _ctx(SAME_NODE))
    assert (d.prefill_worker, d.cached_tokens) == ("p1", 0)
    assert d.predicted_ttft_s == pytest.approx(0.256 + 0.0000256, rel=1e-12)


def test_decode_cache_shrinks_the_transfer_and_colocated_uses_it() -> None:
    req = _req(256, {"d1": 12, "p1": 4})
    ctx = _ctx(SAME_NODE, kv_bytes_per_token=10_000_000)  # 10 MB/token: transfer dominates
    p1, d1 = _w("p1", "prefill"), _w("d1", "decode")
    q = price_disaggregated(req, p1, d1, ctx.topology, ctx.params)
    assert q.kv_bytes == (256 - 192) * 10_000_000  # d1 already holds 12 blocks
    assert q.transfer_s == pytest.approx(0.064, rel=1e-12)  # 640 MB / 10 GB/s
    assert q.ttft_s == pytest.approx(0.192 + 0.064, rel=1e-12)  # 192 uncached at p1
    c = price_colocated(req, d1, ctx.params)
    assert (c.cached_tokens, c.ttft_s) == (192, pytest.approx(0.064, rel=1e-12))
    d = cost_model(req, [p1, d1], ctx)
    assert (d.prefill_worker, d.decode_worker, d.disaggregate) == (None, "d1", False)


def test_far_link_loses_to_near_one() -> None:
    topo = _topo(near=("n1", "r1"), far=("n2", "r2"), d1=("n1", "r1"))
    ctx = _ctx(topo, kv_bytes_per_token=100_000)  # 512 tokens -> 51.2 MB
    workers = [_w("far", "prefill"), _w("near", "prefill"), _w("d1", "decode", queue=10_000)]
    req = _req(512)
    d = cost_model(req, workers, ctx)
    # near (shm): 0.512 + 0.00512; far (tcp): 0.512 + 0.0512; colocated: 10 + 0.512.
    assert (d.prefill_worker, d.decode_worker) == ("near", "d1")
    assert d.predicted_ttft_s == pytest.approx(0.51712, rel=1e-12)
    assert "over shm" in d.reason
    # Priced, not ranked: 50 queued tokens at near (0.05 s) make tcp's 0.5632 the cheaper.
    workers[1] = _w("near", "prefill", queue=50)
    d = cost_model(req, workers, ctx)
    assert d.prefill_worker == "far"
    assert d.predicted_ttft_s == pytest.approx(0.5632, rel=1e-12)


def test_same_rack_ib_beats_cross_rack_tcp() -> None:
    topo = _topo(rack_mate=("n2", "r1"), stranger=("n3", "r2"), d1=("n1", "r1"))
    workers = [_w("stranger", "prefill"), _w("rack_mate", "prefill"), _w("d1", "decode", queue=10_000)]
    d = cost_model(_req(512), workers, _ctx(topo, kv_bytes_per_token=100_000))
    assert d.prefill_worker == "rack_mate"
    assert d.predicted_ttft_s == pytest.approx(0.512 + 0.00256, rel=1e-12)  # 51.2 MB / 20 GB/s


@pytest.mark.parametrize("policy", [cost_model, round_robin, least_loaded])
def test_full_decode_worker_is_never_picked(policy) -> None:  # type: ignore[no-untyped-def]
    # 256 tokens need 16 blocks. d1 is idle but has 15 free (G1 + G2; G3 does not count).
    d1 = _w("d1", "decode", free={"G1": 10, "G2": 5, "G3": 500})
    d2 = _w("d2", "decode", queue=5000, running=9, free={"G1": 16})
    for turn in range(3):
        ctx = dataclasses.replace(_ctx(SAME_NODE), turn=turn)
        assert policy(_req(256, mode="never"), [d1, d2], ctx).decode_worker == "d2"
    with pytest.raises(NoRouteError) as info:
        policy(_req(256), [d1], _ctx(SAME_NODE))
    assert info.value.overloaded and str(info.value) == "no decode worker has KV room for 16 blocks"
    # d1's own cached prefix (2 blocks) is reused, so 14 new blocks fit.
    assert policy(_req(256, {"d1": 2}, mode="never"), [d1], _ctx(SAME_NODE)).decode_worker == "d1"


def test_no_decode_worker_is_unavailable_not_overloaded() -> None:
    with pytest.raises(NoRouteError) as info:
        cost_model(_req(64), [_w("p1", "prefill")], _ctx(SAME_NODE))
    assert not info.value.overloaded and str(info.value) == "no live decode worker"


def test_short_prompt_stays_colocated_in_auto_long_one_disaggregates() -> None:
    ctx = _ctx(SAME_NODE, handoff_overhead_s=0.005)
    workers = [_w("p1", "prefill"), _w("d1", "decode", queue=2)]
    short = cost_model(_req(8), workers, ctx)
    # colocated 0.002 + 0.008 = 0.010; disaggregated 0.008 + 0.005 + 8 us = 0.013008.
    assert (short.prefill_worker, short.disaggregate) == (None, False)
    assert short.predicted_ttft_s == pytest.approx(0.010, rel=1e-12)
    assert "best disaggregated was p1 -> d1" in short.reason
    workers[1] = _w("d1", "decode", queue=2000)
    long = cost_model(_req(2048), workers, ctx)
    # colocated 2.0 + 2.048; disaggregated 2.048 + 0.005 + 204.8 us.
    assert (long.prefill_worker, long.disaggregate) == ("p1", True)
    assert long.predicted_ttft_s == pytest.approx(2.048 + 0.005 + 0.0002048, rel=1e-12)


def test_always_and_never_are_honoured() -> None:
    workers = [_w("p1", "prefill"), _w("d1", "decode")]
    ctx = _ctx(SAME_NODE)
    assert cost_model(_req(64, mode="auto"), workers, ctx).disaggregate is False  # idle d1: no transfer wins
    forced = cost_model(_req(64, mode="always"), workers, ctx)
    assert (forced.prefill_worker, forced.decode_worker) == ("p1", "d1")
    workers[1] = _w("d1", "decode", queue=100_000)
    kept = cost_model(_req(64, mode="never"), workers, ctx)
    assert (kept.prefill_worker, kept.disaggregate) == (None, False)
    assert kept.predicted_ttft_s == pytest.approx(100.064, rel=1e-12)
    for policy in (cost_model, round_robin, least_loaded):
        with pytest.raises(NoRouteError, match="disaggregation=always"):
            policy(_req(64, mode="always"), [_w("d1", "both")], ctx)
    with pytest.raises(ValueError, match="disaggregation must be one of"):
        cost_model(_req(64, mode="maybe"), workers, ctx)


def test_overlap_and_admission_terms() -> None:
    ctx = _ctx(SAME_NODE, kv_bytes_per_token=100_000, overlap_fraction=0.5)
    p1 = _w("p1", "prefill", queue=100)
    d1 = _w("d1", "decode", running=3, decode_step_s=0.02)
    q = price_disaggregated(_req(512), p1, d1, ctx.topology, ctx.params)
    # queue 0.1 + prefill 0.512 + transfer 0.00512 - overlap 0.5*0.00512 + admission 0.02
    assert (q.queue_s, q.prefill_s, q.admission_s) == (0.1, 0.512, 0.02)
    assert q.overlap_s == pytest.approx(0.00256, rel=1e-12)
    assert q.ttft_s == pytest.approx(0.63456, rel=1e-12)
    idle = price_disaggregated(
        _req(512), p1, _w("d1", "decode", decode_step_s=0.02), ctx.topology, ctx.params
    )
    assert idle.admission_s == 0.0  # nothing decoding: no step to wait for


def test_worker_rate_overrides_default_and_full_hit_keeps_one_token() -> None:
    params = _ctx(SAME_NODE).params
    fast = _w("d1", "decode", queue=400, prefill_tokens_per_s=4000.0)
    req = _req(32, {"d1": 2})  # the whole prompt is cached
    assert cached_tokens(req, "d1", params) == 31
    q = price_colocated(req, fast, params)
    assert q.ttft_s == pytest.approx(0.1 + 1 / 4000, rel=1e-12)


def test_tensor_parallel_prefill_is_priced_faster_and_its_kv_moves_in_parallel_streams() -> None:
    """A TP2 prefill worker: 1 + 0.8 = 1.8 ranks' speed; a TP2 -> TP2 handoff of a model with 2 KV
    heads moves half the bytes per stream; replicated KV heads (TP4, 2 heads) add no stream."""
    ctx = _ctx(SAME_NODE, kv_bytes_per_token=100_000, num_kv_heads=2)
    req = _req(512)  # 512 tokens: 51.2 MB of KV, 5.12 ms over shm at 10 GB/s
    p1, p2 = _w("p1", "prefill"), _w("p2", "prefill", tensor_parallel_size=2)
    d1, d2 = _w("d1", "decode"), _w("d2", "decode", tensor_parallel_size=2)
    one = price_disaggregated(req, p1, d1, ctx.topology, ctx.params)
    assert (one.prefill_s, one.transfer_s) == pytest.approx((0.512, 0.00512), rel=1e-12)
    assert one.kv_bytes_per_rank == 51_200_000
    two = price_disaggregated(req, p2, d2, ctx.topology, ctx.params)
    assert two.prefill_s == pytest.approx(0.512 / 1.8, rel=1e-12)
    assert (two.kv_bytes, two.kv_bytes_per_rank) == (51_200_000, 25_600_000)
    assert two.transfer_s == pytest.approx(0.00256, rel=1e-12)
    # TP2 -> TP1: one receiving rank, one stream, whatever the sender's split
    assert price_disaggregated(req, p2, d1, ctx.topology, ctx.params).kv_bytes_per_rank == 51_200_000
    p4 = _w("p4", "prefill", tensor_parallel_size=4)  # 2 KV heads on 4 ranks: 2 distinct holders
    assert price_disaggregated(req, p4, d2, ctx.topology, ctx.params).kv_bytes_per_rank == 25_600_000
    d = cost_model(req, [p1, p2, d1], ctx)
    assert (d.prefill_worker, d.decode_worker) == ("p2", "d1")  # the faster prefill wins
    assert Candidate.from_report("d2", "decode", {"tensor_parallel_size": 2}).tensor_parallel_size == 2


def test_round_robin_order() -> None:
    workers = [
        _w("d3", "decode"),
        _w("p2", "prefill"),
        _w("d1", "decode"),
        _w("p1", "prefill"),
        _w("d2", "decode"),
    ]
    picks = [round_robin(_req(64), workers, dataclasses.replace(_ctx(SAME_NODE), turn=t)) for t in range(6)]
    assert [(d.prefill_worker, d.decode_worker) for d in picks] == [
        ("p1", "d1"),
        ("p2", "d2"),
        ("p1", "d3"),
        ("p2", "d1"),
        ("p1", "d2"),
        ("p2", "d3"),
    ]
    never = [
        round_robin(_req(64, mode="never"), workers, dataclasses.replace(_ctx(SAME_NODE), turn=t))
        for t in range(3)
    ]
    assert [(d.prefill_worker, d.decode_worker) for d in never] == [(None, "d1"), (None, "d2"), (None, "d3")]
    # Without a prefill pool, auto stays colocated.
    only_decode = [_w("d1", "both"), _w("d2", "both")]
    d = round_robin(_req(64), only_decode, dataclasses.replace(_ctx(SAME_NODE), turn=1))
    assert (d.prefill_worker, d.decode_worker) == (None, "d2")


def test_least_loaded_ties_broken_by_worker_id() -> None:
    workers = [
        _w("d3", "decode", queue=5, running=1),
        _w("d2", "decode", queue=5, running=1),
        _w("d1", "decode", running=2),
        _w("p2", "prefill", queue=0),
        _w("p1", "prefill", queue=0),
        _w("p0", "prefill", queue=7),
    ]
    for order in (workers, workers[::-1]):
        d = least_loaded(_req(64), order, _ctx(SAME_NODE))
        assert (d.prefill_worker, d.decode_worker) == ("p1", "d2")


def test_policy_registry_and_load_reports() -> None:
    assert get_policy("cost_model") is cost_model
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        get_policy("random")
    w = Candidate.from_report("d1", "decode", {"queue_tokens": 3, "free_blocks": {"G1": 7}, "extra": 1})
    assert (w.queue_tokens, w.running_seqs, dict(w.free_blocks), w.prefill_tokens_per_s) == (
        3,
        0,
        {"G1": 7},
        0.0,
    )
    with pytest.raises(ValueError, match="role must be one of"):
        Candidate("x", "router")
