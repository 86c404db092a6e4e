"""Hyperparameters of a checkpoint (Llama, Qwen2, Mistral, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V3), read from its config files.

Owns parsing ``config.json`` (+ ``generation_config.json`` for EOS ids) into an immutable
:class:`ModelConfig`, refusing with a ``ValueError`` that names the field anything the forward pass in
``engine.model`` does not implement (sliding windows, other activations, rope types or routing
options), and the model's *fingerprint*, the id that ``engine.block_hash`` mixes into every block
hash. What picks a layer's attention and MLP kind (per-head q/k norms, MoE routing, MLA) is parsed
by ``engine.arch``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.arch import MOE_ARCHS, CheckpointError, MLAConfig, MoEConfig, parse_mla, parse_moe
from engine.kv_layout import KVLayout, torch_dtype

# architectures entry / model_type -> our family name
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
_MODEL_TYPES = set(_ARCHITECTURES.values())
_QWEN = (
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
)  # their sliding_window applies only with use_sliding_window
_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}
# Any of these set (truthy) on a dense architecture means a mixture of experts it does not have.
_MOE_FIELDS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_layer_freq",
)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: (
        str  # "llama" | "qwen2" | "mistral" | "qwen3" | "mixtral" | "qwen2_moe" | ... (_ARCHITECTURES)
    )
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP's (DeepSeek-V3's first layers; Qwen2-MoE's mlp_only_layers)
    num_layers: int
    num_heads: int
    num_kv_heads: int  # MLA: 1, the latent every query head reads
    head_dim: int  # a query/key head's size (MLA: qk_nope_head_dim + qk_rope_head_dim)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "linear"|"llama3"|"yarn", "factor": ...}; None = plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v bias (Qwen2 has it)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # config.json + generation_config.json
    dtype: str  # "float32" | "bfloat16" | "float16": what we run in
    # A digest of the checkpoint files' headers and first bytes, so two checkpoints with equal
    # hyperparameters but different weights get different fingerprints ("" when not from files).
    weights_id: str = ""
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before rope
    moe: MoEConfig | None = None  # routed experts in moe.sparse_layers (engine/moe.py)
    mla: MLAConfig | None = None  # latent attention in every layer (engine/mla.py)

    def __hash__(self) -> int:  # rope_scaling is a dict, so the generated hash would fail
        return hash(self.fingerprint)

    @property
    def fingerprint(self) -> str:
        """Stable id of (weights-relevant config, weights, dtype) for ``engine.block_hash``."""
        fields = asdict(self)
        for name in ("bos_token_id", "eos_token_ids"):  # do not change what KV a token gets
            fields.pop(name)
        for name in (
            "qk_norm",
            "moe",
            "mla",
        ):  # absent from a dense Llama's: its fingerprint stays what it was
            if not fields[name]:
                fields.pop(name)
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return f"{self.architecture}-{self.dtype}-{hashlib.blake2b(blob, digest_size=12).hexdigest()}"

    @property
    def rope_dim(self) -> int:
        """The rotated dims of a query/key head (MLA rotates only its qk_rope_head_dim part)."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """What one token's KV costs in the cache, every layer: what the router prices and the
        metrics report (MLA's latent is a small fraction of per-head K and V)."""
        return self.kv_layout(1).block_bytes

    def kv_layout(self, block_size: int) -> KVLayout:
        if self.mla is not None:  # one latent "head" per token: the compressed KV and the rope key
            return KVLayout(self.num_layers, 1, self.mla.latent_dim, block_size, self.dtype, latent=True)
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
        try:
            if path.is_file():
                from engine.gguf_loader import gguf_config, gguf_weights_id

                return cls.from_dict(gguf_config(path), dtype=dtype, weights_id=gguf_weights_id(path))
            raw = json.loads((path / "config.json").read_text())
            gen_file = path / "generation_config.json"
            gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
            return cls.from_dict(raw, dtype=dtype, generation_config=gen, weights_id=_weights_id(path))
        except CheckpointError:
            raise
        except (ValueError, KeyError) as e:  # refused, or a required key is missing: say which, where
            what = f"lacks the key {e}" if isinstance(e, KeyError) else str(e)
            raise CheckpointError(f"{path}: {what}") from None

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
        if arch not in MOE_ARCHS:
            for name in _MOE_FIELDS:
                if raw.get(name):
                    raise ValueError(f"{name}={raw[name]!r}: a mixture of experts is not part of {arch}")
        if raw.get("quantization_config"):  # block-scaled FP8 only (engine/quant/fp8.py); else named
            from engine.quant.fp8 import check_quantization_config

            check_quantization_config(raw["quantization_config"])
        if raw.get("mlp_bias"):
            raise ValueError("mlp_bias: MLP biases are not supported")
        _check_no_sliding_window(raw, arch)

        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        num_layers = int(raw["num_hidden_layers"])
        moe = parse_moe(raw, arch, num_layers) if arch in MOE_ARCHS else None
        mla = parse_mla(raw) if arch == "deepseek_v3" else None
        if mla is not None:  # every query head reads the one latent
            head_dim, kv_heads = mla.qk_head_dim, 1
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
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            # transformers' default is False for these three families
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(raw, arch),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(eos),
            dtype=dtype,
            weights_id=weights_id,
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            moe=moe,
            mla=mla,
        )


def _attention_bias(raw: dict[str, Any], arch: str) -> bool:
    """Whether q/k/v carry a bias (o_proj's is loaded when the checkpoint has one)."""
    if arch == "qwen2":  # always (its config has no field for it)
        return True
    if arch == "qwen2_moe":
        return bool(raw.get("qkv_bias", True))
    return bool(raw.get("attention_bias", False))


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
    # Qwen models store a sliding_window that only applies when use_sliding_window is set (handled
    # above); for Llama/Mistral/Mixtral a window applies once a sequence can outgrow it.
    max_pos = int(raw.get("max_position_embeddings", 2048))
    if arch not in _QWEN and window is not None and int(window) < max_pos:
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
    if rope_type == "yarn":
        return theta, _yarn(raw, params, field)
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


def _yarn(raw: dict[str, Any], params: dict[str, Any], field: str) -> dict[str, Any]:
    """YaRN (DeepSeek-V3, long-context Qwen): the keys transformers' ``_compute_yarn_parameters``
    reads, with its defaults."""
    original = params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    if not original:
        raise ValueError(f"{field} type 'yarn' needs original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:  # DeepSeek's rule: the context extension the checkpoint was trained for
        factor = int(raw.get("max_position_embeddings", 2048)) / int(original)

    def opt(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    return {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(original),
        "beta_fast": float(params.get("beta_fast") or 32),
        "beta_slow": float(params.get("beta_slow") or 1),
        "mscale": opt("mscale"),
        "mscale_all_dim": opt("mscale_all_dim"),
        "attention_factor": opt("attention_factor"),
        "truncate": bool(params.get("truncate", True)),
    }


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
