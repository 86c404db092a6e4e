"""Tensor parallel splits (engine/tp_layout.py) and the handoff's head routes between two splits
(kv_transfer/heads.py): exact heads, ranks and offsets on tiny configurations."""

from __future__ import annotations

import pytest

from engine.tp_layout import check_tensor_parallel, columns, kv_heads, local_kv_heads, q_heads, vocab_rows
from kv_transfer.heads import HeadRoute, KVShardLayout, plan_routes, receiver_parts

pytestmark = pytest.mark.unit


def test_heads_split_and_gqa_kv_heads_follow_their_query_heads() -> None:
    assert [q_heads(8, 2, r) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [kv_heads(4, 2, r) for r in range(2)] == [range(0, 2), range(2, 4)]
    # fewer KV heads than ranks: each is replicated on tp / kv ranks, next to its query heads
    assert [kv_heads(2, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [kv_heads(1, 2, r) for r in range(2)] == [range(0, 1), range(0, 1)]
    for num_heads, num_kv, tp in ((8, 4, 2), (8, 2, 4), (4, 1, 2), (8, 8, 8)):
        group = num_heads // num_kv
        for r in range(tp):
            assert {h // group for h in q_heads(num_heads, tp, r)} <= set(kv_heads(num_kv, tp, r))
            assert len(kv_heads(num_kv, tp, r)) == local_kv_heads(num_kv, tp)
    assert [columns(128, 2, r) for r in range(2)] == [range(0, 64), range(64, 128)]
    assert [vocab_rows(385, 2, r) for r in range(2)] == [range(0, 193), range(193, 385)]
    assert [vocab_rows(5, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 5), range(5, 5)]


def test_splits_that_do_not_divide_are_refused_with_the_numbers() -> None:
    check_tensor_parallel(2, 4, 2, 128)
    check_tensor_parallel(4, 4, 2)  # KV heads replicated
    with pytest.raises(ValueError, match="3 does not divide the model's 4 attention heads"):
        check_tensor_parallel(3, 4, 2)
    with pytest.raises(ValueError, match="4 and the model's 6 KV heads: one must divide the other"):
        check_tensor_parallel(4, 12, 6)
    with pytest.raises(ValueError, match="does not divide the model's intermediate_size 130"):
        check_tensor_parallel(4, 8, 4, 130)
    with pytest.raises(ValueError, match=">= 1"):
        check_tensor_parallel(0, 4, 2)


def _layout(tp: int, kv: int = 4, **kw: object) -> KVShardLayout:
    """A worker of ``tp`` tensor-parallel ranks, described as the worker describes it: each rank's
    KV heads by engine/tp_layout.py's rule (kv_transfer/heads.py only reads the description)."""
    base: dict = dict(fingerprint="llama-float32-x", dtype="float32", block_size=16, num_layers=2, head_dim=8)
    base.update(kw)
    held = tuple((h.start, len(h)) for h in (kv_heads(kv, tp, r) for r in range(tp))) if tp > 1 else ()
    return KVShardLayout(num_kv_heads=kv, held=held, **base)


def test_routes_between_any_two_splits() -> None:
    # the same split: each rank to its peer, all its heads
    assert plan_routes(_layout(1), _layout(1)) == [HeadRoute(0, 0, 0, 0, 4)]
    assert plan_routes(_layout(2), _layout(2)) == [HeadRoute(0, 0, 0, 0, 2), HeadRoute(1, 1, 0, 0, 2)]
    # TP2 -> TP1: both prefill ranks write into the one decode pool, each at its heads' offset
    two_to_one = plan_routes(_layout(2), _layout(1))
    assert two_to_one == [HeadRoute(0, 0, 0, 0, 2), HeadRoute(1, 0, 0, 2, 2)]
    assert receiver_parts(two_to_one, 0, 4) == ((0, 2), (2, 2))
    # TP1 -> TP2: the one prefill rank writes its lower heads to decode rank 0, upper to rank 1
    one_to_two = plan_routes(_layout(1), _layout(2))
    assert one_to_two == [HeadRoute(0, 0, 0, 0, 2), HeadRoute(0, 1, 2, 0, 2)]
    assert receiver_parts(one_to_two, 1, 2) == ()  # one route brings all of rank 1's heads
    # TP4 -> TP2 and TP2 -> TP4
    assert plan_routes(_layout(4), _layout(2)) == [
        HeadRoute(0, 0, 0, 0, 1),
        HeadRoute(1, 0, 0, 1, 1),
        HeadRoute(2, 1, 0, 0, 1),
        HeadRoute(3, 1, 0, 1, 1),
    ]
    assert plan_routes(_layout(2), _layout(4)) == [
        HeadRoute(0, 0, 0, 0, 1),
        HeadRoute(0, 1, 1, 0, 1),
        HeadRoute(1, 2, 0, 0, 1),
        HeadRoute(1, 3, 1, 0, 1),
    ]


def test_replicated_kv_heads_are_sent_once_per_receiving_rank() -> None:
    # 2 KV heads on 4 prefill ranks (each replicated twice) -> 1 decode rank: one holder sends each
    assert plan_routes(_layout(4, kv=2), _layout(1, kv=2)) == [
        HeadRoute(0, 0, 0, 0, 1),
        HeadRoute(2, 0, 0, 1, 1),
    ]
    # -> 4 decode ranks, replicated there too: every receiving rank gets its head, from both holders
    routes = plan_routes(_layout(4, kv=2), _layout(4, kv=2))
    assert routes == [
        HeadRoute(0, 0, 0, 0, 1),
        HeadRoute(1, 1, 0, 0, 1),
        HeadRoute(2, 2, 0, 0, 1),
        HeadRoute(3, 3, 0, 0, 1),
    ]
    # 1 prefill rank -> 2 decode ranks sharing the single KV head
    assert plan_routes(_layout(1, kv=1), _layout(2, kv=1)) == [
        HeadRoute(0, 0, 0, 0, 1),
        HeadRoute(0, 1, 0, 0, 1),
    ]


def test_every_receiving_head_is_covered_exactly_once() -> None:
    for kv in (1, 2, 4, 8):
        splits = [t for t in (1, 2, 4, 8) if kv % t == 0 or t % kv == 0]
        for p in splits:
            for d in splits:
                src, dst = _layout(p, kv=kv), _layout(d, kv=kv)
                for rank in range(d):
                    got = sorted(
                        (r.dst_head + i, src.rank_heads(r.src_rank)[r.src_head + i])
                        for r in plan_routes(src, dst)
                        if r.dst_rank == rank
                        for i in range(r.count)
                    )
                    mine = dst.rank_heads(rank)
                    assert got == [(i, mine[i]) for i in range(len(mine))], (kv, p, d, rank)


def test_layouts_that_differ_beyond_the_split_cannot_exchange_kv() -> None:
    assert _layout(2).mismatch(_layout(1)) == ""
    why = _layout(1).mismatch(_layout(1, fingerprint="qwen2-float32-y", block_size=8))
    assert why == "fingerprint 'llama-float32-x' vs 'qwen2-float32-y'; block_size 16 vs 8"
    with pytest.raises(ValueError, match="KV layouts differ: dtype 'float32' vs 'bfloat16'"):
        plan_routes(_layout(1), _layout(2, dtype="bfloat16"))
    with pytest.raises(ValueError, match="the ranks hold 3 of the model's 4 KV heads"):
        _layout(3)  # the description of a split that loses a head is refused
    with pytest.raises(ValueError, match="rank 1 holds KV heads 3\\+2 of 4"):
        KVShardLayout("f", "float32", 16, 2, 4, 8, held=((0, 4), (3, 2)))


DEEPSEEK = dict(
    architectures=["DeepseekV3ForCausalLM"],
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
)


def test_a_latent_pool_goes_once_to_each_receiving_rank() -> None:
    """MLA: every rank of a TP worker holds the whole latent (one 'head' of r + rope); a TP2 prefill
    worker sends it to a one-rank decode worker once (not once per prefill rank)."""
    from engine.config import ModelConfig
    from engine.tp_layout import Parallelism
    from pool_runtime.tp_handoff import worker_layout

    mc = ModelConfig.from_dict(DEEPSEEK)
    tp2 = worker_layout(mc, 16, Parallelism(2, 2, 1))
    assert (tp2.num_kv_heads, tp2.head_dim, tp2.latent, tp2.held) == (1, 24, True, ((0, 1), (0, 1)))
    one = worker_layout(mc, 16)
    assert plan_routes(tp2, one) == [HeadRoute(0, 0, 0, 0, 1)]
    assert plan_routes(one, tp2) == [HeadRoute(0, 0, 0, 0, 1), HeadRoute(0, 1, 0, 0, 1)]
    assert plan_routes(tp2, tp2) == [HeadRoute(0, 0, 0, 0, 1), HeadRoute(1, 1, 0, 0, 1)]
    # an expert-parallel worker's replicated attention: every rank holds every KV head
    dense = worker_layout(mc, 16, Parallelism(2, 1, 2))
    assert dense.held == ((0, 1), (0, 1))
    latent_vs_heads = _layout(1, kv=1, fingerprint=mc.fingerprint, head_dim=24, num_layers=2)
    assert one.mismatch(latent_vs_heads) == "latent True vs False"


def test_an_expert_parallel_worker_sends_each_head_from_one_rank() -> None:
    ep2 = KVShardLayout("f", "float32", 16, 2, 4, 8, held=((0, 4), (0, 4)))  # attention replicated
    one = KVShardLayout("f", "float32", 16, 2, 4, 8)
    assert plan_routes(ep2, one) == [HeadRoute(0, 0, 0, 0, 4)]  # prefill EP2 -> decode EP1
    assert plan_routes(one, ep2) == [HeadRoute(0, 0, 0, 0, 4), HeadRoute(0, 1, 0, 0, 4)]  # and back
    assert receiver_parts(plan_routes(one, ep2), 1, 4) == ()
