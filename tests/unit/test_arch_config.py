"""engine/arch.py and the new families in engine/config.py: which layers are sparse, the routing
options read per family, refusals that name the key, MLA's latent KV layout and the KV bytes per
token the router prices (router/pools_backend.cost_params)."""

from __future__ import annotations

from typing import Any

import pytest

from engine.arch import CheckpointError
from engine.config import ModelConfig
from router.pools_backend import cost_params

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
)


def _cfg(arch: str, **kw: Any) -> dict[str, Any]:
    return {**BASE, "architectures": [arch], **kw}


def test_sparse_layers_follow_each_familys_rule() -> None:
    mixtral = ModelConfig.from_dict(_cfg("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2))
    assert mixtral.moe is not None and mixtral.moe.sparse_layers == (0, 1, 2, 3)
    assert (mixtral.moe.scoring, mixtral.moe.norm_topk_prob, mixtral.moe.weights_fp32) == (
        "softmax",
        True,
        True,
    )
    qwen = ModelConfig.from_dict(
        _cfg(
            "Qwen2MoeForCausalLM",
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        )
    )
    assert qwen.moe is not None and qwen.moe.sparse_layers == (1,)  # (i + 1) % 2 == 0, minus layer 3
    assert (qwen.moe.shared_intermediate_size, qwen.moe.shared_gate, qwen.attention_bias) == (24, True, True)
    q3 = ModelConfig.from_dict(
        _cfg("Qwen3MoeForCausalLM", num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    )
    assert q3.qk_norm and q3.moe is not None and q3.moe.num_experts == 8 and not q3.moe.norm_topk_prob
    ds = ModelConfig.from_dict(_deepseek())
    assert ds.moe is not None and ds.moe.sparse_layers == (2, 3)  # first_k_dense_replace 2
    assert (ds.moe.scoring, ds.moe.num_groups, ds.moe.topk_groups, ds.moe.routed_scaling_factor) == (
        "sigmoid",
        4,
        2,
        2.5,
    )
    assert ds.moe.shared_intermediate_size == 2 * 16  # n_shared_experts x moe_intermediate_size
    dense = ModelConfig.from_dict(_cfg("Qwen3ForCausalLM", head_dim=16))
    assert dense.qk_norm and dense.moe is None and dense.mla is None


def _deepseek(**kw: Any) -> dict[str, Any]:
    base = dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=2,
        routed_scaling_factor=2.5,
        kv_lora_rank=24,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        num_key_value_heads=4,
    )
    return _cfg("DeepseekV3ForCausalLM", **{**base, **kw})


def test_mla_caches_the_latent_and_the_router_prices_it() -> None:
    ds = ModelConfig.from_dict(_deepseek())
    kv = ds.kv_layout(16)
    assert (kv.latent, kv.planes, kv.num_kv_heads, kv.head_dim) == (True, 1, 1, 24 + 8)
    assert kv.pool_shape(10) == (4, 10, 1, 1, 16, 32)
    assert ds.kv_bytes_per_token == 4 * 32 * 4  # layers x (kv_lora_rank + rope) x fp32
    assert (ds.head_dim, ds.rope_dim) == (24, 8)  # a query/key head: nope + rope; rope rotates 8
    # the same attention shape as per-head K and V: 4 heads of 24 (the nope + rope key) and V
    mha = ModelConfig.from_dict(_cfg("LlamaForCausalLM", head_dim=24))
    assert mha.kv_bytes_per_token == 4 * 2 * 4 * 24 * 4
    params = cost_params(ds, 16)
    assert (params.kv_bytes_per_token, params.num_kv_heads) == (ds.kv_bytes_per_token, 1)
    assert params.kv_bytes_per_token * 6 == cost_params(mha, 16).kv_bytes_per_token


def test_dense_fingerprints_are_unchanged_by_the_new_fields() -> None:
    """A dense Llama's block hashes (and G3 files) survive this change: the new fields, at their
    defaults, are not part of its fingerprint."""
    llama = ModelConfig.from_dict(_cfg("LlamaForCausalLM"))
    assert llama.fingerprint == "llama-float32-" + _old_style_digest(llama)
    ds = ModelConfig.from_dict(_deepseek())
    assert ds.fingerprint != ModelConfig.from_dict(_deepseek(topk_group=3)).fingerprint


def _old_style_digest(c: ModelConfig) -> str:
    import hashlib
    import json
    from dataclasses import asdict

    fields = asdict(c)
    for name in ("bos_token_id", "eos_token_ids", "qk_norm", "moe", "mla"):
        fields.pop(name)
    return hashlib.blake2b(
        json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=12
    ).hexdigest()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (_deepseek(topk_method="greedy"), "topk_method"),
        (_deepseek(scoring_func="softmax"), "scoring_func"),
        (_deepseek(n_group=3), "n_group"),
        (_deepseek(topk_group=5), "topk_group"),
        (_deepseek(moe_layer_freq=2), "moe_layer_freq"),
        (_deepseek(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (_deepseek(rope_scaling={"type": "longrope", "factor": 40.0}), "rope_scaling"),
        (_deepseek(rope_scaling={"type": "yarn", "factor": 40.0}), "original_max_position_embeddings"),
        (_deepseek(num_experts_per_tok=12), "num_experts_per_tok"),
        (_cfg("MixtralForCausalLM", num_experts_per_tok=2), "num_local_experts"),
        (_cfg("Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2), "moe_intermediate_size"),
        (
            _cfg(
                "Qwen3MoeForCausalLM",
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=8,
                mlp_only_layers=3,
            ),
            "mlp_only_layers",
        ),
        (_cfg("LlamaForCausalLM", num_experts=4), "num_experts"),
        (_cfg("Qwen3ForCausalLM", use_sliding_window=True), "use_sliding_window"),
    ],
)
def test_unsupported_options_are_refused_naming_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_dict(raw)


def test_a_refused_checkpoint_names_its_path(tmp_path: Any) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps(_deepseek(topk_method="greedy")))
    with pytest.raises(CheckpointError, match=f"{tmp_path}: topk_method='greedy'"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="lacks the key 'hidden_size'"):
        ModelConfig.from_pretrained(tmp_path)
