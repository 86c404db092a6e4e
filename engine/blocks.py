"""A decoder layer as the forward pass runs it: a norm, an attention part, a norm, an MLP part, each
part chosen by the checkpoint (ARCHITECTURE.md, "Models")::

    x ─ add + RMSNorm ─ attn.write (project, store this step's KV) ─ [on_layer(i)] ─ attn.attend ─┐
    ┌─────────────────────────────────────────────────────────────────────────────────────────────┘
    └ add + RMSNorm ─ mlp ─ delta (added to x by the next layer's norm)

    attention:  HeadAttention (MHA / GQA, optional per-head q/k RMSNorm)  |  LatentAttention (MLA)
    MLP:        dense SwiGLU                                              |  MoEMLP (routed experts,
                                                                             optional shared expert)

Both attention kinds split ``write`` from ``attend`` so a prefill worker can ship a layer's KV as
soon as it is in the cache, while the layer's attention and the later layers compute. Every part
returns its output already summed over the tensor-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from engine.attention import AttentionBackend, AttentionMetadata
from engine.kernels.cpu_fused import LayerOps, rms_norm


@dataclass(slots=True)
class StepState:
    """What every layer's attention needs of one forward, computed once."""

    positions: torch.Tensor  # (T,) int64
    slots: torch.Tensor  # (T,) int64 flat KV slots
    ops_state: Any  # LayerOps.prepare's (rope angles and slots, checked)
    ops: LayerOps  # the model's fused or torch ops


class AttentionPart(Protocol):
    def write(self, h: torch.Tensor, step: StepState, kv_layer: torch.Tensor) -> torch.Tensor:
        """Project h (T, hidden) and store this step's KV in ``kv_layer``; returns the query."""
        ...

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The query against the paged context -> the layer's output (T, hidden)."""
        ...


@dataclass(slots=True)
class Block:
    input_norm: torch.Tensor  # (hidden,)
    post_norm: torch.Tensor  # (hidden,)
    attn: AttentionPart
    mlp: Callable[[torch.Tensor], torch.Tensor]  # (T, hidden) -> (T, hidden)


class HeadAttention:
    """Per-head attention over K/V heads in the paged pool (Llama, Qwen2, Mistral, Qwen3, Mixtral,
    Qwen-MoE). ``qkv`` / ``o`` are the layer's linears (engine/model.py fuses q/k/v where it can)."""

    def __init__(
        self,
        qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        o: Callable[[torch.Tensor], torch.Tensor],
        backend: AttentionBackend,
        head_dim: int,
        scale: float,
        all_reduce: Callable[[torch.Tensor], torch.Tensor],
        qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> None:
        self.qkv, self.o, self.backend = qkv, o, backend
        self.head_dim, self.scale, self.all_reduce, self.qk_norm = head_dim, scale, all_reduce, qk_norm

    def write(self, h: torch.Tensor, step: StepState, kv_layer: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h)  # (T, H*D), (T, H_kv*D), (T, H_kv*D): this rank's heads
        if self.qk_norm is not None:  # Qwen3: RMSNorm over each head's D values, before rope
            q_w, k_w, eps = self.qk_norm
            t, d = q.shape[0], self.head_dim
            q = rms_norm(q.view(t, -1, d), q_w, eps).view(t, -1)
            k = rms_norm(k.view(t, -1, d), k_w, eps).view(t, -1)
        return step.ops.rope_write_kv(q, k, v, step.ops_state, kv_layer)  # (T, H, D)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        o = self.backend.forward(q, kv_layer, meta, self.scale)  # (T, H, D)
        return self.all_reduce(self.o(o.reshape(o.shape[0], -1)))  # (T, hidden), summed over ranks


def dense_mlp(
    gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    down: Callable[[torch.Tensor], torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The SwiGLU MLP: down(silu(gate(h)) * up(h)), summed over ranks."""

    def mlp(h: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up(h)  # (T, I/tp) each, fresh outputs: in place is safe
        return all_reduce(down(F.silu(gate, inplace=True).mul_(up)))  # (T, hidden)

    return mlp
