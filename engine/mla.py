"""Multi-head latent attention (DeepSeek-V3): its weights, their loading, and its forward over a paged
cache that holds the compressed latent instead of per-head K and V.

Per token and layer the cache keeps ``kv_lora_rank + qk_rope_head_dim`` numbers (engine/kv_layout.py,
a latent layout): ``c``, the RMS-normed compression of the hidden state, and ``k_rot``, the one rope
key every head shares. Per head h, ``kv_b_proj`` expands ``c`` into ``k_nope[h] = W_UK[h] c`` and
``v[h] = W_UV[h] c``; the key is ``[k_nope[h], k_rot]``::

    h (T, hidden) ─ q_a ─ norm ─ q_b ─▶ q (T, H, nope + rope) ─ rope on the rope part
                  └ kv_a ─▶ [c (r) | k_rot (rope)] ─ norm c, rope k_rot ─▶ cache slot (r + rope)

- Prefill chunks *decompress*: their context's latents go through ``kv_b_proj`` to per-head K and
  V, and attention runs as usual (SDPA, causal) — the same arithmetic as transformers.
- Decode tokens attend *in the latent space*: ``q_nope[h] . k_nope[h][t] = (W_UK[h]^T q_nope[h]) .
  c[t]``, so the query absorbs W_UK and attends over the cached latents directly (one 'KV head' of
  ``r + rope`` shared by all query heads, values = the first r numbers), and the output absorbs
  W_UV: ``o[h] = W_UV[h] (sum_t p[h, t] c[t])``. Nothing per head is ever read from the cache.

Tensor parallel: each rank computes its query heads (rows of q_b / kv_b, columns of o_proj); the
latent is the same on every rank (kv_a is replicated), so each rank's pool holds all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.arch import MLAConfig
from engine.attention import AttentionMetadata
from engine.kernels.cpu_fused import rms_norm
from engine.linear import make_linear
from engine.rope import RotaryTables

Take = Callable[[str, tuple[int, ...]], torch.Tensor]
Maybe = Callable[[str, tuple[int, ...], bool], "torch.Tensor | None"]


@dataclass(frozen=True, slots=True)
class MLAWeights:
    q_a_proj: torch.Tensor | None  # (q_lora, hidden); None: q_proj
    q_a_bias: torch.Tensor | None  # (q_lora,)
    q_a_norm: torch.Tensor | None  # (q_lora,)
    q_b_proj: torch.Tensor | None  # (H * qk_head, q_lora)
    q_proj: torch.Tensor | None  # (H * qk_head, hidden) when there is no q_lora_rank
    kv_a_proj: torch.Tensor  # (r + rope, hidden)
    kv_a_bias: torch.Tensor | None  # (r + rope,)
    kv_a_norm: torch.Tensor  # (r,)
    kv_b_proj: torch.Tensor  # (H * (nope + v), r)
    o_proj: torch.Tensor  # (hidden, H * v)
    o_bias: torch.Tensor | None  # (hidden,)


def load_mla_weights(
    take: Take, maybe: Maybe, prefix: str, m: MLAConfig, heads: int, hidden: int, bias: bool
) -> MLAWeights:
    p = prefix + "self_attn."
    q = m.q_lora_rank
    qk, lat = heads * m.qk_head_dim, m.latent_dim
    return MLAWeights(
        q_a_proj=None if q is None else take(p + "q_a_proj.weight", (q, hidden)),
        q_a_bias=None if q is None else maybe(p + "q_a_proj.bias", (q,), bias),
        q_a_norm=None if q is None else take(p + "q_a_layernorm.weight", (q,)),
        q_b_proj=None if q is None else take(p + "q_b_proj.weight", (qk, q)),
        q_proj=take(p + "q_proj.weight", (qk, hidden)) if q is None else None,
        kv_a_proj=take(p + "kv_a_proj_with_mqa.weight", (lat, hidden)),
        kv_a_bias=maybe(p + "kv_a_proj_with_mqa.bias", (lat,), bias),
        kv_a_norm=take(p + "kv_a_layernorm.weight", (m.kv_lora_rank,)),
        kv_b_proj=take(p + "kv_b_proj.weight", (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)),
        o_proj=take(p + "o_proj.weight", (hidden, heads * m.v_head_dim)),
        o_bias=maybe(p + "o_proj.bias", (hidden,), False),
    )


def shard_mla(w: MLAWeights, m: MLAConfig, heads: range, rank: int) -> MLAWeights:
    """Rank's share: its query heads' rows of q_b (q_proj) and kv_b, columns of o_proj."""
    qk, kv = m.qk_head_dim, m.qk_nope_head_dim + m.v_head_dim
    q_rows = slice(heads.start * qk, heads.stop * qk)

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[q_rows]

    return MLAWeights(
        q_a_proj=w.q_a_proj,
        q_a_bias=w.q_a_bias,
        q_a_norm=w.q_a_norm,
        q_b_proj=rows(w.q_b_proj),
        q_proj=rows(w.q_proj),
        kv_a_proj=w.kv_a_proj,
        kv_a_bias=w.kv_a_bias,
        kv_a_norm=w.kv_a_norm,
        kv_b_proj=w.kv_b_proj[heads.start * kv : heads.stop * kv],
        o_proj=w.o_proj[:, heads.start * m.v_head_dim : heads.stop * m.v_head_dim].contiguous(),
        o_bias=w.o_bias if rank == 0 else None,  # added once by the all-reduce
    )


class LatentAttention:
    """One layer's MLA over ``heads`` local query heads; ``write`` then ``attend`` (engine/blocks.py)."""

    def __init__(
        self,
        w: MLAWeights,
        m: MLAConfig,
        heads: int,
        eps: float,
        scale: float,
        rope: RotaryTables,
        backend: str,
        all_reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.m, self.heads, self.eps, self.scale, self.rope = m, heads, eps, scale, rope
        self.w, self.all_reduce = w, all_reduce
        self.q_a = None if w.q_a_proj is None else make_linear(w.q_a_proj, w.q_a_bias, backend)
        q_b = w.q_b_proj if w.q_b_proj is not None else w.q_proj
        assert q_b is not None
        self.q_b = make_linear(q_b, None, backend)
        self.kv_a = make_linear(w.kv_a_proj, w.kv_a_bias, backend)
        self.kv_b = make_linear(w.kv_b_proj, None, backend)
        self.o = make_linear(w.o_proj, w.o_bias, backend)
        nope, v, r = m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank
        kv_b = w.kv_b_proj.view(heads, nope + v, r)
        self.w_uk = kv_b[:, :nope].contiguous()  # (H, nope, r): absorbed into the query
        self.w_uv_t = kv_b[:, nope:].transpose(1, 2).contiguous()  # (H, r, v): absorbed into the output
        self.kernels: tuple[Any, Any] | None = None  # the C decode path (fp32 CPU, the C GEMM backend)
        if backend == "cpu":
            from engine.kernels.cpu_mla import GroupedGemm, cpu_mla_available

            if cpu_mla_available():  # per head: y = q_nope @ W_UK[h] and o = o_lat @ W_UV[h]^T
                uk = GroupedGemm([self.w_uk[h].t() for h in range(heads)])
                uv = GroupedGemm([kv_b[h, nope:] for h in range(heads)])
                self.kernels = (uk, uv)

    def write(self, h: torch.Tensor, step: Any, kv_layer: torch.Tensor) -> torch.Tensor:
        """Project h (T, hidden), store each token's latent at its slot (``step``: engine/blocks.py's
        StepState); returns the query (T, H, qk)."""
        m, t, positions, slots = self.m, h.shape[0], step.positions, step.slots
        qa = h
        if self.q_a is not None and self.w.q_a_norm is not None:
            qa = rms_norm(self.q_a(h), self.w.q_a_norm, self.eps)
        q = self.q_b(qa).view(t, self.heads, m.qk_head_dim)  # (T, H, nope + rope)
        ckv = self.kv_a(h)  # (T, r + rope)
        c = rms_norm(ckv[:, : m.kv_lora_rank], self.w.kv_a_norm, self.eps)  # (T, r)
        cos, sin = self.rope.cos[positions], self.rope.sin[positions]  # (T, rope/2) each
        q_rot = self._rotate(q[..., m.qk_nope_head_dim :], cos[:, None], sin[:, None])  # (T, H, rope)
        k_rot = self._rotate(ckv[:, m.kv_lora_rank :], cos, sin)  # (T, rope)
        keep = slots >= 0  # a negative slot is padding: never written
        lat = torch.cat([c, k_rot], dim=-1)[keep]  # (T', r + rope)
        b = kv_layer.shape[3]
        kv_layer[slots[keep] // b, 0, 0, slots[keep] % b] = lat.to(kv_layer.dtype)
        return torch.cat([q[..., : m.qk_nope_head_dim], q_rot], dim=-1)  # (T, H, qk)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """transformers' rope of the rope dims: interleaved pairs (DeepSeek's layout) or halves.
        cos / sin broadcast against x (..., rope/2)."""
        if self.m.rope_interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (T, H, qk) against the paged latents -> the layer's output (T, hidden), summed over ranks."""
        m, t = self.m, q.shape[0]
        out = q.new_empty(t, self.heads, m.v_head_dim)  # (T, H, v)
        lat = kv_layer[:, 0, 0]  # (N, B, r + rope)
        starts = meta.query_start_loc.tolist() if meta.num_prefill_seqs else []
        for i in range(meta.num_prefill_seqs):
            s, e = starts[i], starts[i + 1]
            out[s:e] = self._prefill(q[s:e], lat, meta.block_tables[i], meta.seq_lens_list[i])
        if meta.num_decode_seqs:
            first, t0 = meta.num_prefill_seqs, meta.num_prefill_tokens
            out[t0:] = self._decode(
                q[t0:], lat, meta.block_tables[first:], meta.seq_lens[first:], meta.seq_lens_list[first:]
            )
        return self.all_reduce(self.o(out.view(t, -1)))

    def _prefill(self, q: torch.Tensor, lat: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
        """Decompress: q (n, H, qk) against its sequence's first ``ctx`` latents -> (n, H, v)."""
        m, n, b = self.m, q.shape[0], lat.shape[1]
        ctx_lat = lat.index_select(0, table[: -(-ctx // b)].long()).reshape(-1, m.latent_dim)[:ctx]
        kv = self.kv_b(ctx_lat[:, : m.kv_lora_rank].contiguous()).view(
            ctx, self.heads, -1
        )  # (ctx, H, nope + v)
        k = torch.cat(
            [kv[..., : m.qk_nope_head_dim], ctx_lat[:, None, m.kv_lora_rank :].expand(ctx, self.heads, -1)],
            dim=-1,
        )  # (ctx, H, qk)
        qi, ki, vi = (
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            kv[..., m.qk_nope_head_dim :].transpose(0, 1)[None],
        )
        if n == ctx:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.scale)
        else:  # query j sits at position ctx - n + j and sees keys 0..that position
            q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos  # (n, ctx)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale)
        return o[0].transpose(0, 1)  # (n, H, v)

    def _decode(
        self,
        q: torch.Tensor,
        lat: torch.Tensor,
        tables: torch.Tensor,
        seq_lens: torch.Tensor,
        lens: list[int],
    ) -> torch.Tensor:
        """Absorbed: q (S, H, qk), one token per sequence -> (S, H, v), never leaving the latent space."""
        m, s, b = self.m, q.shape[0], lat.shape[1]
        if self.kernels is not None:  # in C, each (sequence, head) alike whatever shares the step
            from engine.kernels.cpu_mla import mla_decode

            uk, uv = self.kernels
            q_lat = uk(q)  # (H, S, r) from each head's first nope values
            qa = torch.cat([q_lat.transpose(0, 1), q[..., m.qk_nope_head_dim :]], dim=-1)  # (S, H, r + rope)
            o_lat = mla_decode(qa.contiguous(), lat, tables, seq_lens, lens, m.kv_lora_rank, self.scale)
            return uv(o_lat).transpose(0, 1)  # (S, H, v)
        q_lat = torch.bmm(q[..., : m.qk_nope_head_dim].transpose(0, 1), self.w_uk)  # (H, S, r)
        qa = torch.cat([q_lat.transpose(0, 1), q[..., m.qk_nope_head_dim :]], dim=-1)  # (S, H, r + rope)
        nb = -(-int(seq_lens.max()) // b)
        ctx = lat.index_select(0, tables[:, :nb].reshape(-1).long()).view(s, nb * b, m.latent_dim)
        scores = torch.matmul(qa, ctx.transpose(1, 2)) * self.scale  # (S, H, nb*B)
        valid = torch.arange(nb * b, device=q.device)[None, :] < seq_lens[:, None]  # (S, nb*B)
        probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
        o_lat = torch.matmul(probs, ctx[..., : m.kv_lora_rank])  # (S, H, r)
        return torch.bmm(o_lat.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # (S, H, v)
