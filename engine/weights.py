"""Loading a checkpoint's safetensors into the immutable weight types the forward pass reads.

Owns the Hugging Face tensor names, single-file and sharded (``model.safetensors.index.json``)
checkpoints (and GGUF files, through ``engine.gguf_loader``), and dtype/device placement.
safetensors maps the files into memory; a tensor whose file dtype already equals the run dtype (on
CPU) is kept as that mmap-backed view, so weights are never copied twice, and only mismatching
dtypes are converted. Projections are *not* fused: a fused q/k/v matmul would need a copy of every
weight, and separate matmuls give transformers' numerics bit for bit.
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

Take = Callable[[str, tuple[int, ...]], torch.Tensor]
Maybe = Callable[[str, tuple[int, ...], bool], "torch.Tensor | None"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer. Its attention is per-head (q/k/v/o) or latent (``mla``); its MLP dense
    (gate/up/down) or a mixture of experts (``moe``): the fields of the kind it lacks are None."""

    input_norm: torch.Tensor  # (hidden,)
    q_proj: torch.Tensor | None  # (H * D, hidden)
    k_proj: torch.Tensor | None  # (H_kv * D, hidden)
    v_proj: torch.Tensor | None  # (H_kv * D, hidden)
    q_bias: torch.Tensor | None  # (H * D,)
    k_bias: torch.Tensor | None  # (H_kv * D,)
    v_bias: torch.Tensor | None  # (H_kv * D,)
    o_proj: torch.Tensor | None  # (hidden, H * D)
    o_bias: torch.Tensor | None  # (hidden,): Llama with attention_bias has it, Qwen2 does not
    post_norm: torch.Tensor  # (hidden,)
    gate_proj: torch.Tensor | None  # (I, hidden)
    up_proj: torch.Tensor | None  # (I, hidden)
    down_proj: torch.Tensor | None  # (hidden, I)
    q_norm: torch.Tensor | None = None  # (D,) Qwen3: RMSNorm of each query head before rope
    k_norm: torch.Tensor | None = None  # (D,) and of each key head
    moe: MoEWeights | None = None  # a sparse layer's experts (engine/moe.py), instead of gate/up/down
    mla: MLAWeights | None = None  # latent attention (engine/mla.py), instead of q/k/v/o


@dataclass(frozen=True, slots=True)
class ModelWeights:
    embed: torch.Tensor  # (V, hidden)
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # (hidden,)
    lm_head: torch.Tensor  # (V, hidden); the embedding itself when tied


def read_tensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``path``, mmap-backed, keyed by its Hugging Face name (a GGUF
    file's are dequantized, to ``dtype`` when given: ``engine.gguf_loader``)."""
    path = Path(path)
    if path.is_file():
        from engine.gguf_loader import read_gguf_tensors

        return read_gguf_tensors(path, dtype or torch.float32)
    if (path / INDEX_FILE).exists():
        weight_map: dict[str, str] = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_file(path / shard))
        return tensors
    if (path / SINGLE_FILE).exists():
        return load_file(path / SINGLE_FILE)
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def load_weights(path: str | Path, config: ModelConfig, device: str | torch.device = "cpu") -> ModelWeights:
    """Read, check and place the checkpoint's weights for ``config`` (its dtype is the run dtype)."""
    dtype = torch_dtype(config.dtype)
    tensors = read_tensors(path, dtype)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"checkpoint {path} lacks tensor {name!r}")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, config implies {shape}")
        used.add(name)
        return t.to(device=device, dtype=dtype)  # returns t itself (no copy) when nothing changes

    def maybe(name: str, shape: tuple[int, ...], required: bool) -> torch.Tensor | None:
        return take(name, shape) if required or name in tensors else None

    c = config
    layers = []
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight", (c.hidden_size,)),
                post_norm=take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
                **_attention(take, maybe, p, c),
                **_mlp(take, p, c, i),
            )
        )
    embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
    if c.tie_word_embeddings:
        lm_head = embed
        used.add("lm_head.weight")  # some tied checkpoints still store a copy: ignore it
    else:
        lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))
    norm = take("model.norm.weight", (c.hidden_size,))
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


def _attention(take: Take, maybe: Maybe, p: str, c: ModelConfig) -> dict[str, Any]:
    """A layer's attention fields: per-head q/k/v/o (+ biases, q/k norms), or the latent's."""
    if c.mla is not None:
        mla = load_mla_weights(take, maybe, p, c.mla, c.num_heads, c.hidden_size, c.attention_bias)
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
        q_norm=take(a + "q_norm.weight", (c.head_dim,)) if c.qk_norm else None,
        k_norm=take(a + "k_norm.weight", (c.head_dim,)) if c.qk_norm else None,
    )


def _mlp(take: Take, p: str, c: ModelConfig, layer: int) -> dict[str, Any]:
    """A layer's MLP fields: dense gate/up/down, or its experts'."""
    if c.moe is not None and c.moe.is_sparse(layer):
        moe = load_moe_weights(take, p, c.architecture, c.moe, c.hidden_size)
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
