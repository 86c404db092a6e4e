"""The GPU linear method for quantized weights: one Triton kernel reading GGUF blocks (or FP8 bytes)
as they lie in memory and dequantizing them in registers.

The GGUF matrix stays in its file layout, (N, row bytes) uint8; a program computes a (BLOCK_M,
BLOCK_N) tile of y = x @ W^T, and for every BLOCK_K step it gathers the bytes of its (BLOCK_N,
BLOCK_K) weights, dequantizes them with ``engine.quant.ggml``'s formulas (drawn there) into fp32,
and accumulates ``tl.dot`` in fp32. Activations in fp32 are multiplied in IEEE fp32 (no TF32); in
bf16 / fp16 the dequantized weights are cast to that dtype first, as the load-time path casts them.
Products that the CPU path keeps apart are exact where an add follows them (see cpu_quant_gemm.c,
EXACT), so whether the compiler fuses them does not change a weight. The sum's order is the tensor
cores', so results equal ``F.linear`` over the reference to rounding, not bit for bit.

Tested under ``TRITON_INTERPRET=1`` against ``F.linear`` over ``dequantize`` on small shapes, every
type (tests/unit/test_quant_triton.py); ``make test-gpu`` runs the same on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from engine.quant.fp8 import FP8Weight
from engine.quant.ggml import BLOCKS, GGMLWeight
from engine.quant.weight import Weight

QTYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "fp8_e4m3": 6}


def runs_interpreted() -> bool:
    return type(_quant_linear_kernel).__name__ == "InterpretedFunction"


def triton_available() -> bool:
    """A GPU to launch on (the interpreter serves tests only, through ``triton_linear`` directly)."""
    return torch.cuda.is_available() and not runs_interpreted()


def triton_supports(weight: Weight) -> bool:
    return isinstance(weight, FP8Weight) or (isinstance(weight, GGMLWeight) and weight.qtype in QTYPES)


@triton.jit
def _u8(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, mask):
    """Two little-endian bytes at ``ptr`` as an fp16, widened to fp32 (exact)."""
    bits = _u8(ptr, mask) | (_u8(ptr + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant(
    w_ptr,
    s_ptr,
    n,
    k,
    row_bytes,
    s_stride,
    mask,
    QTYPE: tl.constexpr,
    FP8_BN: tl.constexpr,
    FP8_BK: tl.constexpr,
):
    """Weights (n, k) (broadcast index tensors) as fp32: engine.quant.ggml's formulas."""
    row = w_ptr + n.to(tl.int64) * row_bytes
    if QTYPE == 0:  # Q8_0: q * d
        base = row + (k // 32) * 34
        q = _u8(base + 2 + k % 32, mask).to(tl.int8).to(tl.float32)
        w = q * _f16(base, mask)
    elif QTYPE == 1:  # Q4_0: d * (q - 8)
        base = row + (k // 32) * 18
        q = (_u8(base + 2 + k % 16, mask) >> (4 * ((k % 32) // 16))) & 15
        w = _f16(base, mask) * (q - 8).to(tl.float32)
    elif QTYPE == 2:  # Q4_1: d * q + m
        base = row + (k // 32) * 20
        q = (_u8(base + 4 + k % 16, mask) >> (4 * ((k % 32) // 16))) & 15
        w = _f16(base, mask) * q.to(tl.float32) + _f16(base + 2, mask)
    elif QTYPE == 3 or QTYPE == 4:  # Q4_K / Q5_K: (d * sc) * q - (dmin * m), per 32-k sub-block
        size: tl.constexpr = 144 if QTYPE == 3 else 176
        base = row + (k // 256) * size
        j = k % 256
        s = j // 32
        a = _u8(base + 4 + s % 4, mask)
        b = _u8(base + 8 + s % 4, mask)
        c = _u8(base + 12 + s % 4, mask)
        sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
        mn = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
        qs_at: tl.constexpr = 16 if QTYPE == 3 else 48
        q = (_u8(base + qs_at + (j // 64) * 32 + j % 32, mask) >> (4 * ((j % 64) // 32))) & 15
        if QTYPE == 4:
            q = q | (((_u8(base + 16 + j % 32, mask) >> s) & 1) << 4)
        ds = _f16(base, mask) * sc.to(tl.float32)
        dm = _f16(base + 2, mask) * mn.to(tl.float32)
        w = ds * q.to(tl.float32) - dm
    elif QTYPE == 5:  # Q6_K: (d * sc) * (q - 32), per 16-k group
        base = row + (k // 256) * 210
        j = k % 256
        h = j // 128
        r = j % 128
        low = (_u8(base + h * 64 + r % 64, mask) >> (4 * (r // 64))) & 15
        high = (_u8(base + 128 + h * 32 + r % 32, mask) >> (2 * (r // 32))) & 3
        q = (low | (high << 4)) - 32
        sc = _u8(base + 192 + j // 16, mask).to(tl.int8).to(tl.float32)
        w = (_f16(base + 208, mask) * sc) * q.to(tl.float32)
    else:  # FP8 e4m3: the fp32 bit pattern built from sign, exponent and mantissa, times its block's scale
        byte = _u8(row + k, mask)
        e = (byte >> 3) & 15
        m = byte & 7
        sign = (byte >> 7) << 31
        normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125  # 2^-9: e4m3's subnormal step
        sub = tl.where(sign != 0, -sub, sub)
        v = tl.where(e == 0, sub, normal)
        v = tl.where((byte & 127) == 127, float("nan"), v)
        scale = tl.load(s_ptr + (n // FP8_BN) * s_stride + k // FP8_BK, mask=mask, other=0.0)
        w = v * scale
    return w


@triton.jit
def _quant_linear_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    row_bytes,
    s_stride,
    stride_ym,
    QTYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8_BN: tl.constexpr,
    FP8_BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        xm = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=xm, other=0.0)  # (BM, BK)
        wm = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = _dequant(
            w_ptr, s_ptr, offs_n[:, None], offs_k[None, :], row_bytes, s_stride, wm, QTYPE, FP8_BN, FP8_BK
        )
        if FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")  # (BM, BN)
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ym = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


def triton_linear(
    weight: Weight, bias: torch.Tensor | None, block: tuple[int, int, int] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (T, in) -> (T, out)`` in x's dtype for a GGUF or FP8 ``weight`` on x's device.
    ``block``: (BLOCK_M, BLOCK_N, BLOCK_K) (tests pick small ones for the interpreter)."""
    if isinstance(weight, GGMLWeight):
        data, scales, code, fp8_block = weight.data, None, QTYPES[weight.qtype], (1, 1)
        row_bytes = int(weight.data.shape[1])
        assert BLOCKS[weight.qtype][0] % 32 == 0
    elif isinstance(weight, FP8Weight):
        data, scales, code, fp8_block = (
            weight.q.view(torch.uint8),
            weight.scale_inv.float().contiguous(),
            6,
            weight.block,
        )
        row_bytes = int(weight.shape[1])
    else:
        raise TypeError(f"no Triton kernel for {type(weight).__name__}")
    n, k = weight.shape
    data = data.contiguous()
    b = None if bias is None else bias.contiguous()

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
            raise ValueError(f"expected (T, {k}) with contiguous rows, got {tuple(x.shape)}")
        m = x.shape[0]
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        bm, bn, bk = block or ((16 if m <= 16 else 64), 64, 64)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _quant_linear_kernel[grid](
            x,
            data,
            scales if scales is not None else data,
            b if b is not None else y,
            y,
            m,
            n,
            k,
            x.stride(0),
            row_bytes,
            scales.stride(0) if scales is not None else 0,
            y.stride(0),
            QTYPE=code,
            HAS_BIAS=b is not None,
            FP32=x.dtype == torch.float32,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            FP8_BN=fp8_block[0],
            FP8_BK=fp8_block[1],
        )
        return y

    return linear
