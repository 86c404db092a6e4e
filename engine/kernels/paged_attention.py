"""Triton paged attention: a decode kernel (one query token per sequence) and a prefill kernel
(a causal chunk per sequence, possibly after a cached prefix), both reading K/V through block tables.

Both kernels walk a sequence's context in tiles of BLOCK_N *tokens*, gathering each token's row by
its own block id, so a tile may span several small blocks (block_size 4) or part of a big one::

    token n  ->  block_tables[seq, n // B]  ->  kv_layer[blk, 0|1, h_kv, n % B, :]

Any block size and head_dim work (head_dim is padded to a power of two with masked lanes); the
prefill kernel's tl.dot needs head_dim >= 16 on a GPU. Softmax is online (running max m, running
sum l, fp32 accumulator), in base 2 with the scale folded into log2(e). Query head h reads KV head
h // (H_q // H_kv), as SDPA's ``enable_gqa`` does.

bf16 under the Triton interpreter: arithmetic on bf16 values is wrong there (MEASURED.md), so every
loaded tile is upcast to fp32 before it is used (the prefill kernel keeps fp16/bf16 tiles for
tl.dot on a GPU, where tensor cores want them, and upcasts only under the interpreter).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def runs_interpreted() -> bool:
    """Whether these kernels run in the Triton interpreter: decided when they were defined (by
    TRITON_INTERPRET at import), not by the variable's value now."""
    return type(_paged_decode_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    kv_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kvn,
    stride_kvkv,
    stride_kvh,
    stride_kvb,
    stride_bt,
    token_offset,
    seq_offset,
    block_size,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per (decode sequence, KV head): the GROUP query heads sharing that KV head are
    # handled together, so each K/V tile is read once per group, not once per query head.
    s = tl.program_id(0)
    hk = tl.program_id(1)
    seq = seq_offset + s
    tok = (token_offset + s).to(tl.int64)
    ctx = tl.load(seq_lens_ptr + seq)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)  # head_dim padded to a power of two; padding lanes read 0
    dmask = d < HEAD_DIM
    gmask = g < GROUP
    heads = hk * GROUP + g  # (G,)
    qmask = gmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)
    q = q.to(tl.float32) * scale_log2e  # (G, D)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head = kv_ptr + hk.to(tl.int64) * stride_kvh
    for start in range(0, ctx, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < ctx
        blk = tl.load(table + n // block_size, mask=nmask, other=0).to(tl.int64)
        rows = blk * stride_kvn + (n % block_size) * stride_kvb  # (N,)
        tile_mask = nmask[:, None] & dmask[None, :]  # (N, D)
        k = tl.load(kv_head + rows[:, None] + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        v = tl.load(kv_head + stride_kvkv + rows[:, None] + d[None, :], mask=tile_mask, other=0.0)
        v = v.to(tl.float32)  # (N, D)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G, N), already in log2 units
        scores = tl.where(nmask[None, :], scores, float("-inf"))
        # every tile holds at least one valid token, so m_new is finite and no row turns NaN
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])  # (G, N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = acc / l_i[:, None]
    dst = out_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    q_ptr,
    kv_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2e,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kvn,
    stride_kvkv,
    stride_kvh,
    stride_kvb,
    stride_bt,
    block_size,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per (prefill sequence, query head, tile of BLOCK_M query tokens).
    seq = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq)
    hk = h // GROUP

    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)  # head_dim padded to a power of two; padding lanes read 0
    dmask = d < HEAD_DIM
    mmask = m < q_len
    q_pos = ctx - q_len + m  # (M,) absolute positions: query m sees keys 0..q_pos[m]
    tok = (q_start + m).to(tl.int64)
    qmask = mmask[:, None] & dmask[None, :]  # (M, D)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head = kv_ptr + hk.to(tl.int64) * stride_kvh
    # causal: this tile's last query sits at ctx - q_len + (mb+1)*BLOCK_M - 1; tiles past q_len do nothing
    hi = tl.minimum(ctx, ctx - q_len + (mb + 1) * BLOCK_M)
    hi = tl.where(mb * BLOCK_M < q_len, hi, 0)
    for start in range(0, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < ctx
        blk = tl.load(table + n // block_size, mask=nmask, other=0).to(tl.int64)
        rows = blk * stride_kvn + (n % block_size) * stride_kvb  # (N,)
        k_t = tl.load(kv_head + rows[None, :] + d[:, None], mask=nmask[None, :] & dmask[:, None], other=0.0)
        v = tl.load(
            kv_head + stride_kvkv + rows[:, None] + d[None, :],
            mask=nmask[:, None] & dmask[None, :],
            other=0.0,
        )
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2e  # (M, N)
        visible = nmask[None, :] & (n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # key 0 is visible to every real row in the first tile, so m_i is finite from then on;
        # padding rows (m >= q_len) have q_pos >= ctx and see every valid key
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])  # (M, N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i is 0 only in tiles past q_len (not stored)
    dst = out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=qmask)


def _check(q: torch.Tensor, kv_layer: torch.Tensor) -> int:
    """Query heads per KV head, after checking the layout the kernels rely on."""
    num_q_heads, num_kv_heads = q.shape[1], kv_layer.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV heads")
    if q.shape[2] != kv_layer.shape[4]:
        raise ValueError(f"query head_dim {q.shape[2]} differs from the KV pool's {kv_layer.shape[4]}")
    if q.stride(-1) != 1 or kv_layer.stride(-1) != 1:
        raise ValueError("paged attention needs the head dimension contiguous")
    return num_q_heads // num_kv_heads


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    num_seqs: int,
    token_offset: int = 0,
    seq_offset: int = 0,
    block_n: int | None = None,
) -> None:
    """Decode attention for sequences seq_offset.. seq_offset+num_seqs-1, whose single query tokens
    are rows token_offset.. of q (T, H_q, D); writes the same rows of out (T, H_q, D).
    kv_layer (N, 2, H_kv, B, D); block_tables (S, max_blocks) int32; seq_lens (S,) int32."""
    if num_seqs == 0:
        return
    group, head_dim = _check(q, kv_layer), q.shape[2]
    block_size = kv_layer.shape[3]
    if block_n is None:
        # the (G, N, D) product lives in registers: cap it near 8k elements, but keep >= 16
        # tokens per tile so the block-id gather is amortised
        cap = 8192 // (triton.next_power_of_2(group) * triton.next_power_of_2(head_dim))
        block_n = max(16, min(64, triton.next_power_of_2(block_size), cap))
    tile = triton.next_power_of_2(group) * block_n * triton.next_power_of_2(head_dim)
    # ptxas on sm_90 (AOT, no GPU here): 4 warps spill past ~8k elements, 8 warps do not
    num_warps = 8 if tile > 8192 else 4
    _paged_decode_kernel[(num_seqs, kv_layer.shape[2])](
        out,
        q,
        kv_layer,
        block_tables,
        seq_lens,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        block_tables.stride(0),
        token_offset,
        seq_offset,
        block_size,
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=block_n,
        num_warps=num_warps,
    )


def paged_prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    num_seqs: int,
    max_query_len: int,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    """Causal attention for prefill chunks: sequence i (< num_seqs) owns rows
    query_start_loc[i]..query_start_loc[i+1] of q (T, H_q, D) and has seq_lens[i] tokens of context
    including those rows. Writes the same rows of out. Sequences must be the first rows of the tables."""
    if num_seqs == 0:
        return
    group, head_dim = _check(q, kv_layer), q.shape[2]
    interpreted = runs_interpreted()
    if head_dim < 16 and not interpreted:
        raise ValueError(f"the prefill kernel's tl.dot needs head_dim >= 16 on a GPU, got {head_dim}")
    # fp32 on a GPU: tl.dot would otherwise round inputs to tf32 (10-bit mantissa)
    precision = "ieee" if q.dtype == torch.float32 else None
    if block_m is None or block_n is None:
        # interpreter: the smallest tiles tl.dot takes (its cost grows with tile area); GPU: tiles
        # whose K/V stages fit shared memory even for fp32 at head_dim 128 (untuned)
        block_m = block_m or (16 if interpreted else 32 if q.dtype == torch.float32 else 64)
        block_n = block_n or (16 if interpreted else 32)
    _paged_prefill_kernel[(num_seqs, q.shape[1], math.ceil(max_query_len / block_m))](
        out,
        q,
        kv_layer,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        kv_layer.stride(3),
        block_tables.stride(0),
        kv_layer.shape[3],
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=interpreted,
        PRECISION=precision,
        num_warps=8,  # 4 warps spill registers at these tiles (ptxas, sm_80 and sm_90)
    )
