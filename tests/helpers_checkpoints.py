"""Small random checkpoints for tests, written by transformers' own model classes.

``make_checkpoint(dir, arch="llama", ...)`` builds a tiny Llama / Qwen2 / Mistral / Qwen3 / Mixtral /
Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 (``ARCH_DEFAULTS``: its expert and latent sizes) with a fixed seed,
saves it with ``save_pretrained`` (one ``model.safetensors``, or shards plus an index with
``sharded=True``). ``load_reference(dir, dtype)`` loads it back with ``from_pretrained``: the
numerical reference. (Not the model that was saved: ``model.to(bf16)`` also rounds its rotary
``inv_freq`` buffer to bf16, which ``from_pretrained(dtype=bf16)`` keeps in fp32.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY: dict[str, Any] = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,  # transformers' default is 11008: always set it
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    initializer_range=0.1,  # larger than the 0.02 default, so logits spread and argmax ties are rare
)


# Per architecture, what a tiny one adds to TINY (overridable): experts, routing, latent sizes.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=16),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        num_key_value_heads=4,
        num_nextn_predict_layers=0,
    ),
}


def make_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    sharded: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    generation_eos: int | list[int] | None = None,
    **overrides: Any,
) -> Path:
    """Write a random checkpoint of family ``arch`` to ``path``; ``overrides`` go to the config
    (e.g. ``num_key_value_heads=4``, ``tie_word_embeddings=True``, ``rope_parameters={...}``).
    The weights are stored in ``dtype``. Returns ``path``."""
    from transformers import (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )
    from transformers.utils import logging

    logging.disable_progress_bar()

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
        "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
        "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    kwargs = {**TINY, **ARCH_DEFAULTS.get(arch, {})}
    if arch == "mistral":
        kwargs["sliding_window"] = None  # Mistral defaults to a 4096 window, which we refuse
    kwargs.update(overrides)
    theta = kwargs.pop("rope_theta")
    kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": theta})
    kwargs["rope_parameters"].setdefault("rope_theta", theta)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # init is N(0, 0.02) with unit norms: perturb norms and biases too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():  # DeepSeek's routing bias is a buffer, saved with the weights
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model = model.to(getattr(torch, dtype)).eval()
    path = Path(path)
    # tiny models fit one shard: a small max_shard_size forces several files plus the index
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    del model
    if generation_eos is not None:
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        gen["eos_token_id"] = generation_eos
        gen_file.write_text(json.dumps(gen))
    return path


def load_reference(path: str | Path, dtype: str = "float32") -> Any:
    """The transformers model of the checkpoint at ``path``, run in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
