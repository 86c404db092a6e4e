"""The seam between the tier store and G1: read a device block out, write one in, by block id.

memory_tiers owns no G1 allocator: the engine's BlockManager decides which device block ids are
free, used or cached. The tier store only copies a block's bytes, all layers at once::

    kv: (L, N, 2, H_kv, B, D)      kv[:, block_id]: (L, 2, H_kv, B, D), block_bytes bytes

One ``copy_`` per block (strided over the layers), never a Python loop over layers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
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
        # On a CPU, numpy copies the L strided pieces of a block single-threaded at memcpy speed;
        # torch's copy_ of the same view went through its OpenMP pool, 5-50x slower on a busy
        # 2-core box (measured: 125 blocks 17 ms vs 88-957 ms). Bytes, so every dtype copies alike.
        self._np = [_np_bytes(b) for b in self._blocks] if kv.device.type == "cpu" else None

    def read_block(self, block_id: int, out: torch.Tensor) -> None:
        if self._np is not None and out.device.type == "cpu":
            np.copyto(_np_bytes(out), self._np[block_id])
        else:
            out.copy_(self._blocks[block_id])  # synchronous: the host copy is used next

    def write_block(self, block_id: int, src: torch.Tensor) -> None:
        # Synchronous even from pinned memory: the source slot may be reused as soon as we return.
        if self._np is not None and src.device.type == "cpu":
            np.copyto(self._np[block_id], _np_bytes(src))
        else:
            self._blocks[block_id].copy_(src)


def _np_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a numpy view (the last dim must be contiguous; it becomes bytes)."""
    return t.view(torch.uint8).numpy()


def block_shape(layout: KVLayout) -> tuple[int, int, int, int, int]:
    """Shape of one block across all layers: (L, planes, H_kv, B, row) (planes: K and V, or a latent;
    row: D values, or D + 4 bytes of codes and a scale in a quantized KV pool)."""
    return (layout.num_layers, layout.planes, layout.num_kv_heads, layout.block_size, layout.row_size)
