"""Triton kernel that stores one step's K and V into a layer's paged pool at flat slots.

A slot is ``block_id * B + offset`` (engine/kv_layout.py); token t's heads land at::

    kv_layer (N, 2, H_kv, B, D):  kv_layer[slot // B, 0, :, slot % B, :] = k[t]   # (H_kv, D)
                                  kv_layer[slot // B, 1, :, slot % B, :] = v[t]

A negative slot means "padding, write nothing" (a captured batch may be padded to a fixed size).
The kernel moves bits, not numbers: both sides are viewed as same-width integers, so the copy is
exact for every dtype, including bf16 that the Triton interpreter computes wrongly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _kv_write_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kvn,
    stride_kvkv,
    stride_kvh,
    stride_kvb,
    block_size,
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    H_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, BLOCK_D)  # head_dim padded to a power of two
    mask = (h[:, None] < num_heads) & (d[None, :] < HEAD_DIM) & (slot >= 0)  # (H_PAD, BLOCK_D)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)  # (H_PAD, D)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = kv_ptr + (slot // block_size) * stride_kvn + (slot % block_size) * stride_kvb
    dst = dst + h[:, None] * stride_kvh + d[None, :]  # (H_PAD, D)
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_kvkv, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v (T, H_kv, D) into kv_layer (N, 2, H_kv, B, D) at slot_mapping (T,); slot < 0 skips."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if kv_layer.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("write_kv needs the head dimension contiguous")
    # Casting in torch rounds to nearest, as the reference does; the kernel then copies bits.
    k = k.to(kv_layer.dtype)
    v = v.to(kv_layer.dtype)
    bits = _BITS[kv_layer.element_size()]
    kb, vb, kvb = k.view(bits), v.view(bits), kv_layer.view(bits)
    _kv_write_kernel[(num_tokens,)](
        kb,
        vb,
        kvb,
        slot_mapping,
        kb.stride(0),
        kb.stride(1),
        vb.stride(0),
        vb.stride(1),
        kvb.stride(0),
        kvb.stride(1),
        kvb.stride(2),
        kvb.stride(3),
        kv_layer.shape[3],
        num_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        H_PAD=triton.next_power_of_2(num_heads),
    )
