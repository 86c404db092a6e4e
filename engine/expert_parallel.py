"""Expert parallelism inside one worker: each rank holds ``E / ep`` of every MoE layer's routed
experts, and the (token, expert) pairs travel to their experts' ranks and back, all-to-all (gloo
on CPU, NCCL on GPU).

Every rank enters a MoE layer with the same hidden states (attention is replicated or all-reduced
before it). Each rank takes its own slice of the tokens, so every pair is computed exactly once::

    rank r: tokens [T*r/W, T*(r+1)/W) ─ route ─ pairs sorted by expert = by owner rank
      1. all-to-all: per (destination rank, its local expert), how many rows          (E,) int64
      2. all-to-all: the rows themselves                                              (P_r, hidden)
         the receiver reorders them by its local expert (from every source in rank order), runs
         its experts (engine/moe.py backends) with weight 1, and restores the arrival order
      3. all-to-all: the outputs back to the ranks that sent the rows                 (P_r, hidden)
      4. each rank weights and combines its tokens' outputs (engine/moe_routing.combine), and an
         all-gather gives every rank the whole (T, hidden)

A row's expert output is the same floats whoever computes it (the CPU kernels are batch invariant),
the weight multiply and the per-token sum in ascending expert order are the ones a single rank
does, so an EP = 2 worker computes exactly EP = 1's floats (tested). The shared expert is computed
on every rank for every token, as with one rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.moe import Experts
from engine.moe_routing import Routed, combine
from engine.parallel import TPGroup


class ExpertDispatch:
    """``engine.moe.MoEMLP``'s routed part for a worker of ``group.size`` expert-parallel ranks."""

    def __init__(self, group: TPGroup, num_experts: int) -> None:
        self.group, self.num_experts = group, num_experts
        self.rank, self.size = group.rank, group.size
        self.local = num_experts // self.size

    def __call__(
        self, h: torch.Tensor, route: Callable[[torch.Tensor], Routed], experts: Experts
    ) -> torch.Tensor:
        """h (T, hidden), the layer's router -> the routed experts' output (T, hidden) on every rank."""
        t, hidden, w = h.shape[0], h.shape[1], self.size
        lo, hi = t * self.rank // w, t * (self.rank + 1) // w
        mine = route(h[lo:hi])  # my tokens' pairs, grouped by expert = by owner rank
        xs = h[lo:hi].index_select(0, mine.pair_tokens)  # (P_r, hidden), grouped by owner rank
        dev = h.device  # NCCL exchanges device tensors, gloo host ones: both are where h is
        send_counts = torch.tensor(mine.counts, dtype=torch.int64, device=dev)  # (E,) = W blocks of E/W
        recv_counts = torch.empty_like(send_counts)  # (E,): block s = source s's rows per local expert
        self.group.all_to_all(recv_counts, send_counts, [self.local] * w, [self.local] * w)
        send_splits = send_counts.view(w, self.local).sum(1).tolist()
        per_source = recv_counts.view(w, self.local)  # (W, E/W)
        recv_splits = per_source.sum(1).tolist()
        rows = xs.new_empty(sum(recv_splits), hidden)
        self.group.all_to_all(rows, xs, recv_splits, send_splits)
        # arrival order: source-major, expert-minor; the experts want expert-major, source-minor
        arrival = torch.arange(rows.shape[0], device=dev).split(per_source.reshape(-1).tolist())
        by_expert = [arrival[s * self.local + e] for e in range(self.local) for s in range(w)]
        perm = torch.cat(by_expert) if by_expert else torch.empty(0, dtype=torch.int64, device=dev)
        y_sorted = experts(
            rows.index_select(0, perm), per_source.sum(0).tolist(), rows.new_ones(rows.shape[0])
        )
        y_back = torch.empty_like(y_sorted)
        y_back[perm] = y_sorted  # arrival order again
        y = xs.new_empty(xs.shape)
        self.group.all_to_all(y, y_back, send_splits, recv_splits)
        y = (y * mine.pair_weights[:, None]).to(y.dtype)  # the weight multiply one rank's kernel does
        out = combine(y, mine.rows) if hi > lo else h.new_empty(0, hidden)  # (T_r, hidden)
        return self._gather(out, t)

    def _gather(self, out: torch.Tensor, t: int) -> torch.Tensor:
        """Every rank's token slice, in rank order -> (T, hidden)."""
        w, width = self.size, -(-t // self.size)  # slices padded to the longest for all_gather
        padded = out.new_zeros(width, out.shape[1])
        padded[: out.shape[0]] = out
        parts = self.group.all_gather(padded)
        return torch.cat([parts[r][: t * (r + 1) // w - t * r // w] for r in range(w)])
