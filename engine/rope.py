"""Rotary position embeddings: inverse frequencies (plain, ``linear``, ``llama3``), the cos/sin tables
cached once per model, and their application to q/k.

Numerics follow transformers' ``LlamaRotaryEmbedding`` so bf16 runs round the same way: angles and
cos/sin in fp32, then cast to the run dtype; ``x * cos + rotate_half(x) * sin`` in the run dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.config import ModelConfig


def inv_freq(config: ModelConfig) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies, as transformers' rope init functions compute them (D: the
    rotated dims, ``config.rope_dim``)."""
    dim = config.rope_dim
    freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return freq / factor
    if scaling["rope_type"] == "yarn":
        return _yarn_inv_freq(config.rope_theta, dim, scaling)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the middle band interpolated
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, s: dict) -> torch.Tensor:
    """YaRN: interpolated frequencies for the long wavelengths, extrapolated for the short ones, a
    linear ramp between (transformers' ``_compute_yarn_parameters``, expression for expression)."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singularity
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s["factor"] * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the share of each frequency kept as it is (extrapolated)
    return interpolation * (1 - keep) + extrapolation * keep


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def attention_factor(config: ModelConfig) -> float:
    """What YaRN multiplies cos and sin by (1.0 for every other rope)."""
    s = config.rope_scaling
    if s is None or s["rope_type"] != "yarn":
        return 1.0
    if s["attention_factor"] is not None:
        return float(s["attention_factor"])
    if s["mscale"] and s["mscale_all_dim"]:
        return _yarn_mscale(s["factor"], s["mscale"]) / _yarn_mscale(s["factor"], s["mscale_all_dim"])
    return _yarn_mscale(s["factor"])


def softmax_scale(config: ModelConfig) -> float:
    """The attention's score scale: 1/sqrt(q/k head size), and for MLA with a scaled rope that has
    ``mscale_all_dim`` (DeepSeek-V3's YaRN) times its mscale squared, as transformers' DeepSeek."""
    scale = config.head_dim**-0.5
    s = config.rope_scaling
    if config.mla is not None and s is not None and s.get("mscale_all_dim"):
        scale *= _yarn_mscale(s["factor"], s["mscale_all_dim"]) ** 2
    return scale


@dataclass(slots=True)
class RotaryTables:
    """cos/sin of every position up to ``max_position_embeddings``, in the run dtype.

    Only half of each row is stored: transformers' tables are ``cat(freqs, freqs)``, so the two halves
    are equal and ``lookup`` rebuilds the full row.
    """

    cos: torch.Tensor  # (P, D/2)
    sin: torch.Tensor  # (P, D/2)

    @classmethod
    def build(cls, config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> RotaryTables:
        positions = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()  # (P,)
        angles = positions[:, None] * inv_freq(config)[None, :]  # (P, D/2) fp32
        a = attention_factor(config)  # YaRN scales cos and sin (in fp32, before the cast)
        cos, sin = (angles.cos(), angles.sin()) if a == 1.0 else (angles.cos() * a, angles.sin() * a)
        return cls(cos=cos.to(device, dtype), sin=sin.to(device, dtype))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token, (T, 1, D): broadcast over the heads of a (T, H, D) tensor."""
        cos = self.cos[positions]  # (T, D/2)
        sin = self.sin[positions]
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((sin, sin), dim=-1).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, H, D) by the per-token angles (T, 1, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half: (T, H, D)
    return x * cos + rotated * sin
