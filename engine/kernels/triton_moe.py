"""Triton kernels for a MoE layer's routed experts: grouped GEMMs over the (token, expert) pairs.

The pairs arrive grouped by expert (engine/moe_routing.py). Each expert's rows are cut into tiles
of BLOCK_M rows that belong to that expert only (the last tile of an expert masked), so a program
multiplies one row tile by one expert's weights::

    tiles:   expert 0: rows 0..15 | expert 0: rows 16..20 (masked) | expert 2: rows 21..36 | ...
    kernel 1 (tile, I columns):  act = silu(x @ W_gate[e]^T) * (x @ W_up[e]^T)     (P, I)
    kernel 2 (tile, H columns):  y   = (act @ W_down[e]^T) * routing weight         (P, H)

Weights are stacked once per layer, ``(E, 2I, H)`` (gate rows then up rows) and ``(E, H, I)``.
Accumulation is fp32; every loaded tile is upcast to fp32 first (bf16 arithmetic is wrong under
the Triton interpreter, MEASURED.md). On a CPU the kernels run only in the interpreter
(TRITON_INTERPRET=1 before this module is imported: tests/unit/test_moe_kernels.py, tiny shapes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_BLOCK_M, _BLOCK_N, _BLOCK_K = 16, 32, 32


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    act_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    hidden,
    inter,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < end, cols < inter
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = w_ptr + e * 2 * inter * hidden
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < hidden
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * hidden + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(w_base + cols[None, :] * hidden + ks[:, None], mask=wmask, other=0.0)  # (K, N)
        wu = tl.load(w_base + (inter + cols[None, :]) * hidden + ks[:, None], mask=wmask, other=0.0)
        x = x.to(tl.float32)
        acc_g += tl.dot(x, wg.to(tl.float32))
        acc_u += tl.dot(x, wu.to(tl.float32))
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
    out = act_ptr + rows[:, None].to(tl.int64) * inter + cols[None, :]
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _down_kernel(
    act_ptr,
    w_ptr,
    weight_ptr,
    y_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    hidden,
    inter,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    rows = start + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < end, cols < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = w_ptr + e * hidden * inter
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < inter
        a = tl.load(
            act_ptr + rows[:, None].to(tl.int64) * inter + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        wd = tl.load(
            w_base + cols[None, :] * inter + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0
        )
        acc += tl.dot(a.to(tl.float32), wd.to(tl.float32))
    rw = tl.load(weight_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    y = acc * rw[:, None]
    tl.store(
        y_ptr + rows[:, None].to(tl.int64) * hidden + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


def tiles(counts: Sequence[int], block_m: int = _BLOCK_M) -> tuple[list[int], list[int], list[int]]:
    """Row tiles of at most ``block_m`` rows, each within one expert: (expert, start, end) lists."""
    experts, starts, ends = [], [], []
    start = 0
    for e, n in enumerate(counts):
        for s in range(start, start + n, block_m):
            experts.append(e)
            starts.append(s)
            ends.append(min(s + block_m, start + n))
        start += n
    return experts, starts, ends


class TritonExperts:
    """``engine.moe.Experts`` on the GPU (or the interpreter): the two grouped kernels above."""

    def __init__(
        self, gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor], down: Sequence[torch.Tensor]
    ) -> None:
        self.w_gate_up = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)]).contiguous()
        self.w_down = torch.stack(list(down)).contiguous()  # (E, H, I)
        self.inter, self.hidden = gate[0].shape

    def __call__(self, xs: torch.Tensor, counts: Sequence[int], w: torch.Tensor) -> torch.Tensor:
        p = xs.shape[0]
        if sum(counts) != p or len(counts) != self.w_down.shape[0]:
            raise ValueError(f"{len(counts)} expert counts summing to {sum(counts)} for {p} rows")
        y = torch.empty_like(xs)
        experts, starts, ends = tiles(counts)
        if not experts:
            return y
        dev = xs.device
        te, ts, tn = (torch.tensor(v, dtype=torch.int32, device=dev) for v in (experts, starts, ends))
        xs, w = xs.contiguous(), w.contiguous()
        act = torch.empty(p, self.inter, dtype=xs.dtype, device=dev)
        grid = (len(experts), triton.cdiv(self.inter, _BLOCK_N))
        _gate_up_kernel[grid](
            xs, self.w_gate_up, act, te, ts, tn, self.hidden, self.inter, _BLOCK_M, _BLOCK_N, _BLOCK_K
        )
        grid = (len(experts), triton.cdiv(self.hidden, _BLOCK_N))
        _down_kernel[grid](
            act, self.w_down, w, y, te, ts, tn, self.hidden, self.inter, _BLOCK_M, _BLOCK_N, _BLOCK_K
        )
        return y
