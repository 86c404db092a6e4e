"""Paged attention over a flat batch that mixes prefill chunks and decode tokens.

The flat batch holds T query tokens of S sequences, prefill chunks first, then decodes (sequences
whose query is one token)::

    tokens:  [ seq0 chunk (q0 tokens) | seq1 chunk (q1) | ... | dec0 | dec1 | ... ]
    query_start_loc: [0, q0, q0+q1, ..., T]
    seq_lens[i]:     context length of seq i *including* this step's tokens

A query token at absolute position p of seq i attends to that sequence's keys 0..p, read from its
blocks. This module owns the metadata type, the torch reference path, and the backend seam; the
C and Triton kernels (``engine.kernels.cpu_attention``, ``engine.kernels.triton_backend``)
implement the same two functions and are checked against this reference. A leaf: it imports no
kernel; ``engine.attention_backends.get_backend`` picks one by name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # (S+1,) int32, cumulative query lengths
    seq_lens: torch.Tensor  # (S,) int32, context length after this step
    block_tables: torch.Tensor  # (S, max_blocks) int32, padded with 0
    slot_mapping: torch.Tensor  # (T,) int64, flat slot (block_id * B + offset) of each new token
    query_lens_list: list[int]  # host copies, so the reference path never syncs
    seq_lens_list: list[int]
    num_prefill_seqs: int  # sequences [0, num_prefill_seqs) are prefill chunks
    num_prefill_tokens: int  # tokens [0, num_prefill_tokens) belong to them
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def num_decode_seqs(self) -> int:
        return self.num_seqs - self.num_prefill_seqs

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: str | torch.device = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences given prefill-first. Slots are derived from the block tables:
        seq i's new tokens sit at positions seq_lens[i]-query_lens[i] .. seq_lens[i]-1."""
        num_prefill = 0
        while num_prefill < len(query_lens) and query_lens[num_prefill] > 1:
            num_prefill += 1
        if any(q != 1 for q in query_lens[num_prefill:]):
            raise ValueError("prefill chunks (query length > 1) must come before decodes")
        starts = [0]
        slots: list[int] = []
        for q, n, table in zip(query_lens, seq_lens, block_tables, strict=True):
            starts.append(starts[-1] + q)
            for pos in range(n - q, n):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(-1, width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_lens_list=list(query_lens),
            seq_lens_list=list(seq_lens),
            num_prefill_seqs=num_prefill,
            num_prefill_tokens=starts[num_prefill],
            block_size=block_size,
        )


def as_decode_queries(meta: AttentionMetadata) -> AttentionMetadata:
    """The same step with every query token as its own one-token sequence: token ``p`` of a chunk
    attends to positions ``0 .. p`` of its sequence's blocks (the chunk's K/V are written before
    attention reads them). A decode attention kernel then computes a prefill chunk causally, each
    token exactly as it would be computed decoded alone, whatever the chunking."""
    if meta.num_prefill_seqs == 0:
        return meta
    qlens = meta.query_lens_list
    seq_lens = [n - q + 1 + i for q, n in zip(qlens, meta.seq_lens_list, strict=True) for i in range(q)]
    dev = meta.block_tables.device
    index = torch.repeat_interleave(torch.arange(len(qlens), device=dev), torch.tensor(qlens, device=dev))
    T = len(seq_lens)
    return AttentionMetadata(
        query_start_loc=torch.arange(T + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=meta.block_tables.index_select(0, index),  # (T, max_blocks)
        slot_mapping=meta.slot_mapping,
        query_lens_list=[1] * T,
        seq_lens_list=seq_lens,
        num_prefill_seqs=0,
        num_prefill_tokens=0,
        block_size=meta.block_size,
    )


class AttentionBackend(Protocol):
    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Store k, v (T, H_kv, D) into kv_layer (N, 2, H_kv, B, D) at the flat slots (T,)."""
        ...

    def forward(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """q (T, H_q, D) against the paged context -> (T, H_q, D). KV of this step already written."""
        ...


class TorchAttention:
    """The reference path: gathers each sequence's blocks and calls SDPA (GQA-aware)."""

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        block_size = kv_layer.shape[3]
        keep = slot_mapping >= 0  # a negative slot is padding: never written
        if not bool(keep.all()):
            slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
        blocks = slot_mapping // block_size  # (T,)
        offsets = slot_mapping % block_size  # (T,)
        kv_layer[blocks, 0, :, offsets] = k.to(kv_layer.dtype)  # advanced dims first: (T, H_kv, D)
        kv_layer[blocks, 1, :, offsets] = v.to(kv_layer.dtype)

    def forward(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        block_size = meta.block_size
        starts = list(itertools.accumulate(meta.query_lens_list[: meta.num_prefill_seqs], initial=0))
        for i in range(meta.num_prefill_seqs):
            s, e = starts[i], starts[i + 1]
            ctx = meta.seq_lens_list[i]
            k, v = _gather(kv_layer, meta.block_tables[i : i + 1], -(-ctx // block_size))
            k, v = k[:, :, :ctx], v[:, :, :ctx]  # (1, H_kv, ctx, D)
            qi = q[s:e].transpose(0, 1).unsqueeze(0)  # (1, H_q, q_len, D)
            q_len = e - s
            if q_len == ctx:  # the whole context is this chunk: plain causal (same result, no mask)
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:
                # query j sits at absolute position ctx - q_len + j and sees keys 0..that position
                q_pos = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
                mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= q_pos  # (q_len, ctx)
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        if meta.num_decode_seqs:
            self._decode(q, kv_layer, meta, scale, out)
        return out

    def _decode(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Decode rows, batched: sequences of similar context length share one padded SDPA call, so
        one long context does not make every short one pay for its length."""
        first, t0, block_size = meta.num_prefill_seqs, meta.num_prefill_tokens, meta.block_size
        lens = meta.seq_lens_list[first:]
        rows: slice | torch.Tensor
        for group in _length_groups(lens):
            nb = -(-lens[group[0]] // block_size)  # the group's longest context, in blocks
            if len(group) == len(lens):  # one group: plain slices, no index tensors
                tables, seq_lens, rows = meta.block_tables[first:], meta.seq_lens[first:], slice(t0, None)
            else:
                idx = torch.tensor(group, dtype=torch.int64, device=q.device)
                tables, seq_lens, rows = meta.block_tables[first + idx], meta.seq_lens[first + idx], t0 + idx
            if q.dtype == torch.float32:
                out[rows] = _decode_group(q[rows], kv_layer, tables, seq_lens, nb, scale)
            else:  # bf16 / fp16: SDPA's kernel, whose rounding the reference shares
                k, v = _gather(kv_layer, tables, nb)  # (S_g, H_kv, nb*B, D)
                valid = torch.arange(nb * block_size, device=q.device).unsqueeze(0) < seq_lens.unsqueeze(1)
                qd = q[rows].view(k.shape[0], k.shape[1], -1, q.shape[-1])  # (S_g, H_kv, group, D)
                o = F.scaled_dot_product_attention(qd, k, v, attn_mask=valid[:, None, None, :], scale=scale)
                out[rows] = o.reshape(k.shape[0], -1, q.shape[-1])  # (S_g, H_q, D)


def _decode_group(
    q: torch.Tensor,  # (S, H_q, D)
    kv_layer: torch.Tensor,  # (N, 2, H_kv, B, D)
    tables: torch.Tensor,  # (S, >= nb) block ids
    seq_lens: torch.Tensor,  # (S,)
    nb: int,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its first ``nb`` blocks, without laying the blocks of a
    head side by side: scores are taken block by block (a batched matmul over (S, nb, H_kv)) and
    the softmax runs over all of a sequence's blocks at once. The only copy of K/V is the gather
    of whole blocks. GQA without expanding K/V: query heads h*g .. h*g+g-1 read KV head h, as in
    transformers' repeat_kv. fp32 only: in bf16 its rounding differs from SDPA's kernel."""
    s, _, d = q.shape
    _, _, h, b, _ = kv_layer.shape
    ids = tables[:, :nb].reshape(-1).long()  # (S*nb,)
    k = kv_layer[:, 0].index_select(0, ids).view(s, nb, h, b, d)  # (S, nb, H_kv, B, D)
    v = kv_layer[:, 1].index_select(0, ids).view(s, nb, h, b, d)
    qg = q.view(s, 1, h, -1, d)  # (S, 1, H_kv, g, D)
    g = qg.shape[3]
    scores = torch.matmul(qg.expand(s, nb, h, g, d), k.transpose(-1, -2)) * scale  # (S, nb, H_kv, g, B)
    scores = scores.permute(0, 2, 3, 1, 4).reshape(s, h, g, nb * b)  # (S, H_kv, g, nb*B)
    valid = torch.arange(nb * b, device=q.device).unsqueeze(0) < seq_lens.unsqueeze(1)  # (S, nb*B)
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    probs = probs.view(s, h, g, nb, b).permute(0, 3, 1, 2, 4)  # (S, nb, H_kv, g, B)
    return torch.matmul(probs, v).sum(1).reshape(s, -1, d)  # (S, H_q, D)


def _length_groups(lens: list[int], slack: float = 1.3) -> list[list[int]]:
    """Split indices into groups, longest first, such that padding every member of a group to its
    longest context costs at most ``slack`` times the group's real context tokens."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lens)), key=lambda j: -lens[j]):
        if groups and lens[groups[-1][0]] * (len(groups[-1]) + 1) <= slack * (total + lens[i]):
            groups[-1].append(i)
            total += lens[i]
        else:
            groups.append([i])
            total = lens[i]
    return groups


def _gather(
    kv_layer: torch.Tensor, block_tables: torch.Tensor, num_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``num_blocks`` blocks of each table, (S, H_kv, num_blocks*B, D).

    ``index_select`` of whole blocks copies contiguous (H_kv, B, D) pieces; the reshape that puts
    the blocks of one head side by side is the only other copy (about 2.5x faster on CPU than
    advanced indexing of the 6-d pool)."""
    ids = block_tables[:, :num_blocks].reshape(-1).long()  # (S*nb,)
    s, nb = block_tables.shape[0], num_blocks
    _, _, h, b, d = kv_layer.shape

    def one(kind: int) -> torch.Tensor:
        blocks = kv_layer[:, kind].index_select(0, ids).view(s, nb, h, b, d)
        return blocks.permute(0, 2, 1, 3, 4).reshape(s, h, nb * b, d)

    return one(0), one(1)
