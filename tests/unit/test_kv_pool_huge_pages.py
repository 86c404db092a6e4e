"""kv_transfer.pool: a CPU pool seen by a transport is backed by transparent huge pages (CMA pins
every page it copies; 4 KiB pages cost a third of the shared-memory bandwidth), and turning its
pages into huge ones changes no byte."""

from __future__ import annotations

import ctypes
import math
import mmap
import platform
import sys
from pathlib import Path

import pytest
import torch

from engine.kv_layout import KVLayout, huge_pages
from kv_transfer.pool import PoolView

pytestmark = pytest.mark.unit

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


def _thp_mode() -> str:
    """The bracketed THP mode ("always", "madvise", "never"), or "" without THP."""
    try:
        text = _THP.read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


# "always" would back torch's allocations with huge pages by itself: nothing left to show
needs_madvise_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() != "madvise" or not _kernel_at_least(6, 1),
    reason="needs Linux >= 6.1 (MADV_COLLAPSE) with transparent huge pages in madvise mode",
)


def _anon_huge_bytes(addr: int, nbytes: int) -> int:
    """AnonHugePages of this process's mappings that overlap [addr, addr + nbytes)."""
    total = 0
    overlaps = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            overlaps = lo < addr + nbytes and addr < hi
        elif overlaps and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


LAYOUT = KVLayout(2, 2, 64, 16, "float32")  # 32 KiB per (layer, block)


def _own_mapping(nbytes: int) -> torch.Tensor:
    """``nbytes`` (uint8) in a fresh private anonymous mapping of their own, with no huge page advice.

    Not torch's allocator: what it returns may lie in a heap range an earlier test in this process
    advised or collapsed, and smaps counts huge pages per mapping, not per range. A PROT_NONE page on
    either side keeps the kernel from merging the mapping with a neighbour."""
    page = mmap.PAGESIZE
    mm = mmap.mmap(-1, nbytes + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for guard in (base, base + page + nbytes):
        assert libc.mprotect(guard, page, 0) == 0, ctypes.get_errno()  # PROT_NONE
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=page)


def _random_pool(num_blocks: int) -> torch.Tensor:
    """A pool in memory nobody advised to use huge pages, filled with random bytes."""
    shape = LAYOUT.pool_shape(num_blocks)
    kv = _own_mapping(4 * math.prod(shape)).view(torch.float32).view(shape)
    g = torch.Generator().manual_seed(3)
    flat = kv.view(torch.uint8).reshape(-1)
    flat.copy_(torch.randint(0, 256, flat.shape, generator=g, dtype=torch.uint8))
    return kv


@needs_madvise_thp
def test_pool_view_backs_a_cpu_pool_with_huge_pages_and_keeps_its_bytes() -> None:
    kv = _random_pool(512)  # 2 layers x 512 blocks x 32 KiB = 32 MiB
    nbytes = kv.numel() * kv.element_size()
    before = kv.clone()
    # torch does not ask for huge pages: without PoolView this range has none
    assert _anon_huge_bytes(kv.data_ptr(), nbytes) == 0
    PoolView(kv)
    # everything but the partial 2 MiB pages at either end of the allocation
    assert _anon_huge_bytes(kv.data_ptr(), nbytes) >= nbytes - (4 << 20)
    assert torch.equal(kv.view(torch.uint8), before.view(torch.uint8))


@needs_madvise_thp
def test_huge_pages_leaves_ranges_without_a_whole_huge_page_alone() -> None:
    kv = _random_pool(32)  # 2 MiB: at most one aligned huge page, usually none
    addr = kv.data_ptr()
    assert huge_pages(addr, 1 << 20) is False  # 1 MiB never holds an aligned 2 MiB page
    assert huge_pages(-(-addr // (2 << 20)) * (2 << 20), 0) is False


@needs_madvise_thp
def test_kv_layout_allocates_zeroed_pools_on_huge_pages() -> None:
    kv = LAYOUT.allocate(512)  # 16 MiB
    nbytes = kv.numel() * kv.element_size()
    assert kv.data_ptr() % (2 << 20) == 0
    assert _anon_huge_bytes(kv.data_ptr(), nbytes) == nbytes  # faulted in, each as a huge page
    assert not kv.any()
