"""The seam between the tier store and G1: read a device block out, write one in, by block id.

memory_tiers owns no G1 allocator: the engine's BlockManager decides which device block ids are
free, used or cached. The tier store only copies a block's bytes, all layers at once::

    kv: (L, N, 2, H_kv, B, D)      kv[:, block_id]: (L, 2, H_kv, B, D), block_bytes bytes

One ``copy_`` per block (strided over the layers), never a Python loop over layers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from engine.kv_layout import KVLayout


class DevicePool(Protocol):
    layout: KVLayout

    def read_block(self, block_id: int, out: torch.Tensor) -> None:
        """Copy G1 block ``block_id`` into ``out`` (L, 2, H_kv, B, D); done when this returns."""

    def write_block(self, block_id: int, src: torch.Tensor) -> None:
        """Copy ``src`` (L, 2, H_kv, B, D) into G1 block ``block_id``; done when this returns."""


class TorchDevicePool:
    """DevicePool over the engine's KV tensor (CPU on this box, CUDA where there is one)."""

    def __init__(self, kv: torch.Tensor, layout: KVLayout) -> None:
        assert kv.dim() == 6 and kv.shape[0] == layout.num_layers, "kv is (L, N, 2, H_kv, B, D)"
        assert kv[:, 0].shape == block_shape(layout), f"kv {tuple(kv.shape)} does not match {layout}"
        self.kv = kv
        self.layout = layout
        # Views made once: indexing a tensor costs microseconds, a list lookup nothing.
        self._blocks = list(kv.unbind(1))  # N x (L, 2, H_kv, B, D)

    def read_block(self, block_id: int, out: torch.Tensor) -> None:
        out.copy_(self._blocks[block_id])  # synchronous: the host copy is used next

    def write_block(self, block_id: int, src: torch.Tensor) -> None:
        # Synchronous even from pinned memory: the source slot may be reused as soon as we return.
        self._blocks[block_id].copy_(src)


def block_shape(layout: KVLayout) -> tuple[int, int, int, int, int]:
    """Shape of one block across all layers: (L, 2, H_kv, B, D)."""
    return (layout.num_layers, 2, layout.num_kv_heads, layout.block_size, layout.head_dim)
