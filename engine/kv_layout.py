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

A quantized KV cache (``kv_dtype`` fp8_e4m3 or int8, engine/kv_quant.py) is a uint8 pool whose last
dimension is a *row*: one token's D codes of one head followed by that row's fp32 scale, so the
scales live inside the blocks and move with them (tiers, handoffs, digests) as plain bytes::

    kv: (L, N, 2, H_kv, B, D + 4) uint8      row = [ code_0 ... code_{D-1} | scale (fp32, LE) ]

A *latent* layout (multi-head latent attention, engine/mla.py) keeps one plane instead of K and V,
holding one "head" per token: the compressed KV and the shared rope key side by side::

    kv: (num_layers, num_blocks, 1, 1, block_size, kv_lora_rank + qk_rope_head_dim)

Either is still a 6-d pool of whole blocks, so the block pool, the block hash, the tiers, the
digests and the handoff move it without knowing what is inside.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
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
    if dtype == torch.uint8:  # a quantized KV pool's bytes (its codes and scales)
        return "uint8"
    raise ValueError(f"unsupported dtype {dtype}")


KV_DTYPES = ("auto", "fp8_e4m3", "int8")  # auto: the run dtype
SCALE_BYTES = 4  # one fp32 scale per quantized row


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"  # one of float32, bfloat16, float16: the run dtype
    kv_dtype: str = "auto"  # auto (the run dtype) | fp8_e4m3 | int8: codes + a scale per row
    latent: bool = False  # one plane (MLA's latent) instead of two (K and V)

    def __post_init__(self) -> None:
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")

    @property
    def planes(self) -> int:
        """Planes per block: 2 (K, V) or 1 (the latent)."""
        return 1 if self.latent else 2

    @property
    def quantized(self) -> bool:
        return self.kv_dtype != "auto"

    @property
    def cache_dtype(self) -> str:
        """What the pool holds, as the YAML and the handoff's layout check name it."""
        return self.kv_dtype if self.quantized else self.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quantized else torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def row_size(self) -> int:
        """The pool's last dimension: D values, or D codes and the row's scale."""
        return self.head_dim + SCALE_BYTES if self.quantized else self.head_dim

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V, or the latent)."""
        return self.planes * self.num_kv_heads * self.block_size * self.row_size * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers: the tier store's unit."""
        return self.num_layers * self.layer_block_bytes

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, num_blocks, self.planes, self.num_kv_heads, self.block_size, self.row_size)

    def allocate(self, num_blocks: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """A zeroed pool, (L, N, planes, H_kv, B, D). On a Linux CPU, a fresh anonymous mapping advised
        to be backed by transparent huge pages before anything touches it (the KV transports' CMA
        copies pin pages, see ``huge_pages``); torch's allocator may hand back memory that earlier
        allocations already faulted in with 4 KiB pages, which advice no longer changes."""
        shape = self.pool_shape(num_blocks)
        nbytes = self.itemsize * int(torch.Size(shape).numel())
        if torch.device(device).type != "cpu" or not sys.platform.startswith("linux") or nbytes == 0:
            return torch.zeros(shape, dtype=self.torch_dtype, device=device)
        buf = _fresh_huge_page_bytes(nbytes)  # zero already: fresh anonymous memory
        # write one byte per 4 KiB page: every page is faulted in now (huge ones where granted), so
        # the memory is committed at start-up and no serving step pays a first-touch fault
        buf[::4096].zero_()
        return buf.view(self.torch_dtype).view(shape)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


_HUGE = 2 << 20  # x86-64 transparent huge page
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25  # Linux >= 6.1: back the range with huge pages now, not some day


def huge_pages(addr: int, nbytes: int, collapse: bool = True) -> bool:
    """Ask Linux to back the 2 MiB-aligned part of ``[addr, addr + nbytes)`` with transparent huge
    pages; True if it agreed. Best effort: False elsewhere, or when the kernel says no.

    Why the transports care: over shared memory UCX copies with CMA (``process_vm_writev``), which
    pins the pages of both sides for every copy. With 4 KiB pages a 64 MiB WRITE ran at ~0.6 of a
    memcpy; with huge pages on both sides at ~0.95 (docs/benchmarks-kv-transfer.md). torch's
    allocator does not ask for them (numpy does, for arrays of 4 MiB and up). ``collapse`` turns
    pages already touched into huge ones, ~1.6 ms per MiB once; a pool allocated empty, advised
    with ``collapse=False`` and then zeroed gets huge pages as it is touched, at no cost (zeroing
    512 MiB took 47 ms that way against 164 ms for ``torch.zeros``)."""
    lo = -(-addr // _HUGE) * _HUGE
    hi = (addr + nbytes) // _HUGE * _HUGE
    if not sys.platform.startswith("linux") or hi <= lo:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
        return False
    return not collapse or libc.madvise(lo, hi - lo, _MADV_COLLAPSE) == 0


def _fresh_huge_page_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeroed memory (uint8) from a fresh private anonymous mapping, 2 MiB aligned, advised
    to use huge pages before any page is touched. The tensor keeps the mapping alive."""
    mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shmem
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    offset = -base % _HUGE
    huge_pages(base + offset, nbytes, collapse=False)
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
