"""GGUF mixture-of-experts files (llama.cpp's ``qwen3moe``): their config keys and their stacked
expert tensors, as engine/gguf_loader.py hands them to the rest of the engine.

llama.cpp stores each sparse layer's experts stacked, one tensor per projection, where a Hugging
Face checkpoint has one tensor per expert::

    blk.{i}.ffn_gate_exps.weight   (E, I, hidden)  ->  model.layers.{i}.mlp.experts.{e}.gate_proj.weight
    blk.{i}.ffn_up_exps.weight     (E, I, hidden)  ->  ...experts.{e}.up_proj.weight
    blk.{i}.ffn_down_exps.weight   (E, hidden, I)  ->  ...experts.{e}.down_proj.weight
    blk.{i}.ffn_gate_inp.weight    (E, hidden)     ->  model.layers.{i}.mlp.gate.weight  (the router)

llama.cpp's qwen3moe always renormalizes the top-k weights (transformers' GGUF loading sets
``norm_topk_prob`` the same way), and every layer is sparse.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

ARCHITECTURES = {"qwen3moe": "Qwen3MoeForCausalLM"}
LAYER = {"ffn_gate_inp": "mlp.gate"}
_STACKED = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")


def moe_config(arch_key: Any) -> dict[str, Any]:
    """The config.json keys of a MoE file (``arch_key(name)``: its ``{arch}.name`` metadata)."""
    return {
        "num_experts": int(arch_key("expert_count")),
        "num_experts_per_tok": int(arch_key("expert_used_count")),
        "moe_intermediate_size": int(arch_key("expert_feed_forward_length")),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def split_experts(name: str, arr: np.ndarray) -> dict[str, np.ndarray] | None:
    """A stacked expert tensor (E, rows, cols) as one (rows, cols) tensor per expert under its
    Hugging Face name; None for any other tensor."""
    m = _STACKED.fullmatch(name)
    if m is None:
        return None
    layer, proj = m.group(1), m.group(2)
    return {
        f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight": np.ascontiguousarray(arr[e])
        for e in range(arr.shape[0])
    }
