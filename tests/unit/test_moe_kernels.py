"""MoE routing and the routed-expert backends (engine/moe_routing.py, engine/moe.py, engine/kernels/
cpu_moe.py, engine/kernels/triton_moe.py).

- Routing equals transformers' own router modules (Mixtral, Qwen2-MoE, DeepSeek-V3 with
  group-limited choice and the correction bias) bit for bit on the same logits.
- The grouping and the combine: exact pair order and sums in ascending expert order.
- The C kernel against the grouped torch reference (fp32, atol 1e-5; the SiLU's exp is libm's, not
  torch's), and its batch invariance: a row computed alone is bit for bit the row computed among
  others, which expert parallelism relies on.
- The Triton kernels in the interpreter (tiny shapes) against the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.arch import MoEConfig
from engine.kernels.native import compiler
from engine.moe import GroupedExperts, MoEWeights
from engine.moe_routing import combine, group, route

pytestmark = pytest.mark.unit


def _cfg(**kw: object) -> MoEConfig:
    base: dict[str, object] = dict(
        num_experts=8,
        top_k=2,
        intermediate_size=16,
        scoring="softmax",
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        num_groups=1,
        topk_groups=1,
        score_correction_bias=False,
        weights_fp32=True,
        shared_intermediate_size=0,
        shared_gate=False,
        sparse_layers=(0,),
    )
    return MoEConfig(**{**base, **kw})  # type: ignore[arg-type]


def _sorted(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, perm = ids.sort(dim=1)
    return ids, w.gather(1, perm)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_routing_equals_the_transformers_router(family: str) -> None:
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 32, generator=g)
    bias = None
    if family == "mixtral":
        ref = MixtralTopKRouter(MixtralConfig(hidden_size=32, num_local_experts=8, num_experts_per_tok=2))
        cfg = _cfg()
    elif family == "qwen2_moe":
        hf = Qwen2MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)
        ref = Qwen2MoeTopKRouter(hf)
        cfg = _cfg(top_k=3, norm_topk_prob=False, weights_fp32=False)
    else:
        hf = DeepseekV3Config(
            hidden_size=32,
            n_routed_experts=16,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        )
        ref = DeepseekV3TopkRouter(hf)
        bias = 0.3 * torch.randn(16, generator=g)
        ref.e_score_correction_bias.copy_(bias)
        cfg = _cfg(
            num_experts=16, top_k=3, scoring="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5
        )
    with torch.no_grad():
        ref.weight.copy_(torch.randn(ref.weight.shape, generator=g))
        _, want_w, want_ids = ref(h)
    weight = ref.weight.detach()
    ids, w = route(h, lambda x: F.linear(x, weight), cfg, bias)
    got_ids, got_w = _sorted(ids, w)
    want_ids, want_w = _sorted(want_ids, want_w)
    assert torch.equal(got_ids, want_ids)
    assert torch.equal(got_w, want_w)
    if family == "deepseek_v3":  # group-limited: every choice within the token's 2 best groups of 4
        choice = (torch.sigmoid(F.linear(h, weight)) + bias).view(40, 4, 4)
        best = choice.topk(2, dim=-1)[0].sum(-1).topk(2, dim=-1)[1]  # (T, 2) groups
        assert all(set((got_ids[t] // 4).tolist()) <= set(best[t].tolist()) for t in range(40))


def test_grouping_and_combine_order() -> None:
    ids = torch.tensor([[2, 0, 1], [1, 3, 2]])
    w = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.125, 0.375]])
    r = group(ids, w, 4)
    assert r.ids.tolist() == [[0, 1, 2], [1, 2, 3]]
    assert r.weights.tolist() == [[0.5, 0.25, 0.25], [0.5, 0.375, 0.125]]
    assert r.counts == [1, 2, 2, 1]
    assert r.pair_tokens.tolist() == [0, 0, 1, 0, 1, 1]  # e0: t0 | e1: t0, t1 | e2: t0, t1 | e3: t1
    # sorted rows: e0/t0, e1/t0, e1/t1, e2/t0, e2/t1, e3/t1; fp32 sums where the order shows
    y = torch.tensor([[1.0], [1e8], [3.0], [-1e8], [1e8], [-1e8]])
    out = combine(y, r.rows)
    # t0: (e0 + e1) + e2 = (1 + 1e8) - 1e8 = 0 in fp32 (any other order keeps the 1);
    # t1: (e1 + e2) + e3 = (3 + 1e8) - 1e8 = 0
    assert out.flatten().tolist() == [0.0, 0.0]
    assert ((y[1] + y[3]) + y[0]).item() == 1.0  # (another order keeps the 1)


def _experts(num: int, hidden: int, inter: int, seed: int) -> MoEWeights:
    g = torch.Generator().manual_seed(seed)

    def mats(rows: int, cols: int) -> tuple[torch.Tensor, ...]:
        return tuple(0.2 * torch.randn(rows, cols, generator=g) for _ in range(num))

    return MoEWeights(
        router=torch.randn(num, hidden, generator=g),
        correction_bias=None,
        expert_ids=tuple(range(num)),
        gate=mats(inter, hidden),
        up=mats(inter, hidden),
        down=mats(hidden, inter),
    )


def _pairs(counts: list[int], hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = sum(counts)
    return torch.randn(p, hidden, generator=g), torch.rand(p, generator=g)


@pytest.mark.skipif(compiler() is None, reason="no C compiler: the kernel cannot be built here")
def test_cpu_kernel_matches_the_reference_and_is_batch_invariant() -> None:
    from engine.kernels.cpu_moe import CpuExperts, cpu_moe_available

    if not cpu_moe_available():
        pytest.skip("no AVX2/FMA (or TANDEM_CPU_CAPABILITY=default): the C GEMM is not compiled in")
    w = _experts(6, 72, 40, seed=1)  # widths off the 16-wide panels and the 6/12-row blocks
    counts = [5, 0, 1, 13, 0, 30]
    xs, rw = _pairs(counts, 72, seed=2)
    want = GroupedExperts(w, "torch")(xs, counts, rw)
    kernel = CpuExperts(w.gate, w.up, w.down)
    got = kernel(xs, counts, rw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # every row alone (its expert, one row) is the same floats as in the batch
    start = 0
    for e, n in enumerate(counts):
        for i in range(start, start + n):
            one = [0] * len(counts)
            one[e] = 1
            assert torch.equal(kernel(xs[i : i + 1], one, rw[i : i + 1]), got[i : i + 1])
        start += n


def test_triton_kernels_match_the_reference() -> None:
    pytest.importorskip("triton")
    from engine.kernels.triton_moe import TritonExperts, tiles

    assert tiles([3, 0, 17], block_m=16) == ([0, 2, 2], [0, 3, 19], [3, 19, 20])
    from engine.kernels.paged_attention import runs_interpreted

    w = _experts(3, 32, 24, seed=4)
    counts = [3, 0, 17]
    xs, rw = _pairs(counts, 32, seed=5)
    want = GroupedExperts(w, "torch")(xs, counts, rw)
    dev = "cpu" if runs_interpreted() else "cuda"  # compiled (TANDEM_GPU=1): on the GPU
    kernel = TritonExperts(*([t.to(dev) for t in ts] for ts in (w.gate, w.up, w.down)))
    got = kernel(xs.to(dev), counts, rw.to(dev)).cpu()
    torch.testing.assert_close(got, want, atol=1e-5 if dev == "cpu" else 1e-3, rtol=0)  # GPU: TF32 dots
