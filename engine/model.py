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
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import AttentionBackend, AttentionMetadata, get_backend
from engine.config import ModelConfig
from engine.kv_layout import torch_dtype
from engine.rope import RotaryTables, apply_rotary
from engine.weights import ModelWeights, load_weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, cast back, *then* scale (matters in bf16)."""
    h = x.float()  # (T, hidden) fp32
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class Model:
    """A loaded checkpoint: ``forward`` over the paged cache, then ``compute_logits`` on the rows
    the caller wants to sample from (usually the last token of each sequence)."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        attn_backend: str = "torch",
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = torch.device(device)
        self.dtype = torch_dtype(config.dtype)
        self.attn: AttentionBackend = get_backend(attn_backend)
        self.rope = RotaryTables.build(config, self.dtype, self.device)  # cached once per model
        self.scale = config.head_dim**-0.5

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
        T = input_ids.shape[0]
        H, H_kv, D, eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        x = F.embedding(input_ids, self.weights.embed)  # (T, hidden)
        cos, sin = self.rope.lookup(positions)  # (T, 1, D) each
        for i, w in enumerate(self.weights.layers):
            # attention block
            h = rms_norm(x, w.input_norm, eps)  # (T, hidden)
            q = F.linear(h, w.q_proj, w.q_bias).view(T, H, D)  # (T, H, D)
            k = F.linear(h, w.k_proj, w.k_bias).view(T, H_kv, D)  # (T, H_kv, D)
            v = F.linear(h, w.v_proj, w.v_bias).view(T, H_kv, D)  # (T, H_kv, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            self.attn.write_kv(k, v, kv_cache[i], meta.slot_mapping)
            if on_layer is not None:
                on_layer(i)
            o = self.attn.forward(q, kv_cache[i], meta, self.scale)  # (T, H, D)
            x = x + F.linear(o.reshape(T, H * D), w.o_proj, w.o_bias)  # (T, hidden)
            # SwiGLU MLP block
            h = rms_norm(x, w.post_norm, eps)  # (T, hidden)
            gated = F.silu(F.linear(h, w.gate_proj)) * F.linear(h, w.up_proj)  # (T, I)
            x = x + F.linear(gated, w.down_proj)  # (T, hidden)
        return rms_norm(x, self.weights.norm, eps)  # (T, hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, hidden) -> (S, vocab) fp32."""
        return F.linear(hidden, self.weights.lm_head).float()


def load_model(
    path: str | Path, dtype: str = "float32", attn_backend: str = "torch", device: str = "cpu"
) -> Model:
    """Parse the config, map the weights and build the model (no KV cache: the caller allocates it
    with ``model.config.kv_layout(block_size).allocate(num_blocks)``)."""
    config = ModelConfig.from_pretrained(path, dtype=dtype)
    return Model(config, load_weights(path, config, device=device), attn_backend=attn_backend, device=device)
