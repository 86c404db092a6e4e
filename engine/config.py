"""Hyperparameters of a Llama-family checkpoint (Llama, Qwen2, Mistral), read from its config files.

Owns parsing ``config.json`` (+ ``generation_config.json`` for EOS ids) into an immutable
:class:`ModelConfig`, refusing with a ``ValueError`` that names the field anything the forward pass in
``engine.model`` does not implement (sliding windows, MoE, other activations or rope types), and the
model's *fingerprint*, the id that ``engine.block_hash`` mixes into every block hash.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.kv_layout import KVLayout, torch_dtype

# architectures entry / model_type -> our family name
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
_MODEL_TYPES = {"llama", "qwen2", "mistral"}
_ROPE_TYPES = {"default", "linear", "llama3"}
# Any of these set (truthy) means a mixture of experts, which the dense MLP cannot run.
_MOE_FIELDS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_layer_freq",
)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}; None = plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v bias (Qwen2 has it)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # config.json + generation_config.json
    dtype: str  # "float32" | "bfloat16" | "float16": what we run in
    # A digest of the checkpoint files' headers and first bytes, so two checkpoints with equal
    # hyperparameters but different weights get different fingerprints ("" when not from files).
    weights_id: str = ""

    def __hash__(self) -> int:  # rope_scaling is a dict, so the generated hash would fail
        return hash(self.fingerprint)

    @property
    def fingerprint(self) -> str:
        """Stable id of (weights-relevant config, weights, dtype) for ``engine.block_hash``."""
        fields = asdict(self)
        for name in ("bos_token_id", "eos_token_ids"):  # do not change what KV a token gets
            fields.pop(name)
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return f"{self.architecture}-{self.dtype}-{hashlib.blake2b(blob, digest_size=12).hexdigest()}"

    def kv_layout(self, block_size: int) -> KVLayout:
        return KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            block_size=block_size,
            dtype=self.dtype,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32") -> ModelConfig:
        """Parse ``path/config.json`` (and ``path/generation_config.json`` if present), or the
        metadata of a GGUF file (``engine.gguf_loader``)."""
        path = Path(path)
        if path.is_file():
            from engine.gguf_loader import gguf_config, gguf_weights_id

            return cls.from_dict(gguf_config(path), dtype=dtype, weights_id=gguf_weights_id(path))
        raw = json.loads((path / "config.json").read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
        return cls.from_dict(raw, dtype=dtype, generation_config=gen, weights_id=_weights_id(path))

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        dtype: str = "float32",
        generation_config: dict[str, Any] | None = None,
        weights_id: str = "",
    ) -> ModelConfig:
        """Parse an already-loaded ``config.json`` dict; refuses what the model cannot run."""
        torch_dtype(dtype)  # validates the name
        arch = _architecture(raw)
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        for name in _MOE_FIELDS:
            if raw.get(name):
                raise ValueError(f"mixture of experts ({name}={raw[name]!r}) is not supported")
        if raw.get("quantization_config"):  # block-scaled FP8 only (engine/quant/fp8.py); else named
            from engine.quant.fp8 import check_quantization_config

            check_quantization_config(raw["quantization_config"])
        if raw.get("mlp_bias"):
            raise ValueError("mlp_bias: MLP biases are not supported")
        _check_no_sliding_window(raw, arch)

        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        rope_theta, rope_scaling = _rope(raw)
        gen = generation_config or {}
        bos = raw.get("bos_token_id")
        if bos is None:
            bos = gen.get("bos_token_id")
        eos: list[int] = []
        for value in (raw.get("eos_token_id"), gen.get("eos_token_id")):
            for tok in [value] if isinstance(value, int) else (value or []):
                if int(tok) not in eos:
                    eos.append(int(tok))
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            # transformers' default is False for these three families
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias (its config has no field for it)
            attention_bias=True if arch == "qwen2" else bool(raw.get("attention_bias", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(eos),
            dtype=dtype,
            weights_id=weights_id,
        )


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    for a in archs:
        if a in _ARCHITECTURES:
            return _ARCHITECTURES[a]
    if archs:
        raise ValueError(f"architectures {archs!r}: unsupported (supported: {sorted(_ARCHITECTURES)})")
    model_type = raw.get("model_type")
    if model_type in _MODEL_TYPES:
        return str(model_type)
    raise ValueError(f"model_type {model_type!r}: unsupported (supported: {sorted(_MODEL_TYPES)})")


def _check_no_sliding_window(raw: dict[str, Any], arch: str) -> None:
    if raw.get("use_sliding_window"):
        raise ValueError("use_sliding_window: sliding-window attention is not supported")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types {sorted(set(layer_types))!r}: only full_attention is supported")
    window = raw.get("sliding_window")
    # Qwen2 stores a sliding_window that only applies when use_sliding_window is set (handled above);
    # for Llama/Mistral a window applies once a sequence can outgrow it.
    max_pos = int(raw.get("max_position_embeddings", 2048))
    if arch != "qwen2" and window is not None and int(window) < max_pos:
        raise ValueError(
            f"sliding_window={window} < max_position_embeddings={max_pos}: "
            "sliding-window attention is not supported"
        )


def _rope(raw: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from the old (``rope_theta`` + ``rope_scaling``) or the transformers 5
    (``rope_parameters``) form. Scaling is normalized to carry ``rope_type``, or None for plain rope."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if raw.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    field = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"{field} type {rope_type!r} is not supported (supported: {sorted(_ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": float(params["factor"])}
    if rope_type == "llama3":
        scaling["low_freq_factor"] = float(params["low_freq_factor"])
        scaling["high_freq_factor"] = float(params["high_freq_factor"])
        scaling["original_max_position_embeddings"] = int(
            raw.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or raw.get("max_position_embeddings", 2048)
        )
    return theta, scaling


def _weights_id(path: Path) -> str:
    """Digest of every tensor's name, dtype, shape and first KiB of data, in name order: cheap, equal
    for the same weights however they are sharded, and different for checkpoints whose weights
    differ (random seeds, fine-tunes) even when their configs are equal."""
    entries: list[tuple[str, str, list[int], Path, int, int]] = []
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                entries.append((name, info["dtype"], info["shape"], f, 8 + n + begin, min(end - begin, 1024)))
    if not entries:
        return ""
    h = hashlib.blake2b(digest_size=12)
    handles: dict[Path, Any] = {}
    try:
        for name, dtype, shape, f, offset, size in sorted(entries, key=lambda e: e[0]):
            fh = handles.get(f) or handles.setdefault(f, f.open("rb"))
            fh.seek(offset)
            h.update(f"{name}|{dtype}|{shape}|".encode())
            h.update(fh.read(size))
    finally:
        for fh in handles.values():
            fh.close()
    return h.hexdigest()
