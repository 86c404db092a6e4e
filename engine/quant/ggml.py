"""GGUF's block-quantized weights (llama.cpp's GGML types) kept packed, and their torch reference.

A GGML matrix (out, in) is stored row by row; each row is ``in / QK`` blocks of ``QK`` weights, each
block a few bytes of scales and the packed integer quants::

    Q8_0  (32 w, 34 B)   d: fp16 | q[32]: int8                          w = q * d
    Q4_0  (32 w, 18 B)   d: fp16 | qs[16]: q[i] low nibble, q[i+16] high  w = d * (q - 8)
    Q4_1  (32 w, 20 B)   d: fp16 | m: fp16 | qs[16] (as Q4_0)            w = d * q + m
    Q4_K  (256 w, 144 B) d, dmin: fp16 | 12 B: eight 6-bit (sc, m) | qs[128]
                         sub-block j of 32: w = (d * sc_j) * q - (dmin * m_j)
    Q5_K  (256 w, 176 B) as Q4_K, plus qh[32]: bit j of qh[i] is the 5th bit of sub-block j's i-th q
    Q6_K  (256 w, 210 B) ql[128] | qh[64] | sc[16]: int8 | d: fp16
                         16 sub-blocks of 16: w = (d * sc_j) * (q - 32), q 6 bits

``dequantize`` follows ``gguf.quants`` (llama.cpp's Python reader, which the load-time path uses)
operation for operation: every product and sum rounded to fp32 where numpy rounds it, a multiply
and an add never fused. So it gives the very floats the dequantized path loads, bit for bit (tested
on random blocks with edge values), and it is what each kernel (engine/kernels/cpu_quant_gemm.c,
engine/quant/triton_kernels.py) must reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# type name -> (weights per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES
BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
TYPES = tuple(BLOCKS)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8, little-endian fp16 bytes -> (..., 1) fp32 (exact)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """(N, G, width) bytes -> (N, G, 2 * width) uint8: the low nibbles, then the high ones."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # (N, 34) -> (N, 32)
    d = _f16(b[:, :2])  # (N, 1)
    x = b[:, 2:].contiguous().view(torch.int8).float()  # (N, 32)
    return x * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # (N, 18) -> (N, 32)
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8  # (N, 32)
    return d * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # (N, 20) -> (N, 32)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).float()
    return (d * q) + m


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, (N, 8) each::

    bytes 0-3:  EEaaaaaa  (a: scale 0-3, E: top bits of scale 4-7)
    bytes 4-7:  FFbbbbbb  (b: min 0-3,   F: top bits of min 4-7)
    bytes 8-11: ffffeeee  (e: low bits of scale 4-7, f: low bits of min 4-7)
    """
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # (N, 144) -> (N, 256)
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    ds = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32), 32).reshape(n, 8, 32).float()
    return (ds * q - dm).reshape(n, 256)


_BITS8 = torch.arange(8, dtype=torch.uint8)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # (N, 176) -> (N, 256)
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    ds = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    low = _nibbles(b[:, 48:].reshape(n, 4, 32), 32).reshape(n, 8, 32)
    high = (b[:, 16:48].reshape(n, 1, 32) >> _BITS8.to(b.device).reshape(1, 8, 1)) & 1  # (N, 8, 32)
    q = (low | (high << 4)).float()
    return (ds * q - dm).reshape(n, 256)


_SHIFT4 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # (N, 210) -> (N, 256)
    n = b.shape[0]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # (N, 16)
    d = _f16(b[:, 208:210])
    ds = (d * sc).reshape(n, 16, 1)
    low = _nibbles(b[:, :128].reshape(n, 2, 64), 64).reshape(n, 8, 32)
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT4.to(b.device).reshape(1, 1, 4, 1)) & 3
    q = (low | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (ds * q.reshape(n, 16, 16).float()).reshape(n, 256)


_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize_rows(qtype: str, data: torch.Tensor, cols: int) -> torch.Tensor:
    """(R, row_bytes) uint8 rows of ``qtype`` blocks -> (R, cols) fp32."""
    qk, size = BLOCKS[qtype]
    blocks = data.reshape(-1, size)  # (R * cols / qk, size)
    return _DEQUANT[qtype](blocks).reshape(data.shape[0], cols)


@dataclass(frozen=True, slots=True)
class GGMLWeight:
    """A (out, in) GGML matrix kept in its GGUF block bytes (``QuantizedWeight``).

    ``data`` is (out, in / QK * block bytes) uint8: for a file loaded with ``weights: native`` a
    view of the memory-mapped file (or, for llama.cpp's permuted attn_q / attn_k, the rows put back
    in Hugging Face order: a permutation of whole rows, so of whole blocks)."""

    qtype: str
    shape: tuple[int, int]
    data: torch.Tensor

    def __post_init__(self) -> None:
        if self.qtype not in BLOCKS:
            raise ValueError(f"GGML type {self.qtype!r} is not one the kernels run (they run {TYPES})")
        out, cols = self.shape
        qk, size = BLOCKS[self.qtype]
        if cols % qk:
            raise ValueError(f"a {self.qtype} row of {cols} weights is not a whole number of {qk}-blocks")
        want = (out, cols // qk * size)
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want:
            raise ValueError(
                f"{self.qtype} data must be uint8 {want}, got {self.data.dtype} {tuple(self.data.shape)}"
            )

    @property
    def format(self) -> str:
        return self.qtype

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.qtype, self.data, self.shape[1]).to(dtype)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.qtype, self.data.index_select(0, ids), self.shape[1])

    def rows(self, start: int, stop: int) -> GGMLWeight:
        return GGMLWeight(self.qtype, (stop - start, self.shape[1]), self.data[start:stop])

    def to(self, device: str | torch.device) -> GGMLWeight:
        return GGMLWeight(self.qtype, self.shape, self.data.to(device))

    @staticmethod
    def cat(parts: list[GGMLWeight]) -> GGMLWeight:
        """The parts' rows one after another (a fused q/k/v or gate/up); one type and width."""
        if len({(p.qtype, p.shape[1]) for p in parts}) != 1:
            raise ValueError("only weights of one GGML type and width concatenate")
        rows = sum(p.shape[0] for p in parts)
        return GGMLWeight(parts[0].qtype, (rows, parts[0].shape[1]), torch.cat([p.data for p in parts]))
