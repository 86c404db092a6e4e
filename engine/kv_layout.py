"""The shape of a worker's paged KV pool, shared by the engine, kv_transfer and memory_tiers.

One tensor holds every layer's pool, layer-major, so it is registered with a transport once and a
layer's slice of a run of consecutive block ids is one contiguous piece (one descriptor)::

    kv: (num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim)
          │           │          └ 0 = K, 1 = V
          │           └ block id (a request owns a block table: a list of these)
          └ kv[l] is layer l's pool, (num_blocks, 2, H_kv, B, D), as in ARCHITECTURE.md

A token at position p of a request lives in block ``block_table[p // B]`` at offset ``p % B``; its
flat *slot* is ``block_id * B + p % B``. The tier store's unit is one block across all layers:
``kv[:, block_id]``, ``block_bytes`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"  # one of float32, bfloat16, float16

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return 2 * self.num_kv_heads * self.block_size * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers: the tier store's unit."""
        return self.num_layers * self.layer_block_bytes

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, num_blocks, 2, self.num_kv_heads, self.block_size, self.head_dim)

    def allocate(self, num_blocks: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """A zeroed pool, (L, N, 2, H_kv, B, D)."""
        return torch.zeros(self.pool_shape(num_blocks), dtype=self.torch_dtype, device=device)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
