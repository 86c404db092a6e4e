"""Block-scaled FP8 weights: Hugging Face checkpoints with ``quantization_config.quant_method: fp8``.

Such a checkpoint (DeepSeek-V3's format, read by transformers' fine-grained FP8 integration) stores
each projection as ``W.weight`` (out, in) ``float8_e4m3fn`` and ``W.weight_scale_inv`` (ceil(out /
bn), ceil(in / bk)) fp32, with ``weight_block_size: [bn, bk]`` (usually [128, 128])::

    w[i, j] = fp32(q[i, j]) * scale_inv[i // bn, j // bk]          (one rounding)

``FP8Weight.dequantize`` is that expression, the reference every kernel reproduces. Modules listed
in ``modules_to_not_convert`` (the LM head, usually) and the norms are plain tensors. Only
``activation_scheme: dynamic`` (or none) is accepted: the activations stay in the run dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def check_quantization_config(qc: Any) -> tuple[int, int]:
    """``weight_block_size`` of a ``quantization_config`` this engine runs; ValueError naming the
    key for anything else."""
    if not isinstance(qc, dict):
        raise ValueError("quantization_config must be an object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"quantization_config.activation_scheme {qc['activation_scheme']!r} is not supported "
            "(only 'dynamic')"
        )
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt {qc['fmt']!r} is not supported (only 'e4m3')")
    block = qc.get("weight_block_size")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(f"quantization_config.weight_block_size must be [rows, cols] > 0, got {block!r}")
    return int(block[0]), int(block[1])


def checkpoint_block(path: str | Path) -> tuple[int, int] | None:
    """The FP8 block of the checkpoint directory at ``path``; None when it is not quantized."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config")
    return None if not qc else check_quantization_config(qc)


@dataclass(frozen=True, slots=True)
class FP8Weight:
    """A (out, in) FP8 matrix with one fp32 scale per ``block`` (``QuantizedWeight``)."""

    q: torch.Tensor  # (out, in) float8_e4m3fn
    scale_inv: torch.Tensor  # (ceil(out / bn), ceil(in / bk)) fp32
    block: tuple[int, int]  # (bn, bk)

    def __post_init__(self) -> None:
        out, cols = self.q.shape
        bn, bk = self.block
        want = (-(-out // bn), -(-cols // bk))
        if self.q.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 weight must be float8_e4m3fn, got {self.q.dtype}")
        if tuple(self.scale_inv.shape) != want:
            raise ValueError(
                f"weight_scale_inv has shape {tuple(self.scale_inv.shape)}, block {self.block} implies {want}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    @property
    def format(self) -> str:
        return f"fp8_e4m3/{self.block[0]}x{self.block[1]}"

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale_inv.numel() * 4

    @property
    def device(self) -> torch.device:
        return self.q.device

    def _scales(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The scale of every weight, (out or len(rows), in) fp32."""
        bn, bk = self.block
        out, cols = self.shape
        s = self.scale_inv.float()
        s = s.repeat_interleave(bn, 0)[:out] if rows is None else s[rows // bn]
        return s.repeat_interleave(bk, 1)[:, :cols]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self._scales()).to(dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q.index_select(0, ids).float() * self._scales(ids)

    def rows(self, start: int, stop: int) -> FP8Weight:
        bn = self.block[0]
        if start % bn:
            raise ValueError(f"FP8 rows from {start} split a block of {bn} rows")
        return FP8Weight(self.q[start:stop], self.scale_inv[start // bn : -(-stop // bn)], self.block)

    def to(self, device: str | torch.device) -> FP8Weight:
        return FP8Weight(self.q.to(device), self.scale_inv.to(device), self.block)

    def per_128_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scales with one column per 128 weights): the C kernel's block along k is 128."""
        bk = self.block[1]
        if bk % 128 or self.shape[1] % 128:
            raise ValueError(f"the CPU FP8 kernel needs column blocks and rows of 128s, got {self.block}")
        return self.q, self.scale_inv.float().repeat_interleave(bk // 128, 1)[:, : self.shape[1] // 128]

    @staticmethod
    def can_cat(parts: list[FP8Weight]) -> bool:
        bn = parts[0].block[0]
        return len({(p.block, p.shape[1]) for p in parts}) == 1 and all(
            p.shape[0] % bn == 0 for p in parts[:-1]
        )

    @staticmethod
    def cat(parts: list[FP8Weight]) -> FP8Weight:
        return FP8Weight(
            torch.cat([p.q for p in parts]), torch.cat([p.scale_inv for p in parts]), parts[0].block
        )


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> FP8Weight:
    """``w`` (out, in) as block-scaled FP8: each block's absolute max maps to 448 (what DeepSeek's
    and transformers' converters do). For writing test checkpoints (``tandem make-model``)."""
    bn, bk = block
    out, cols = w.shape
    w32 = w.float()
    pad = torch.zeros(-(-out // bn) * bn, -(-cols // bk) * bk)
    pad[:out, :cols] = w32
    tiles = pad.reshape(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)  # (R, bn, C, bk)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (R, C)
    scale = amax / FP8_MAX
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(pad.shape)[:out, :cols]
    return FP8Weight(q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous(), block)


def collect_fp8(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, Any]:
    """A checkpoint's tensors with each ``X.weight`` + ``X.weight_scale_inv`` pair as one
    ``FP8Weight`` under ``X.weight``; ValueError naming a tensor whose pair is missing."""
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            if name[: -len("_scale_inv")] not in tensors:
                raise ValueError(f"checkpoint has {name!r} without its weight")
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors.get(name + "_scale_inv")
            if scale is None:
                raise ValueError(f"FP8 tensor {name!r} has no {name}_scale_inv")
            out[name] = FP8Weight(t, scale.float(), block)
        else:
            out[name] = t
    return out
