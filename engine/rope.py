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
        return cls(cos=angles.cos().to(device, dtype), sin=angles.sin().to(device, dtype))

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
