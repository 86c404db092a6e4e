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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engine.arch import CheckpointError
from engine.config import ModelConfig
from engine.kv_layout import torch_dtype
from engine.mla import MLAWeights, load_mla_weights
from engine.moe import MoEWeights, load_moe_weights
from engine.quant.weight import Weight, is_quantized

Take = Callable[[str, tuple[int, ...]], Any]
Maybe = Callable[[str, tuple[int, ...], bool], "torch.Tensor | None"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer. Its attention is per-head (q/k/v/o) or latent (``mla``); its MLP dense
    (gate/up/down) or a mixture of experts (``moe``): the fields of the kind it lacks are None."""

    input_norm: torch.Tensor  # (hidden,)
    q_proj: Weight | None  # (H * D, hidden)
    k_proj: Weight | None  # (H_kv * D, hidden)
    v_proj: Weight | None  # (H_kv * D, hidden)
    q_bias: torch.Tensor | None  # (H * D,)
    k_bias: torch.Tensor | None  # (H_kv * D,)
    v_bias: torch.Tensor | None  # (H_kv * D,)
    o_proj: Weight | None  # (hidden, H * D)
    o_bias: torch.Tensor | None  # (hidden,): Llama with attention_bias has it, Qwen2 does not
    post_norm: torch.Tensor  # (hidden,)
    gate_proj: Weight | None  # (I, hidden)
    up_proj: Weight | None  # (I, hidden)
    down_proj: Weight | None  # (hidden, I)
    q_norm: torch.Tensor | None = None  # (D,) Qwen3: RMSNorm of each query head before rope
    k_norm: torch.Tensor | None = None  # (D,) and of each key head
    moe: MoEWeights | None = None  # a sparse layer's experts (engine/moe.py), instead of gate/up/down
    mla: MLAWeights | None = None  # latent attention (engine/mla.py), instead of q/k/v/o


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
    ``native``: the dense projections and the embedding of a quantized checkpoint stay quantized
    (``engine.quant``); experts and MLA's projections are dequantized (their kernels take floats)."""
    dtype = torch_dtype(config.dtype)
    tensors = read_tensors(path, dtype, native)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> Any:
        if name not in tensors:
            raise CheckpointError(f"checkpoint {path} lacks tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, config implies {shape}")
        used.add(name)
        if is_quantized(t):
            return t.to(device)  # packed bytes: no dtype (the kernels dequantize)
        assert isinstance(t, torch.Tensor)
        return t.to(device=device, dtype=dtype)  # returns t itself (no copy) when nothing changes

    def take_dense(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = take(name, shape)
        return t.dequantize(dtype) if is_quantized(t) else t

    def maybe(name: str, shape: tuple[int, ...], required: bool) -> torch.Tensor | None:
        # a bias or a norm is never multiplied as a matrix: always floats
        return take_dense(name, shape) if required or name in tensors else None

    c = config
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                input_norm=take_dense(p + "input_layernorm.weight", (c.hidden_size,)),
                post_norm=take_dense(p + "post_attention_layernorm.weight", (c.hidden_size,)),
                **_attention(take, take_dense, maybe, p, c),
                **_mlp(take, take_dense, p, c, i),
            )
        )
    embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    if c.tie_word_embeddings:
        lm_head = embed
        used.add("lm_head.weight")  # some tied checkpoints still store a copy: ignore it
    else:
        lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))
    norm = take_dense("model.norm.weight", (c.hidden_size,))
    unused = sorted(
        n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq") and not _mtp(n, c)
    )
    if unused:
        raise CheckpointError(f"checkpoint {path} has tensors the model does not use: {unused[:5]}")
    return ModelWeights(embed=embed, layers=tuple(layers), norm=norm, lm_head=lm_head)


_PER_HEAD = (
    "q_proj",
    "k_proj",
    "v_proj",
    "q_bias",
    "k_bias",
    "v_bias",
    "o_proj",
    "o_bias",
    "q_norm",
    "k_norm",
)


def _attention(take: Take, take_dense: Take, maybe: Maybe, p: str, c: ModelConfig) -> dict[str, Any]:
    """A layer's attention fields: per-head q/k/v/o (+ biases, q/k norms), or the latent's."""
    if c.mla is not None:
        mla = load_mla_weights(take_dense, maybe, p, c.mla, c.num_heads, c.hidden_size, c.attention_bias)
        return {**dict.fromkeys(_PER_HEAD), "mla": mla}
    a = p + "self_attn."
    q_out, kv_out, hidden, bias = (
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.hidden_size,
        c.attention_bias,
    )
    return dict(
        q_proj=take(a + "q_proj.weight", (q_out, hidden)),
        k_proj=take(a + "k_proj.weight", (kv_out, hidden)),
        v_proj=take(a + "v_proj.weight", (kv_out, hidden)),
        q_bias=maybe(a + "q_proj.bias", (q_out,), bias),
        k_bias=maybe(a + "k_proj.bias", (kv_out,), bias),
        v_bias=maybe(a + "v_proj.bias", (kv_out,), bias),
        o_proj=take(a + "o_proj.weight", (hidden, q_out)),
        o_bias=maybe(a + "o_proj.bias", (hidden,), False),
        q_norm=take_dense(a + "q_norm.weight", (c.head_dim,)) if c.qk_norm else None,
        k_norm=take_dense(a + "k_norm.weight", (c.head_dim,)) if c.qk_norm else None,
    )


def _mlp(take: Take, take_dense: Take, p: str, c: ModelConfig, layer: int) -> dict[str, Any]:
    """A layer's MLP fields: dense gate/up/down, or its experts'."""
    if c.moe is not None and c.moe.is_sparse(layer):
        moe = load_moe_weights(take_dense, p, c.architecture, c.moe, c.hidden_size)
        return {"gate_proj": None, "up_proj": None, "down_proj": None, "moe": moe}
    m, inter, hidden = p + "mlp.", c.intermediate_size, c.hidden_size
    return dict(
        gate_proj=take(m + "gate_proj.weight", (inter, hidden)),
        up_proj=take(m + "up_proj.weight", (inter, hidden)),
        down_proj=take(m + "down_proj.weight", (hidden, inter)),
    )


def _mtp(name: str, config: ModelConfig) -> bool:
    """A DeepSeek multi-token-prediction module's tensor (layers past num_hidden_layers): not run."""
    parts = name.split(".")
    return (
        config.mla is not None
        and len(parts) > 2
        and parts[:2] == ["model", "layers"]
        and parts[2].isdigit()
        and int(parts[2]) >= config.num_layers
    )
