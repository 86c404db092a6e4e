"""A quantized KV cache: fp8 (e4m3) or int8 codes with one fp32 scale per row, and the attention
backend that writes and reads it.

A row is one token's K (or V) for one KV head: D values. It is stored as D one-byte codes followed
by its scale (engine/kv_layout.py draws the pool), where::

    scale = max|x| / QMAX         (QMAX: 448 for e4m3, 127 for int8; 0 for an all-zero row)
    code  = e4m3(x / scale)       or  clamp(round(x / scale), -127, 127)
    x'    = float(code) * scale   (the value attention reads)

Scales are per row (token and head) rather than per block: a row is quantized once, when its token
is written, from its own values only, so a block's bytes do not depend on how its tokens arrived
(a prefill chunk, token by token, a prefix-cache hit): the same tokens give the same bytes, which
the prefix cache (a block is found by its tokens' hash) and the disaggregated path (a prefill
worker writes what a colocated engine would) rely on. The scales cost 4 bytes per D codes (6% at
D = 64) and travel inside the blocks, under the same digests, to G2 / G3 and in every handoff.

Accuracy is the point here, not exactness: ``tandem bench kv-quant`` prints greedy agreement with
the fp32 cache and the mean KL divergence of next-token distributions, and
tests/integration/test_kv_quant.py bounds them.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.kv_layout import SCALE_BYTES

QMAX = {"fp8_e4m3": 448.0, "int8": 127.0}
_CODES = {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}


def quantize_rows(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (..., D) -> (..., D + 4) uint8 rows: codes, then the fp32 scale's bytes."""
    x32 = x.float()
    scale = x32.abs().amax(-1, keepdim=True) / QMAX[kind]  # (..., 1)
    y = x32 / torch.where(scale > 0, scale, torch.ones_like(scale))
    if kind == "int8":
        codes = y.round().clamp(-127, 127).to(torch.int8).view(torch.uint8)
    else:
        codes = y.clamp(-QMAX[kind], QMAX[kind]).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([codes, scale.contiguous().view(torch.uint8)], dim=-1)


def dequantize_rows(rows: torch.Tensor, kind: str) -> torch.Tensor:
    """(..., D + 4) uint8 rows -> (..., D) fp32: code * scale."""
    d = rows.shape[-1] - SCALE_BYTES
    codes = rows[..., :d].contiguous().view(_CODES[kind]).float()
    scale = rows[..., d:].contiguous().view(torch.float32)  # (..., 1)
    return codes * scale


@dataclasses.dataclass(slots=True)
class QuantizedKVAttention:
    """``AttentionBackend`` over a quantized pool (N, 2, H_kv, B, D + 4) uint8, around an fp32 one.

    ``write_kv`` quantizes each row. ``forward`` sends decode rows on a CPU to the C kernel that
    reads the codes in place (``cpu_paged_decode.c``, a block's rows dequantized at a time) when
    ``decode_kernel`` is set, and otherwise (prefill chunks, the torch reference, a GPU) dequantizes
    the blocks the batch reads into a compact fp32 pool and runs ``inner`` over it."""

    inner: AttentionBackend
    kind: str  # fp8_e4m3 | int8
    decode_kernel: bool = False
    kernel: bool = False  # never the fused fp32 CPU ops: the model keeps its torch layer ops

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """k, v (T, H_kv, D) into kv_layer (N, 2, H_kv, B, D + 4) at the flat slots (T,)."""
        block_size = kv_layer.shape[3]
        keep = slot_mapping >= 0  # a negative slot is padding: never written
        if not bool(keep.all()):
            slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size  # (T,)
        kv_layer[blocks, 0, :, offsets] = quantize_rows(k, self.kind)  # (T, H_kv, D + 4)
        kv_layer[blocks, 1, :, offsets] = quantize_rows(v, self.kind)

    def forward(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if (
            self.decode_kernel
            and meta.num_prefill_seqs == 0
            and q.dtype == torch.float32
            and q.device.type == "cpu"
        ):
            from engine.kernels.cpu_attention import paged_decode_quantized

            out = torch.empty_like(q)
            paged_decode_quantized(
                q.contiguous(),
                kv_layer,
                meta.block_tables,
                meta.seq_lens,
                meta.seq_lens_list,
                scale,
                out,
                self.kind,
            )
            return out
        compact, tables = self.dequantized_blocks(kv_layer, meta)
        return self.inner.forward(
            q, compact.to(q.dtype), dataclasses.replace(meta, block_tables=tables), scale
        )

    def dequantized_blocks(
        self, kv_layer: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks ``meta`` reads, dequantized (n, 2, H_kv, B, D) fp32, and the block tables
        renumbered into them."""
        ids = torch.unique(meta.block_tables.reshape(-1).long())  # (n,) sorted, padding's 0 included
        compact = dequantize_rows(kv_layer.index_select(0, ids), self.kind)  # (n, 2, H_kv, B, D)
        remap = torch.zeros(kv_layer.shape[0], dtype=torch.int32, device=kv_layer.device)
        remap[ids] = torch.arange(ids.numel(), dtype=torch.int32, device=kv_layer.device)
        return compact, remap[meta.block_tables.long()]
