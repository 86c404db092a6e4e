"""Routing a mixture of experts: router logits -> each token's top-k experts and their weights, and
the grouping of (token, expert) pairs by expert that every expert backend computes on.

The scoring follows transformers' routers expression for expression (engine/arch.py lists the three
families), so the experts chosen are the reference's whenever the router logits are; the router's
matmul is the model's own linear (batch invariant on the CPU kernel), so a token's choice does not
depend on the batch it lands in.

Grouping (no per-token Python: one stable sort of the flat expert ids)::

    ids (T, k)   [[2, 0], [1, 2]]              pairs p = t * k + j, sorted by expert, stable:
    order        [1, 2, 0, 3]                  pair 1 (e0) | pair 2 (e1) | pair 0, pair 3 (e2)
    counts (E,)  [1, 1, 2]                     one run of rows per active expert
    rows (T, k)  [[0, 2], [1, 3]]              each token's pairs in the sorted list, expert-ascending

A token's expert outputs are summed in ascending expert order, starting from its first one, as
transformers' per-expert ``index_add_`` adds them: the combine is the same floats whatever the batch
or the split of experts over ranks (engine/expert_parallel.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.arch import MoEConfig


@dataclass(slots=True)
class Routed:
    """One step's routing, grouped by expert."""

    ids: torch.Tensor  # (T, k) int64 expert ids, each row ascending
    weights: torch.Tensor  # (T, k) routing weights, in the order of ids
    order: torch.Tensor  # (P,) int64: pair indices (t * k + j) sorted by expert, stable
    counts: list[int]  # (E,) pairs per expert, in expert order
    rows: torch.Tensor  # (T, k) int64: where each of a token's pairs sits in the sorted order

    @property
    def pair_tokens(self) -> torch.Tensor:
        """(P,) the token of each sorted pair."""
        return self.order // self.ids.shape[1]

    @property
    def pair_weights(self) -> torch.Tensor:
        """(P,) the routing weight of each sorted pair."""
        return self.weights.reshape(-1).index_select(0, self.order)


def route(
    h: torch.Tensor,  # (T, hidden)
    router: Callable[[torch.Tensor], torch.Tensor],  # (T, hidden) -> (T, E) logits
    cfg: MoEConfig,
    correction_bias: torch.Tensor | None,  # (E,) fp32, DeepSeek
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (T, k) int64, weights (T, k)) as transformers' router of the family computes them."""
    k = cfg.top_k
    if cfg.scoring == "sigmoid":
        logits = router(h.float()).float()  # DeepSeek scores in fp32 whatever the run dtype
        scores = logits.sigmoid()  # (T, E)
        choice = scores if correction_bias is None else scores + correction_bias
        if cfg.num_groups > 1:
            t, g = choice.shape[0], cfg.num_groups
            group_scores = choice.view(t, g, cfg.num_experts // g).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
            group_idx = torch.topk(group_scores, k=cfg.topk_groups, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = (
                group_mask.unsqueeze(-1).expand(t, g, cfg.num_experts // g).reshape(t, cfg.num_experts)
            )
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]  # (T, k)
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
    else:
        logits = router(h)  # (T, E) in the run dtype
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not cfg.weights_fp32:
            weights = weights.to(logits.dtype)
    return ids, weights


def group(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Routed:
    """Sort a step's (token, expert) pairs by expert; each token's ids ascending."""
    ids, perm = ids.sort(dim=1)  # (T, k): a token's experts in the order their outputs are summed
    weights = weights.gather(1, perm)
    flat = ids.reshape(-1)  # (P,)
    order = torch.argsort(flat, stable=True)  # (P,)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    rows = torch.empty_like(order)
    rows[order] = torch.arange(order.numel(), device=order.device)
    return Routed(ids, weights, order, counts, rows.view(ids.shape))


def combine(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[t] = y[rows[t, 0]] + y[rows[t, 1]] + ... in that order: y (P, hidden) weighted expert
    outputs in sorted order, rows (T, k) -> (T, hidden)."""
    out = y.index_select(0, rows[:, 0])  # 0 + a == a: the sum starts from the first output
    for j in range(1, rows.shape[1]):
        out += y.index_select(0, rows[:, j])
    return out
