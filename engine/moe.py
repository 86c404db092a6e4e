"""A mixture-of-experts MLP: its weights, their loading, and its forward (route, run the experts on
their tokens, combine, add the shared expert).

::

    h (T, hidden) ── router ──▶ top-k (expert, weight) per token (engine/moe_routing.py)
      │                          pairs grouped by expert: one run of rows per active expert
      ├── xs = h[pair tokens] (P, hidden) ──▶ experts backend ──▶ y (P, hidden), weighted
      │       (with expert parallelism: xs travel to their experts' ranks and y back, all-to-all)
      ├── combine: each token's k outputs summed in ascending expert order    (T, hidden)
      └── + shared expert (DeepSeek), or + sigmoid(gate(h)) * shared expert (Qwen2-MoE)

Expert backends (all take the pairs already grouped: ``counts[e]`` rows for local expert e):

- ``GroupedExperts``: per active expert, its rows through the model's linears (engine/linear.py:
  the C GEMM or oneDNN on CPU, quantized methods as they come); with the ``torch`` linear backend it
  is the reference, F.linear as transformers computes each expert.
- ``engine.kernels.cpu_moe``: one C call per layer for every expert (fp32, CPU).
- ``engine.kernels.triton_moe``: grouped GEMM kernels (GPU; the interpreter on CPU in tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from engine.arch import MoEConfig
from engine.linear import Linear, make_linear
from engine.moe_routing import Routed, combine, group, route

Take = Callable[[str, tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True, slots=True)
class MoEWeights:
    router: torch.Tensor  # (E, hidden)
    correction_bias: torch.Tensor | None  # (E,) DeepSeek's e_score_correction_bias, fp32
    expert_ids: tuple[int, ...]  # the experts held here (all of them, or a rank's share)
    gate: tuple[torch.Tensor, ...]  # per held expert (I, hidden)
    up: tuple[torch.Tensor, ...]  # per held expert (I, hidden)
    down: tuple[torch.Tensor, ...]  # per held expert (hidden, I)
    shared_gate_proj: torch.Tensor | None = None  # (I_s, hidden)
    shared_up_proj: torch.Tensor | None = None  # (I_s, hidden)
    shared_down_proj: torch.Tensor | None = None  # (hidden, I_s)
    shared_expert_gate: torch.Tensor | None = None  # (1, hidden), Qwen2-MoE


def load_moe_weights(take: Take, prefix: str, arch: str, cfg: MoEConfig, hidden: int) -> MoEWeights:
    """One sparse layer's weights under their Hugging Face names (``prefix``: ``model.layers.{i}.``)."""
    n, inter = cfg.num_experts, cfg.intermediate_size
    if arch == "mixtral":
        p, names = prefix + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        p, names = prefix + "mlp.", ("gate_proj", "up_proj", "down_proj")
    gate, up, down = [], [], []
    for e in range(n):
        gate.append(take(f"{p}experts.{e}.{names[0]}.weight", (inter, hidden)))
        up.append(take(f"{p}experts.{e}.{names[1]}.weight", (inter, hidden)))
        down.append(take(f"{p}experts.{e}.{names[2]}.weight", (hidden, inter)))
    bias = None
    if cfg.score_correction_bias:
        bias = take(p + "gate.e_score_correction_bias", (n,)).float()
    shared: dict[str, torch.Tensor] = {}
    s = cfg.shared_intermediate_size
    if s:
        sp = p + ("shared_experts." if arch == "deepseek_v3" else "shared_expert.")
        shared["shared_gate_proj"] = take(sp + "gate_proj.weight", (s, hidden))
        shared["shared_up_proj"] = take(sp + "up_proj.weight", (s, hidden))
        shared["shared_down_proj"] = take(sp + "down_proj.weight", (hidden, s))
    if cfg.shared_gate:
        shared["shared_expert_gate"] = take(p + "shared_expert_gate.weight", (1, hidden))
    return MoEWeights(
        router=take(p + "gate.weight", (n, hidden)),
        correction_bias=bias,
        expert_ids=tuple(range(n)),
        gate=tuple(gate),
        up=tuple(up),
        down=tuple(down),
        **shared,
    )


def shard_experts(w: MoEWeights, held: range) -> MoEWeights:
    """Expert parallelism: only experts ``held`` (router, correction bias, shared expert: all)."""
    return dataclasses.replace(
        w,
        expert_ids=tuple(w.expert_ids[e] for e in held),
        gate=tuple(w.gate[e] for e in held),
        up=tuple(w.up[e] for e in held),
        down=tuple(w.down[e] for e in held),
    )


def shard_expert_columns(w: MoEWeights, rank: int, size: int) -> MoEWeights:
    """Tensor parallelism: every expert (and the shared one) with rank's share of its intermediate
    columns, as a dense MLP is split; the partial outputs are summed by the layer's all-reduce."""

    def cols(t: torch.Tensor) -> slice:
        n = t.shape[0] // size
        return slice(rank * n, (rank + 1) * n)

    def down(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[1] // size
        return t[:, rank * n : (rank + 1) * n].contiguous()

    shared: dict[str, Any] = {}
    if w.shared_gate_proj is not None and w.shared_up_proj is not None and w.shared_down_proj is not None:
        s = cols(w.shared_gate_proj)
        shared = dict(
            shared_gate_proj=w.shared_gate_proj[s],
            shared_up_proj=w.shared_up_proj[s],
            shared_down_proj=down(w.shared_down_proj),
        )
    return dataclasses.replace(
        w,
        gate=tuple(g[cols(g)] for g in w.gate),
        up=tuple(u[cols(u)] for u in w.up),
        down=tuple(down(d) for d in w.down),
        **shared,
    )


class Experts(Protocol):
    def __call__(self, xs: torch.Tensor, counts: Sequence[int], w: torch.Tensor) -> torch.Tensor:
        """xs (P, hidden) grouped by local expert (``counts[e]`` rows each, in expert order), w (P,)
        their routing weights -> (P, hidden): each row's expert output times its weight."""
        ...


class GroupedExperts:
    """One pass per active expert over its rows, through the model's linears; fused gate/up."""

    def __init__(self, w: MoEWeights, backend: str) -> None:
        self.inter = w.gate[0].shape[0] if w.gate else 0
        self.gate_up = [
            make_linear(torch.cat([g, u]), None, backend) for g, u in zip(w.gate, w.up, strict=True)
        ]
        self.down = [make_linear(d, None, backend) for d in w.down]

    def __call__(self, xs: torch.Tensor, counts: Sequence[int], w: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(xs)  # (P, hidden)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                gu = self.gate_up[e](xs[rows])  # (n, 2I)
                act = F.silu(gu[:, : self.inter]) * gu[:, self.inter :]  # (n, I), transformers' order
                # as transformers: the product in the weights' dtype (Mixtral's fp32), then the run dtype
                y[rows] = (self.down[e](act) * w[rows, None]).to(xs.dtype)
            start += n
        return y


ExpertsFactory = Callable[[MoEWeights, str], Experts]


class MoEMLP:
    """A sparse layer's MLP. ``dispatch`` (expert parallelism, engine/expert_parallel.py) routes
    this rank's share of the tokens, runs their pairs on their experts' ranks and returns the whole
    routed output; None runs every expert here. ``all_reduce`` sums the output over tensor-parallel
    ranks (experts split by columns); identity when the output is whole on every rank."""

    def __init__(
        self,
        w: MoEWeights,
        cfg: MoEConfig,
        backend: str,
        experts: Experts,
        all_reduce: Callable[[torch.Tensor], torch.Tensor],
        dispatch: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.cfg, self.experts, self.all_reduce, self.dispatch = cfg, experts, all_reduce, dispatch
        # DeepSeek scores in fp32 whatever the run dtype (transformers casts both sides to fp32)
        self.router = make_linear(w.router.float() if cfg.scoring == "sigmoid" else w.router, None, backend)
        self.correction_bias = w.correction_bias
        self.shared: Callable[[torch.Tensor], torch.Tensor] | None = None
        if w.shared_gate_proj is not None:
            assert w.shared_up_proj is not None and w.shared_down_proj is not None
            self.shared = swiglu(w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj, backend)
        self.shared_gate = (
            None if w.shared_expert_gate is None else make_linear(w.shared_expert_gate, None, backend)
        )

    def route(self, h: torch.Tensor) -> Routed:
        """h (T, hidden) -> its tokens' experts and weights, pairs grouped by expert."""
        ids, weights = route(h, self.router, self.cfg, self.correction_bias)
        return group(ids, weights, self.cfg.num_experts)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h (T, hidden) -> the MLP output (T, hidden), summed over the ranks it is split over."""
        if self.dispatch is not None:  # expert parallel: every rank gets the whole routed output
            out = self.dispatch(h, self.route, self.experts)  # (T, hidden)
        else:
            r = self.route(h)
            y = self.experts(h.index_select(0, r.pair_tokens), r.counts, r.pair_weights)  # (P, hidden)
            out = combine(y, r.rows)  # (T, hidden)
        if self.shared is not None:
            shared = self.shared(h)  # (T, hidden): this rank's columns' part under TP
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(h)) * shared
            out = out + shared
        return self.all_reduce(out)


def swiglu(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, backend: str) -> Linear:
    """x (T, hidden) -> down(silu(gate(x)) * up(x)), gate and up one matmul (engine/linear.py)."""
    inter = gate.shape[0]
    gate_up, down_l = make_linear(torch.cat([gate, up]), None, backend), make_linear(down, None, backend)

    def mlp(x: torch.Tensor) -> torch.Tensor:
        y = gate_up(x)  # (T, 2I), a fresh output: in place is safe
        return down_l(F.silu(y[:, :inter], inplace=True).mul_(y[:, inter:]))

    return mlp
