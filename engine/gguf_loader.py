"""GGUF checkpoints (llama.cpp's one-file format): hyperparameters, weights and a fingerprint.

``--model FILE.gguf`` works wherever a checkpoint directory does: ``engine.config`` asks
:func:`gguf_config` for a config.json-like dict, ``engine.weights`` asks :func:`read_gguf_tensors`
for the tensors under their Hugging Face names, and ``engine.gguf_tokenizer`` rebuilds the tokenizer
from the same file. Reading goes through the ``gguf`` package (llama.cpp's own reader): the file is
memory-mapped, and each tensor is dequantized at load to fp32 by ``gguf.quants.dequantize`` and then
cast to the run dtype, as transformers' ``from_pretrained(..., gguf_file=...)`` does for the Llama
family, so both see the same numbers. Any type ``gguf`` dequantizes loads (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, the K-quants, ...).

llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` of Llama-architecture models,
so its rope kernel can rotate adjacent pairs; our rope (like transformers') rotates the two halves
of each head. Per head of D rows the converter wrote::

    HF rows:    [ x0 x1 ... x(D/2-1) | y0 y1 ... y(D/2-1) ]      (first half | second half)
    GGUF rows:  [ x0 y0 x1 y1 ... x(D/2-1) y(D/2-1) ]            (interleaved pairs)

:func:`_unpermute` undoes it (per head: (D/2, 2) -> (2, D/2)); K uses the KV head count. Qwen2
files are not permuted.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import gguf_moe

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    **gguf_moe.ARCHITECTURES,  # stacked experts: engine/gguf_moe.py
}
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's per-head RMSNorms
    "attn_k_norm": "self_attn.k_norm",
    **gguf_moe.LAYER,
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file (by its magic bytes, whatever its name)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclass(frozen=True, slots=True)
class GGUFFile:
    """One opened file: its metadata as plain values and the ``gguf`` reader over its tensors."""

    path: Path
    reader: Any  # gguf.GGUFReader
    metadata: dict[str, Any]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def arch_key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed file, cached per process (config, tokenizer and weights all read it; parsing a
    50k-token vocabulary takes seconds)."""
    p = Path(path).resolve()
    st = p.stat()
    return _open(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    from gguf import GGUFReader

    if not is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    reader = GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    return GGUFFile(Path(path), reader, metadata)


def gguf_config(path: str | Path) -> dict[str, Any]:
    """A config.json-like dict for ``engine.config.ModelConfig.from_dict`` (generation ids included)."""
    g = open_gguf(path)
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    names = set(g.tensor_names)
    if arch not in gguf_moe.ARCHITECTURES and g.arch_key("expert_count"):
        raise ValueError(
            f"{arch}.expert_count: mixture-of-experts GGUF files of architecture {arch!r} are not supported"
        )
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF tensor rope_freqs.weight (Llama-3.1-style rope scaling) is not supported")
    hidden, heads = int(g.arch_key("embedding_length")), int(g.arch_key("attention.head_count"))
    head_dim = int(g.arch_key("attention.key_length") or hidden // heads)
    rot = g.arch_key("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ValueError(
            f"{arch}.rope.dimension_count={rot} != head_dim {head_dim}: partial rotary is not supported"
        )
    theta = float(g.arch_key("rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = g.arch_key("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{arch}.rope.scaling.type {scaling!r} is not supported (only linear)")
        rope = {
            "rope_type": "linear",
            "rope_theta": theta,
            "factor": float(g.arch_key("rope.scaling.factor")),
        }
    tokens = g.metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "vocab_size": int(g.arch_key("vocab_size") or len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(g.arch_key("feed_forward_length")),
        "num_hidden_layers": int(g.arch_key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.arch_key("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(g.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": rope,
        "max_position_embeddings": int(g.arch_key("context_length", 2048)),
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": g.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.metadata.get("tokenizer.ggml.eos_token_id"),
    }
    if arch in ("qwen2", "qwen3", "qwen3moe"):
        config["use_sliding_window"] = False
    if arch in gguf_moe.ARCHITECTURES:
        config.update(gguf_moe.moe_config(g.arch_key))
    return config


def gguf_weights_id(path: str | Path) -> str:
    """Digest of every tensor's name, type, shape and first KiB of data (as ``engine.config`` does
    for safetensors): cheap, and different for files whose weights differ."""
    g = open_gguf(path)
    h = hashlib.blake2b(digest_size=12)
    for t in sorted(g.reader.tensors, key=lambda t: t.name):
        h.update(f"{t.name}|{t.tensor_type.name}|{[int(s) for s in t.shape]}|".encode())
        h.update(np.asarray(t.data).reshape(-1).view(np.uint8)[:1024].tobytes())
    return h.hexdigest()


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor; ValueError for one the forward pass has no use for."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _LAYER_NAME.fullmatch(name)
    if m is None or m.group(2) not in _LAYER:
        raise ValueError(f"GGUF tensor {name!r} is not one a Llama-family model uses")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


def read_gguf_tensors(
    path: str | Path, dtype: torch.dtype = torch.float32, native: bool = False
) -> dict[str, Any]:
    """Every tensor of the file, dequantized to fp32, Q/K rows un-permuted, then cast to ``dtype``,
    keyed by its Hugging Face name. ``native``: a tensor of a type the quantized kernels run stays
    its block bytes instead (``engine.quant.gguf_native``), never dequantized here (stacked experts
    are always dequantized: the expert kernels take floats)."""
    from gguf import GGMLQuantizationType, dequantize

    g = open_gguf(path)
    cfg = gguf_config(path)
    permute = g.architecture == "llama"
    out: dict[str, Any] = {}
    for t in g.reader.tensors:
        stacked = t.name.endswith("_exps.weight")  # (E, rows, cols): one tensor per expert below
        name = t.name if stacked else hf_name(t.name)
        if native and not stacked:
            from engine.quant.gguf_native import native_tensor

            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            permuted = permute and name.endswith(("q_proj.weight", "k_proj.weight"))
            kept = native_tensor(t, functools.partial(_unpermute, num_heads=heads) if permuted else None)
            if kept is not None:
                out[name] = kept
                continue
        try:
            arr = dequantize(t.data, t.tensor_type)  # (rows, cols) fp32, numpy order
        except NotImplementedError:
            raise ValueError(
                f"GGUF tensor {t.name!r} has type {GGMLQuantizationType(t.tensor_type).name}, "
                "which the gguf package cannot dequantize"
            ) from None
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            arr = _unpermute(arr, cfg["num_attention_heads"])
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            arr = _unpermute(arr, cfg["num_key_value_heads"])
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        experts = gguf_moe.split_experts(t.name, arr) if stacked else None
        if stacked and experts is None:
            raise ValueError(f"GGUF tensor {t.name!r} is not one a supported model uses")
        for hf, a in (experts or {name: arr}).items():
            if not a.flags.writeable or np.shares_memory(a, np.asarray(t.data)):
                a = a.copy()  # F32 data is a view of the read-only mapping
            out[hf] = torch.from_numpy(a).to(dtype)
    return out


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of q/k rows: (heads, D/2, 2, ...) -> (heads, 2, D/2, ...)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
