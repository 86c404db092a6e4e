"""The parts of a checkpoint's config that pick a layer's attention and MLP kind: mixture-of-experts
routing (:class:`MoEConfig`) and multi-head latent attention (:class:`MLAConfig`).

``engine.config`` reads the Llama-family fields and asks :func:`parse_moe` / :func:`parse_mla` for
these; each refuses, with a ``ValueError`` naming the key, a routing or attention option the forward
pass does not implement, so a checkpoint that would compute something else never starts.

Which layers are sparse, per family (transformers' own rules)::

    mixtral                every layer
    qwen2_moe, qwen3_moe   layer i unless i in mlp_only_layers, and (i + 1) % decoder_sparse_step == 0
    deepseek_v3            layers first_k_dense_replace .. L-1 (the first ones are dense)

Routing, per family (``scoring``: how router logits become expert scores)::

    mixtral      softmax over all experts, top-k, renormalized                    (weights fp32)
    qwen*_moe    softmax, top-k, renormalized if norm_topk_prob                   (weights run dtype)
    deepseek_v3  sigmoid; choice by score + e_score_correction_bias within the topk_group best of
                 n_group groups (a group's score: its two best); weights = the chosen sigmoids,
                 renormalized if norm_topk_prob, times routed_scaling_factor
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


class CheckpointError(ValueError):
    """A checkpoint the engine refuses to run (an architecture, a routing or attention option it
    does not implement); the message names the file and the key. Every ``tandem`` command prints it
    as one line and exits with status 2 (deploy/cli.py)."""


@dataclass(frozen=True, slots=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # each routed expert's SwiGLU width
    scoring: str  # "softmax" | "sigmoid"
    norm_topk_prob: bool
    routed_scaling_factor: float  # 1.0 but for DeepSeek
    num_groups: int  # n_group; 1: no group limit
    topk_groups: int  # topk_group: groups a token may choose experts from
    score_correction_bias: bool  # DeepSeek's e_score_correction_bias (added for the choice only)
    weights_fp32: bool  # Mixtral keeps the routing weights in fp32; Qwen casts them to the run dtype
    shared_intermediate_size: int  # the shared expert's SwiGLU width; 0: none
    shared_gate: bool  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales the shared expert
    sparse_layers: tuple[int, ...]  # the layers whose MLP is this MoE; the others are dense

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers


@dataclass(frozen=True, slots=True)
class MLAConfig:
    q_lora_rank: int | None  # None: q is one projection (DeepSeek-V2-Lite); else q_a -> norm -> q_b
    kv_lora_rank: int  # the latent's width: what the cache holds per token, with the rope part
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # the rope dims are stored as interleaved pairs (DeepSeek's checkpoints)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """The cache's per-token, per-layer width: the compressed KV and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def _int(raw: dict[str, Any], key: str, default: Any = None) -> int:
    value = raw.get(key, default)
    if value is None or isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{key}={value!r}: must be a positive integer")
    return int(value)


def parse_moe(raw: dict[str, Any], arch: str, num_layers: int) -> MoEConfig:
    """The MoE of a ``mixtral`` / ``qwen2_moe`` / ``qwen3_moe`` / ``deepseek_v3`` config."""
    if arch == "mixtral":
        n = _int(raw, "num_local_experts")
        inter = _int(raw, "intermediate_size")
        sparse = tuple(range(num_layers))
        scoring, norm, fp32 = "softmax", True, True
        shared, shared_gate = 0, False
    elif arch in ("qwen2_moe", "qwen3_moe"):
        key = "num_experts" if raw.get("num_experts") is not None else "num_local_experts"
        n = _int(raw, key)
        inter = _int(raw, "moe_intermediate_size")
        step = _int(raw, "decoder_sparse_step", 1)
        only = raw.get("mlp_only_layers") or []
        if not isinstance(only, list) or any(not isinstance(i, int) for i in only):
            raise ValueError(f"mlp_only_layers={only!r}: must be a list of layer indices")
        sparse = tuple(i for i in range(num_layers) if i not in only and (i + 1) % step == 0)
        scoring, norm, fp32 = "softmax", bool(raw.get("norm_topk_prob", False)), False
        shared = int(raw.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0
        shared_gate = shared > 0
    elif arch == "deepseek_v3":
        n = _int(raw, "n_routed_experts")
        inter = _int(raw, "moe_intermediate_size")
        first = int(raw.get("first_k_dense_replace") or 0)
        if not 0 <= first <= num_layers:
            raise ValueError(f"first_k_dense_replace={first}: must be within 0..num_hidden_layers")
        freq = raw.get("moe_layer_freq", 1)
        if freq != 1:
            raise ValueError(
                f"moe_layer_freq={freq!r}: only 1 (every layer after the dense ones) is supported"
            )
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if raw.get(key, want) != want:
                raise ValueError(f"{key}={raw[key]!r}: only {want!r} is supported (DeepSeek-V3 routing)")
        sparse = tuple(range(first, num_layers))
        scoring, norm, fp32 = "sigmoid", bool(raw.get("norm_topk_prob", True)), True
        shared = int(raw.get("n_shared_experts") or 0) * inter
        shared_gate = False
    else:
        raise ValueError(f"architecture {arch!r} has no mixture of experts")
    top_k = _int(raw, "num_experts_per_tok")
    if top_k > n:
        raise ValueError(f"num_experts_per_tok={top_k} exceeds the {n} experts")
    groups = int(raw.get("n_group") or 1) if arch == "deepseek_v3" else 1
    topk_groups = int(raw.get("topk_group") or groups) if arch == "deepseek_v3" else 1
    if groups < 1 or n % groups:
        raise ValueError(f"n_group={groups}: must divide n_routed_experts={n}")
    if not 1 <= topk_groups <= groups:
        raise ValueError(f"topk_group={topk_groups}: must be within 1..n_group={groups}")
    if groups > 1 and n // groups < 2:
        raise ValueError(
            f"n_group={groups}: each group needs at least 2 experts (a group's score is its best two)"
        )
    if top_k > topk_groups * (n // groups):
        raise ValueError(
            f"num_experts_per_tok={top_k} exceeds the experts of topk_group={topk_groups} groups"
        )
    scale = float(raw.get("routed_scaling_factor") or 1.0) if arch == "deepseek_v3" else 1.0
    return MoEConfig(
        num_experts=n,
        top_k=top_k,
        intermediate_size=inter,
        scoring=scoring,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        num_groups=groups,
        topk_groups=topk_groups,
        score_correction_bias=arch == "deepseek_v3",
        weights_fp32=fp32,
        shared_intermediate_size=shared,
        shared_gate=shared_gate,
        sparse_layers=sparse,
    )


def parse_mla(raw: dict[str, Any]) -> MLAConfig:
    """DeepSeek-V3's multi-head latent attention."""
    q_lora = raw.get("q_lora_rank")
    mla = MLAConfig(
        q_lora_rank=None if q_lora is None else _int(raw, "q_lora_rank"),
        kv_lora_rank=_int(raw, "kv_lora_rank"),
        qk_nope_head_dim=_int(raw, "qk_nope_head_dim"),
        qk_rope_head_dim=_int(raw, "qk_rope_head_dim"),
        v_head_dim=_int(raw, "v_head_dim"),
        rope_interleave=bool(raw.get("rope_interleave", True)),
    )
    if mla.qk_rope_head_dim % 2:
        raise ValueError(f"qk_rope_head_dim={mla.qk_rope_head_dim}: must be even (rotary pairs)")
    return mla
