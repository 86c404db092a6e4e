"""Byte-level access to a KV pool tensor for the transports: regions, digests, pack and scatter.

The pool is engine/kv_layout.py's one tensor per worker, ``(L, N, planes, H_kv, B, D)`` (planes: K
and V, or one latent), contiguous and layer-major. Everything here works on its flat byte view, so
a region is ``(offset, length)``.
On CPU the digest is protocol.digest (xxh3-64) over the regions (streamed, no copy).
On a GPU it is a device-side checksum (sum and position-weighted sum of int32 words, finished with
protocol.digest on the host) so the bytes never leave the device.
A CPU pool is backed by transparent huge pages as soon as a transport sees it (``huge_pages``):
UCX's shared-memory copies (CMA) pin pages, and 4 KiB pages cost a third of their bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kv_layout import dtype_name, huge_pages
from kv_transfer import protocol


class PoolView:
    def __init__(self, kv: torch.Tensor) -> None:
        if kv.dim() != 6 or not kv.is_contiguous():
            raise ValueError(
                f"KV pool must be a contiguous (L, N, planes, H_kv, B, D) tensor, got {tuple(kv.shape)}"
            )
        self.kv = kv  # (L, N, planes, H_kv, B, D)
        self.num_layers, self.num_blocks = kv.shape[0], kv.shape[1]
        self.block_shape: tuple[int, int, int, int] = tuple(kv.shape[2:])  # type: ignore[assignment]
        self.dtype = dtype_name(kv.dtype)
        self.layer_block_bytes = kv[0, 0].numel() * kv.element_size()
        self.nbytes = kv.numel() * kv.element_size()
        self.base_addr = kv.data_ptr()
        self.is_cuda = kv.is_cuda
        self.device_id = (kv.device.index or 0) if kv.is_cuda else 0
        self.mem_type = "VRAM" if kv.is_cuda else "DRAM"
        self.flat = kv.view(torch.uint8).reshape(-1)  # (nbytes,)
        self.np_flat = None if kv.is_cuda else self.flat.numpy()
        if not kv.is_cuda:
            huge_pages(self.base_addr, self.nbytes)

    @property
    def num_heads(self) -> int:
        return self.block_shape[1]

    def regions(
        self, layers: range, block_ids: Sequence[int], heads: tuple[int, int] | None = None
    ) -> list[tuple[int, int]]:
        """(offset, length) of each (layer, run of consecutive blocks), in payload order; with
        ``heads`` (first, count) short of all of them, of each (layer, block, K/V) head slice."""
        if heads is None or heads == (0, self.num_heads):
            runs = protocol.coalesce(block_ids)
            return protocol.regions(layers, runs, self.num_blocks, self.layer_block_bytes)
        if heads[0] < 0 or heads[1] < 1 or heads[0] + heads[1] > self.num_heads:
            raise ValueError(f"heads {heads[0]}+{heads[1]} outside the pool's {self.num_heads}")
        return protocol.head_regions(
            layers,
            block_ids,
            heads,
            self.num_heads,
            self.num_blocks,
            self.layer_block_bytes,
            self.block_shape[0],
        )

    def digest(self, regions: Sequence[tuple[int, int]]) -> int:
        if self.np_flat is not None:
            return protocol.digest(self.np_flat[o : o + n] for o, n in regions)
        return device_digest([self.flat[o : o + n] for o, n in regions])

    def pack(self, regions: Sequence[tuple[int, int]], out: torch.Tensor) -> None:
        """Copy the regions, in order, into the front of ``out`` (uint8, same device)."""
        pos = 0
        if self.np_flat is not None:  # numpy: one plain memcpy per region, no intra-op threads
            dst = out.numpy()
            for o, n in regions:
                dst[pos : pos + n] = self.np_flat[o : o + n]
                pos += n
            return
        for o, n in regions:
            out[pos : pos + n].copy_(self.flat[o : o + n])
            pos += n

    def scatter(self, regions: Sequence[tuple[int, int]], src: torch.Tensor) -> None:
        """Copy ``src`` (uint8, packed in region order) into the regions."""
        pos = 0
        if self.np_flat is not None:
            s = src.numpy()
            for o, n in regions:
                self.np_flat[o : o + n] = s[pos : pos + n]
                pos += n
            return
        for o, n in regions:
            self.flat[o : o + n].copy_(src[pos : pos + n])
            pos += n


def tensor_digest(buf: torch.Tensor) -> int:
    """Digest of a packed uint8 buffer, equal to PoolView.digest of the regions it was packed from."""
    if buf.is_cuda:
        return device_digest([buf])
    return protocol.digest([buf.numpy()])


def device_digest(pieces: Sequence[torch.Tensor]) -> int:
    """Checksum of uint8 device tensors taken as one byte stream: independent of how it is cut, as
    long as every piece is a multiple of 4 bytes (a KV block always is)."""
    sums = []
    pos = 0
    for p in pieces:
        words = p.view(torch.int32).to(torch.int64)  # (n / 4,)
        idx = torch.arange(pos, pos + words.numel(), device=p.device, dtype=torch.int64) % 65521 + 1
        sums.append(torch.stack([words.sum(), (words * idx).sum()]))
        pos += words.numel()
    total = torch.stack(sums).sum(0).cpu().numpy().tobytes() if sums else b""
    return protocol.digest([total])
