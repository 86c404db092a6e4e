"""What ``tandem make-model --arch`` adds to a preset for each family beyond Llama: config keys (the
names transformers' class of that family reads) and per-layer tensor names and shapes.

Expert widths keep the *active* MLP of a token equal to the preset's dense one (rounded down to a
multiple of 8), so a MoE checkpoint and the dense checkpoint of the same preset do about the same
arithmetic per token (``tandem bench engine
--arch`` compares them)::

    mixtral, qwen3_moe   top_k experts of width I / top_k
    qwen2_moe            top_k routed + 1 shared expert, each I / (top_k + 1)
    deepseek_v3          top_k routed + 1 shared expert, each I / (top_k + 1); layer 0 dense (I)

DeepSeek-V3's latent attention takes its sizes from the head size D: nope D, rope D / 2, v D,
kv_lora_rank 2 D, q_lora_rank 3 D.
"""

from __future__ import annotations

from typing import Any

Shapes = list[tuple[str, tuple[int, ...]]]

MOE_ARCHS = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
EXTRA_ARCHS = {
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
NUM_EXPERTS, TOP_K = 8, 2


def _width(inter: int, parts: int) -> int:
    """inter / parts, down to a multiple of 8 (transformers' grouped expert matmul wants rows a
    multiple of 16 bytes)."""
    return max(8, inter // parts // 8 * 8)


def arch_config(arch: str, p: dict[str, Any]) -> dict[str, Any]:
    """The family's own keys for preset values ``p`` (hidden_size, intermediate_size, heads, ...)."""
    inter, layers, d = (
        p["intermediate_size"],
        p["num_hidden_layers"],
        p["hidden_size"] // p["num_attention_heads"],
    )
    experts = int(p.get("num_experts", NUM_EXPERTS))
    top_k = int(p.get("num_experts_per_tok", TOP_K))
    if arch == "qwen3":
        return dict(
            attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=layers
        )
    if arch == "mixtral":
        return dict(
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            intermediate_size=_width(inter, top_k),
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    qwen_moe = dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=layers,
    )
    if arch == "qwen2_moe":
        width = _width(inter, top_k + 1)
        return dict(
            qwen_moe,
            moe_intermediate_size=width,
            shared_expert_intermediate_size=width,
            norm_topk_prob=False,
            qkv_bias=True,
        )
    if arch == "qwen3_moe":
        width = _width(inter, top_k)
        return dict(qwen_moe, moe_intermediate_size=width, norm_topk_prob=True, attention_bias=False)
    if arch == "deepseek_v3":
        return dict(
            n_routed_experts=experts,
            num_experts_per_tok=top_k,
            n_shared_experts=1,
            moe_intermediate_size=_width(inter, top_k + 1),
            n_group=4 if experts % 4 == 0 and experts >= 8 else 1,
            topk_group=2 if experts % 4 == 0 and experts >= 8 else 1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            qk_nope_head_dim=d,
            qk_rope_head_dim=d // 2,
            head_dim=d // 2,  # transformers' rotary size for this family: the rope part
            num_key_value_heads=p["num_attention_heads"],  # MLA: every head reads the latent
            v_head_dim=d,
            kv_lora_rank=2 * d,
            q_lora_rank=3 * d,
            rope_interleave=True,
            attention_bias=False,
            num_nextn_predict_layers=0,
        )
    raise ValueError(f"unknown arch {arch!r}")


def _swiglu(
    pre: str, h: int, inter: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> Shapes:
    return [
        (f"{pre}{names[0]}.weight", (inter, h)),
        (f"{pre}{names[1]}.weight", (inter, h)),
        (f"{pre}{names[2]}.weight", (h, inter)),
    ]


def attention_shapes(cfg: dict[str, Any], pre: str) -> Shapes | None:
    """A layer's attention tensors where they are not Llama's q/k/v/o (None: Llama's, plus q/k norms
    for the Qwen3 families, which the caller adds)."""
    if cfg["model_type"] != "deepseek_v3":
        return None
    h, n = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    a = pre + "self_attn."
    return [
        (a + "q_a_proj.weight", (cfg["q_lora_rank"], h)),
        (a + "q_a_layernorm.weight", (cfg["q_lora_rank"],)),
        (a + "q_b_proj.weight", (n * qk, cfg["q_lora_rank"])),
        (a + "kv_a_proj_with_mqa.weight", (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h)),
        (a + "kv_a_layernorm.weight", (cfg["kv_lora_rank"],)),
        (a + "kv_b_proj.weight", (n * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"])),
        (a + "o_proj.weight", (h, n * cfg["v_head_dim"])),
    ]


def mlp_shapes(cfg: dict[str, Any], pre: str, layer: int) -> Shapes:
    """A layer's MLP tensors: Llama's SwiGLU, or the family's router, experts and shared expert."""
    arch, h = cfg["model_type"], cfg["hidden_size"]
    if arch == "mixtral":
        m = pre + "block_sparse_moe."
        shapes: Shapes = [(m + "gate.weight", (cfg["num_local_experts"], h))]
        for e in range(cfg["num_local_experts"]):
            shapes += _swiglu(f"{m}experts.{e}.", h, cfg["intermediate_size"], ("w1", "w3", "w2"))
        return shapes
    m = pre + "mlp."
    sparse = arch in MOE_ARCHS and (arch != "deepseek_v3" or layer >= cfg["first_k_dense_replace"])
    if not sparse:
        return _swiglu(m, h, cfg["intermediate_size"])
    n = cfg["n_routed_experts"] if arch == "deepseek_v3" else cfg["num_experts"]
    shapes = [(m + "gate.weight", (n, h))]
    if arch == "deepseek_v3":
        shapes.append((m + "gate.e_score_correction_bias", (n,)))
    for e in range(n):
        shapes += _swiglu(f"{m}experts.{e}.", h, cfg["moe_intermediate_size"])
    if arch == "qwen2_moe":
        shapes += _swiglu(m + "shared_expert.", h, cfg["shared_expert_intermediate_size"])
        shapes.append((m + "shared_expert_gate.weight", (1, h)))
    if arch == "deepseek_v3":
        shapes += _swiglu(m + "shared_experts.", h, cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
    return shapes
