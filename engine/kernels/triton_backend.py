"""The Triton attention backend: the ``AttentionBackend`` seam of engine/attention.py over the
kernels of this package (``engine.attention_backends.get_backend("triton")``).

A flat batch is prefill chunks first, then decodes (see engine/attention.py); the two parts go to
two kernels that write disjoint rows of one output tensor::

    q rows:  [ prefill chunks ......... | dec0 | dec1 | ... ]
               _paged_prefill_kernel      _paged_decode_kernel
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, TorchAttention
from engine.kernels.kv_write import write_kv
from engine.kernels.paged_attention import (
    paged_decode_attention,
    paged_prefill_attention,
    runs_interpreted,
)


@dataclass(slots=True)
class TritonAttention:
    """Triton KV write + paged attention. ``triton_prefill=False`` sends prefill chunks to the torch
    reference instead (a fallback while the prefill kernel is not trusted on some hardware)."""

    triton_prefill: bool = True

    def __post_init__(self) -> None:
        if not runs_interpreted() and not torch.cuda.is_available():
            # otherwise the first launch fails with Triton's terse "0 active drivers"
            raise RuntimeError(
                "the triton attention backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before "
                "engine.kernels is first imported (CPU tensors, slow)"
            )

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        write_kv(k, v, kv_layer, slot_mapping)

    def forward(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if q.dtype != kv_layer.dtype:
            raise ValueError(f"query dtype {q.dtype} differs from the KV pool's {kv_layer.dtype}")
        out = torch.empty_like(q)  # (T, H_q, D)
        n_pre = meta.num_prefill_seqs
        if n_pre:
            if self.triton_prefill:
                paged_prefill_attention(
                    q,
                    kv_layer,
                    meta.block_tables,
                    meta.seq_lens,
                    meta.query_start_loc,
                    scale,
                    out,
                    num_seqs=n_pre,
                    max_query_len=max(meta.query_lens_list[:n_pre]),
                )
            else:
                out[: meta.num_prefill_tokens] = _torch_prefill(q, kv_layer, meta, scale)
        paged_decode_attention(
            q,
            kv_layer,
            meta.block_tables,
            meta.seq_lens,
            scale,
            out,
            num_seqs=meta.num_decode_seqs,
            token_offset=meta.num_prefill_tokens,
            seq_offset=n_pre,
        )
        return out


def _torch_prefill(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """The reference path on the prefill part only: rows [0, num_prefill_tokens)."""
    n_pre = meta.num_prefill_seqs
    t_pre = meta.num_prefill_tokens
    sub = AttentionMetadata(
        query_start_loc=meta.query_start_loc[: n_pre + 1],
        seq_lens=meta.seq_lens[:n_pre],
        block_tables=meta.block_tables[:n_pre],
        slot_mapping=meta.slot_mapping[:t_pre],
        query_lens_list=meta.query_lens_list[:n_pre],
        seq_lens_list=meta.seq_lens_list[:n_pre],
        num_prefill_seqs=n_pre,
        num_prefill_tokens=t_pre,
        block_size=meta.block_size,
    )
    return TorchAttention().forward(q[:t_pre], kv_layer, sub, scale)
