"""The Llama-family forward pass (Llama, Qwen2, Mistral) over a flat batch and the paged KV cache.

One call runs T tokens of many sequences at once (prefill chunks first, then decode tokens, as
``engine.attention`` lays them out); every layer's work is batched over T, and only attention looks
at sequence boundaries. Hyperparameters (``ModelConfig``), immutable weights (``ModelWeights``) and
the mutable KV cache (owned by the caller) are separate things.

Numerics match transformers' Llama/Qwen2/Mistral modules: RMSNorm in fp32 cast back before the weight
multiply, rotary cos/sin from fp32 angles (``engine.rope``), attention scale 1/sqrt(head_dim), the
lm_head matmul in the run dtype and only then widened to fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import AttentionBackend, AttentionMetadata
from engine.attention_backends import get_backend
from engine.config import ModelConfig
from engine.kernels.cpu_fused import FusedCpuOps, LayerOps, TorchLayerOps
from engine.kv_layout import torch_dtype
from engine.linear import Linear, make_linear, resolve
from engine.rope import RotaryTables
from engine.weights import LayerWeights, ModelWeights, load_weights


class Model:
    """A loaded checkpoint: ``forward`` over the paged cache, then ``compute_logits`` on the rows
    the caller wants to sample from (usually the last token of each sequence)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        attn_backend: str = "auto",
        device: str | torch.device = "cpu",
        linear_backend: str = "auto",
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = torch.device(device)
        self.dtype = torch_dtype(config.dtype)
        self.attn: AttentionBackend = get_backend(attn_backend, device)
        self.rope = RotaryTables.build(config, self.dtype, self.device)  # cached once per model
        self.scale = config.head_dim**-0.5
        self.linear_backend = resolve(linear_backend, self.dtype, self.device)
        self.layers = [_LayerLinears.build(w, self.linear_backend) for w in weights.layers]
        self.lm_head = make_linear(weights.lm_head, None, self.linear_backend)
        # the residual add + RMSNorm and rope + KV write: fused C with the CPU attention kernel (fp32),
        # transformers' torch expressions otherwise; both give the same floats
        self.ops: LayerOps = TorchLayerOps(self.rope, self.attn, config.head_dim)
        if getattr(self.attn, "kernel", False) and self.dtype == torch.float32 and self.device.type == "cpu":
            self.ops = FusedCpuOps.create(self.rope, config.head_dim) or self.ops

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions (T,) int64; kv_cache (L, N, 2, H_kv, B, D). Writes this step's K/V at
        ``meta.slot_mapping`` in every layer; returns the final-norm hidden states (T, hidden).

        ``on_layer(i)`` (optional) runs as soon as layer ``i``'s K/V are in ``kv_cache``, so a prefill
        worker can ship that layer while the next ones are computed."""
        c = self.config
        T, H, D, eps, ops = input_ids.shape[0], c.num_heads, c.head_dim, c.rms_norm_eps, self.ops
        x = F.embedding(input_ids, self.weights.embed)  # (T, hidden), a fresh tensor
        state = ops.prepare(positions, meta.slot_mapping, kv_cache.shape[1] * kv_cache.shape[4])  # N * B
        delta: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to x
        for i, (w, lin) in enumerate(zip(self.weights.layers, self.layers, strict=True)):
            # attention block
            x, h = ops.add_rms_norm(x, delta, w.input_norm, eps)  # (T, hidden) each
            q, k, v = lin.qkv(h)  # (T, H*D), (T, H_kv*D), (T, H_kv*D)
            q = ops.rope_write_kv(q, k, v, state, kv_cache[i])  # (T, H, D)
            if on_layer is not None:
                on_layer(i)
            o = self.attn.forward(q, kv_cache[i], meta, self.scale)  # (T, H, D)
            # SwiGLU MLP block
            x, h = ops.add_rms_norm(x, lin.o(o.reshape(T, H * D)), w.post_norm, eps)
            gate, up = lin.gate_up(h)  # (T, I) each, fresh outputs: in place is safe
            delta = lin.down(F.silu(gate, inplace=True).mul_(up))  # (T, hidden)
        return ops.add_rms_norm(x, delta, self.weights.norm, eps)[1]  # (T, hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, hidden) -> (S, vocab) fp32."""
        return self.lm_head(hidden).float()


@dataclass(slots=True)
class _LayerLinears:
    """One layer's projections as callables (engine.linear). With a packed backend (the C kernel or
    oneDNN), q/k/v are one matmul over the concatenated weights and so are gate/up: a decode step
    then streams each layer's weights in 4 calls instead of 7 (with oneDNN: 12.1 ms against 15.8 ms
    for the bench model's 8 layers at 16 rows), and every output element is the same dot product as
    before, bit for bit (checked in tests). The torch reference keeps transformers' separate
    F.linear calls."""

    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    o: Linear
    gate_up: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    down: Linear

    @classmethod
    def build(cls, w: LayerWeights, backend: str) -> _LayerLinears:
        o, down = make_linear(w.o_proj, w.o_bias, backend), make_linear(w.down_proj, None, backend)
        if backend == "torch":
            q, k, v = (make_linear(wt, b, backend) for wt, b in _qkv(w))
            gate, up = make_linear(w.gate_proj, None, backend), make_linear(w.up_proj, None, backend)
            return cls(lambda x: (q(x), k(x), v(x)), o, lambda x: (gate(x), up(x)), down)
        parts = _qkv(w)
        sizes = [wt.shape[0] for wt, _ in parts]
        bias = None
        if any(b is not None for _, b in parts):
            bias = torch.cat([b if b is not None else wt.new_zeros(wt.shape[0]) for wt, b in parts])
        qkv = make_linear(torch.cat([wt for wt, _ in parts]), bias, backend)
        inter = w.gate_proj.shape[0]
        gate_up = make_linear(torch.cat([w.gate_proj, w.up_proj]), None, backend)

        def split_qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            q, k, v = qkv(x).split(sizes, dim=-1)
            return q, k, v

        def split_gate_up(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = gate_up(x)
            return y[:, :inter], y[:, inter:]

        return cls(split_qkv, o, split_gate_up, down)


def _qkv(w: LayerWeights) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(w.q_proj, w.q_bias), (w.k_proj, w.k_bias), (w.v_proj, w.v_bias)]


def load_model(
    path: str | Path,
    dtype: str = "float32",
    attn_backend: str = "auto",
    device: str = "cpu",
    linear_backend: str = "auto",
) -> Model:
    """Parse the config, map the weights and build the model (no KV cache: the caller allocates it
    with ``model.config.kv_layout(block_size).allocate(num_blocks)``)."""
    config = ModelConfig.from_pretrained(path, dtype=dtype)
    weights = load_weights(path, config, device=device)
    return Model(config, weights, attn_backend=attn_backend, device=device, linear_backend=linear_backend)
