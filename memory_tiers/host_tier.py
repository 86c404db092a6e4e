"""G2 memory: one preallocated host tensor of block slots, page-aligned (pinned when a GPU exists).

    host: (N2, L, 2, H_kv, B, D)       host[slot]: one block across all layers, block_bytes bytes

Which slot holds what is :class:`~memory_tiers.slot_index.SlotIndex`'s business; this module only
owns the bytes. Slots are page-aligned when ``block_bytes`` is a multiple of 4096 so the disk tier
can write and read them with O_DIRECT, straight from and into the slot (no staging copy).
"""

from __future__ import annotations

import mmap
from typing import Any

import torch

from engine.kv_layout import KVLayout
from memory_tiers.device_pool import block_shape

PAGE = 4096


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned, zeroed, writable anonymous memory (O_DIRECT needs aligned buffers)."""
    return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def aligned_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A page-aligned CPU tensor and the mmap that backs it (keep the mmap alive with the tensor)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize
    for n in shape:
        nbytes *= n
    buf = aligned_buffer(nbytes)
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape), buf


def as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as a flat memoryview (no copy)."""
    arr: Any = t.view(torch.uint8).numpy()
    return memoryview(arr).cast("B")


def _cuda_register(t: torch.Tensor) -> bool:
    """Page-lock an existing CPU tensor with cudaHostRegister (exact size, stays page-aligned)."""
    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        return int(rc) == 0
    except Exception:  # no CUDA runtime binding: fall back to torch's pinned allocator
        return False


class HostPool:
    """The G2 tensor. ``pin`` asks for CUDA page-locked memory (only meaningful with a GPU)."""

    def __init__(self, layout: KVLayout, num_slots: int, pin: bool | None = None) -> None:
        self.layout = layout
        self.num_slots = num_slots
        shape = (num_slots, *block_shape(layout))
        if pin is None:
            pin = torch.cuda.is_available()
        self._mmap: mmap.mmap | None
        self.tensor, self._mmap = aligned_tensor(shape, layout.torch_dtype)
        self._registered = pin and _cuda_register(self.tensor)
        if pin and not self._registered:
            # torch's pinned allocator rounds sizes up to a power of two, hence the attempt above.
            self._mmap = None
            self.tensor = torch.empty(shape, dtype=layout.torch_dtype, pin_memory=True)
        self._slots = list(self.tensor.unbind(0))  # views made once

    def close(self) -> None:
        """Unregister pinned memory (idempotent); the tensor must not be used afterwards."""
        if self._registered:
            self._registered = False
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())

    def slot(self, slot: int) -> torch.Tensor:
        """View of one slot, (L, 2, H_kv, B, D)."""
        return self._slots[slot]

    def slot_bytes(self, slot: int) -> memoryview:
        """The slot's raw bytes (a view, no copy)."""
        return as_bytes(self.tensor[slot])

    def aligned(self) -> bool:
        bb = self.layout.block_bytes
        return self.tensor.data_ptr() % PAGE == 0 and bb % PAGE == 0
