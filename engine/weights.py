"""Loading a checkpoint's safetensors into the immutable weight types the forward pass reads.

Owns the Hugging Face tensor names, single-file and sharded (``model.safetensors.index.json``)
checkpoints (and GGUF files, through ``engine.gguf_loader``), and dtype/device placement.
safetensors maps the files into memory; a tensor whose file dtype already equals the run dtype (on
CPU) is kept as that mmap-backed view, so weights are never copied twice, and only mismatching
dtypes are converted. Projections are *not* fused: a fused q/k/v matmul would need a copy of every
weight, and separate matmuls give transformers' numerics bit for bit.

Quantized checkpoints (GGUF blocks, block-scaled FP8) load either dequantized to the run dtype, or,
with ``native``, as ``engine.quant`` weights that keep their packed bytes (``Weight`` below is
either); the model multiplies by those through ``engine.quant.method``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engine.config import ModelConfig
from engine.kv_layout import torch_dtype
from engine.quant.weight import Weight, is_quantized

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    q_proj: Weight  # (H * D, hidden)
    k_proj: Weight  # (H_kv * D, hidden)
    v_proj: Weight  # (H_kv * D, hidden)
    q_bias: torch.Tensor | None  # (H * D,)
    k_bias: torch.Tensor | None  # (H_kv * D,)
    v_bias: torch.Tensor | None  # (H_kv * D,)
    o_proj: Weight  # (hidden, H * D)
    o_bias: torch.Tensor | None  # (hidden,): Llama with attention_bias has it, Qwen2 does not
    post_norm: torch.Tensor  # (hidden,)
    gate_proj: Weight  # (I, hidden)
    up_proj: Weight  # (I, hidden)
    down_proj: Weight  # (hidden, I)


@dataclass(frozen=True, slots=True)
class ModelWeights:
    embed: Weight  # (V, hidden)
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # (hidden,)
    lm_head: Weight  # (V, hidden); the embedding itself when tied


def read_tensors(
    path: str | Path, dtype: torch.dtype | None = None, native: bool = False
) -> dict[str, Weight]:
    """Every tensor of the checkpoint at ``path``, mmap-backed, keyed by its Hugging Face name. A
    quantized one (GGUF blocks, FP8 with its scales) is an ``engine.quant`` weight with ``native``,
    else dequantized (to ``dtype`` when given)."""
    path = Path(path)
    if path.is_file():
        from engine.gguf_loader import read_gguf_tensors

        return read_gguf_tensors(path, dtype or torch.float32, native)
    if (path / INDEX_FILE).exists():
        weight_map: dict[str, str] = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(path / shard))
    elif (path / SINGLE_FILE).exists():
        tensors = load_file(path / SINGLE_FILE)
    else:
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    from engine.quant.fp8 import checkpoint_block, collect_fp8

    block = checkpoint_block(path)
    if block is None:
        return dict(tensors)
    weights = collect_fp8(tensors, block)
    if not native:
        weights = {
            n: w if isinstance(w, torch.Tensor) else w.dequantize(dtype or torch.float32)
            for n, w in weights.items()
        }
    return weights


def load_weights(
    path: str | Path, config: ModelConfig, device: str | torch.device = "cpu", native: bool = False
) -> ModelWeights:
    """Read, check and place the checkpoint's weights for ``config`` (its dtype is the run dtype);
    ``native``: quantized ones stay quantized (``engine.quant``)."""
    dtype = torch_dtype(config.dtype)
    tensors = read_tensors(path, dtype, native)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> Any:
        if name not in tensors:
            raise ValueError(f"checkpoint {path} lacks tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, config implies {shape}")
        used.add(name)
        if is_quantized(t):
            return t.to(device)  # packed bytes: no dtype (the kernels dequantize)
        assert isinstance(t, torch.Tensor)
        return t.to(device=device, dtype=dtype)  # returns t itself (no copy) when nothing changes

    def maybe(name: str, shape: tuple[int, ...], required: bool) -> torch.Tensor | None:
        if not (required or name in tensors):
            return None
        t = take(name, shape)
        return t.dequantize(dtype) if is_quantized(t) else t  # a bias is never multiplied

    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (c.hidden_size,)),
                q_proj=take(p + "self_attn.q_proj.weight", (q_out, c.hidden_size)),
                k_proj=take(p + "self_attn.k_proj.weight", (kv_out, c.hidden_size)),
                v_proj=take(p + "self_attn.v_proj.weight", (kv_out, c.hidden_size)),
                q_bias=maybe(p + "self_attn.q_proj.bias", (q_out,), c.attention_bias),
                k_bias=maybe(p + "self_attn.k_proj.bias", (kv_out,), c.attention_bias),
                v_bias=maybe(p + "self_attn.v_proj.bias", (kv_out,), c.attention_bias),
                o_proj=take(p + "self_attn.o_proj.weight", (c.hidden_size, q_out)),
                o_bias=maybe(p + "self_attn.o_proj.bias", (c.hidden_size,), False),
                post_norm=take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
                gate_proj=take(p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
                up_proj=take(p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size)),
                down_proj=take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
            )
        )
    embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    if c.tie_word_embeddings:
        lm_head = embed
        used.add("lm_head.weight")  # some tied checkpoints still store a copy: ignore it
    else:
        lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))
    norm = take("model.norm.weight", (c.hidden_size,))
    unused = sorted(n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ValueError(f"checkpoint {path} has tensors the model does not use: {unused[:5]}")
    return ModelWeights(embed=embed, layers=tuple(layers), norm=norm, lm_head=lm_head)
