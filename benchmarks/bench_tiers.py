"""``tandem tier-bench``: G2 put/get and G3 write/read of KV-shaped blocks against same-run ceilings.

Cases, each beside its ceiling measured in the same run on the same bytes:

    tier  op     what is timed                                   ceiling
    G2    put    TierStore.offload, G1 -> G2, per block           one memory copy of all the bytes
    G2    get    TierStore.onboard, G2 -> G1, per block           one memory copy of all the bytes
    G3    write  G2 -> G3 spill: header, xxh3, tmp, rename       one O_DIRECT write per file, same sizes
    G3    read   TierStore.onboard, G3 -> G1 (read, verify, copy) one O_DIRECT read per file, same sizes

G2 cases alternate whole runs with their ceiling; G3 cases alternate slices of 16 blocks with
theirs, so a case and its ceiling see the same disk. Reads bypass the page cache (O_DIRECT;
posix_fadvise DONTNEED where O_DIRECT is refused) for the tier and its ceiling alike. Blocks are
shaped like a model's: 64 KiB per layer (8 KV heads, head_dim 128, 16 tokens, fp16), layers chosen
to reach the requested block size. ``--kv-dtypes`` repeats the cases with the same model's KV held
otherwise (fp8_e4m3 / int8 rows with their scales: half fp16's bytes per token, a quarter of fp32's);
each row says its cache's bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engine.kv_layout import KVLayout
from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.disk_format import HEADER_SIZE
from memory_tiers.host_tier import aligned_buffer
from memory_tiers.tier_store import TierConfig, TierStore

_O_DIRECT = getattr(os, "O_DIRECT", 0)
CHUNK = 16  # blocks per slice when a disk case and its ceiling alternate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block-kib", type=int, nargs="+", default=[2048], help="block sizes in KiB")
    parser.add_argument("--total-mib", type=int, default=512, help="bytes moved per case")
    parser.add_argument("--dir", default=None, help="G3 directory (default: a temp dir under /tmp)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept")
    parser.add_argument("--device", default="cpu", help="where G1 lives: cpu, or cuda with a GPU")
    parser.add_argument("--fsync", action="store_true", help="G3: fdatasync each file before its rename")
    parser.add_argument("--buffered", action="store_true", help="G3 with buffered I/O instead of O_DIRECT")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--kv-dtypes",
        nargs="+",
        default=["float16"],
        choices=["float32", "float16", "bfloat16", "fp8_e4m3", "int8"],
        help="what the blocks hold (the layers stay those of --block-kib at fp16)",
    )


def _layout(block_kib: int, kv: str = "float16") -> KVLayout:
    per_layer_kib = 64  # 2 * 8 heads * 16 tokens * 128 dims * 2 bytes
    if block_kib % per_layer_kib:
        raise SystemExit(f"--block-kib must be a multiple of {per_layer_kib}")
    if kv in ("fp8_e4m3", "int8"):
        return KVLayout(block_kib // per_layer_kib, 8, 128, 16, "float16", kv_dtype=kv)
    return KVLayout(block_kib // per_layer_kib, 8, 128, 16, kv)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    return min(fn() for _ in range(repeat))


def _paired(fn, ceiling, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best of ``repeat`` runs of a case and of its ceiling, run alternately so that both see the
    same weather on a shared machine."""
    a, b = [], []
    for _ in range(repeat):
        a.append(fn())
        b.append(ceiling())
    return min(a), min(b)


def _memcpy_seconds(nbytes: int, device: str) -> float:
    """One copy of nbytes: host -> host on a CPU box, pinned host -> device with a GPU."""
    pin = device != "cpu"
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)  # fault the pages in first
    _sync(device)
    t = time.perf_counter()
    dst.copy_(src)
    _sync(device)
    return time.perf_counter() - t


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _direct_files(directory: Path, idx: range, file_bytes: int, write: bool) -> float:
    """Seconds to write (or read) files ``idx`` of file_bytes each with O_DIRECT, one call per file."""
    buf = aligned_buffer(file_bytes)
    view = memoryview(buf)
    paths = [directory / f"ceiling-{i}.bin" for i in idx]
    t = time.perf_counter()
    for p in paths:
        if write:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
            os.write(fd, view)
        else:
            fd = os.open(p, os.O_RDONLY | _O_DIRECT)
            os.readv(fd, [view])
        os.close(fd)
    return time.perf_counter() - t


def _interleaved(case, ceiling, n: int, repeat: int, reset) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Total seconds of a disk case and of its ceiling, run in alternating slices of CHUNK blocks so
    both see the same disk: on a shared machine its bandwidth changes from one second to the next.
    Best of ``repeat``; ``reset()`` (untimed) starts each repetition afresh."""
    best_a = best_b = float("inf")
    for _ in range(repeat):
        reset()
        a = b = 0.0
        for start in range(0, n, CHUNK):
            idx = range(start, min(n, start + CHUNK))
            a += case(idx)
            b += ceiling(idx)
        best_a, best_b = min(best_a, a), min(best_b, b)
    return best_a, best_b


def _drop_cache(directory: Path) -> None:
    """Where O_DIRECT is not available, evict the files from the page cache before timing reads."""
    for p in directory.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def _run_size(block_kib: int, args: argparse.Namespace, root: Path, kv_dtype: str = "float16") -> list[dict]:
    layout = _layout(block_kib, kv_dtype)
    bb = layout.block_bytes
    repeat, device = args.repeat, args.device
    n = max(4, args.total_mib * 2**20 // bb)
    total = n * bb
    kv = layout.allocate(n, device)  # (L, n, 2, H_kv, B, D): G1
    fill = torch.randn(kv.shape).to(kv.dtype) if kv.is_floating_point() else torch.randint_like(kv, 256)
    kv.copy_(fill)  # random bytes for a quantized pool: codes and scales alike
    dev = TorchDevicePool(kv, layout)
    hashes = [i.to_bytes(16, "big") for i in range(n)]
    memcpy = lambda: _memcpy_seconds(total, device)  # noqa: E731
    g3_opts: dict[str, Any] = {"direct_io": not args.buffered, "fsync": args.fsync}
    rows = []

    def case(tier: str, op: str, seconds: float, ceiling: float) -> None:
        g, c = _gbps(total, seconds), _gbps(total, ceiling)
        rows.append(
            {"tier": tier, "op": op, "kv_cache": layout.cache_dtype,
             "bytes_per_token": bb // layout.block_size, "block_bytes": bb, "blocks": n, "bytes": total,
             "gbps": round(g, 3), "ceiling_gbps": round(c, 3), "ratio": round(g / c, 3)}
        )  # fmt: skip

    # G2: put (offload) and get (onboard), a fresh store per run so every put copies.
    def g2_put() -> float:
        store = TierStore(layout, dev, TierConfig(host_blocks=n))
        store.host.tensor.zero_()  # fault the host pages in outside the timed loop, as the ceiling does
        t = time.perf_counter()
        for i, h in enumerate(hashes):
            store.offload(h, i)
        s = time.perf_counter() - t
        store.close()
        return s

    case("G2", "put", *_paired(g2_put, memcpy, repeat))
    store = TierStore(layout, dev, TierConfig(host_blocks=n))
    for i, h in enumerate(hashes):
        store.offload(h, i)

    def g2_get() -> float:
        t = time.perf_counter()
        for i, h in enumerate(hashes):
            store.onboard(h, n - 1 - i).result()
        _sync(device)
        return time.perf_counter() - t

    case("G2", "get", *_paired(g2_get, memcpy, repeat))
    assert torch.equal(kv[:, 0].cpu(), store.host.slot(n - 1)), "G2 round trip changed the bytes"

    # G3: write = spill every G2 slot to disk; read = onboard from disk into G1.
    disk_dir = root / f"g3-{block_kib}"
    ceiling_dir = root / f"ceiling-{block_kib}"
    ceiling_dir.mkdir(parents=True, exist_ok=True)
    file_bytes = HEADER_SIZE + bb

    cfg = TierConfig(host_blocks=n, disk_dir=str(disk_dir), disk_bytes=2 * n * file_bytes, **g3_opts)
    writer: list[TierStore] = []

    def reset_write() -> None:
        for w in writer:
            w.close()
        writer.clear()
        shutil.rmtree(disk_dir, ignore_errors=True)
        for p in ceiling_dir.iterdir():  # new files each run, as the tier writes new files
            p.unlink()
        writer.append(TierStore(layout, dev, cfg))
        writer[0].host.tensor.copy_(store.host.tensor)

    def g3_write(idx: range) -> float:
        w = writer[0]
        assert w.disk is not None
        t = time.perf_counter()
        for i in idx:
            w.disk.write_async(hashes[i], w.host.slot_bytes(i), lambda ok: None)
        w.flush()
        return time.perf_counter() - t

    def ceiling_write(idx: range) -> float:
        return _direct_files(ceiling_dir, idx, file_bytes, True)

    case("G3", "write", *_interleaved(g3_write, ceiling_write, n, repeat, reset_write))
    for w in writer:
        w.close()

    g3 = TierStore(layout, dev, replace(cfg, host_blocks=1))

    def reset_read() -> None:
        if args.buffered or not _O_DIRECT:
            _drop_cache(disk_dir)
            _drop_cache(ceiling_dir)

    def g3_read(idx: range) -> float:
        t = time.perf_counter()
        futs = [g3.onboard(hashes[i], i) for i in idx]
        ok = all(f.result() for f in futs)
        _sync(device)
        s = time.perf_counter() - t
        assert ok, "a G3 block failed to onboard"
        return s

    def ceiling_read(idx: range) -> float:
        return _direct_files(ceiling_dir, idx, file_bytes, False)

    case("G3", "read", *_interleaved(g3_read, ceiling_read, n, repeat, reset_read))
    assert torch.equal(kv[:, 0].cpu(), store.host.slot(0)), "G3 round trip changed the bytes"
    g3.close()
    store.close()
    shutil.rmtree(disk_dir, ignore_errors=True)
    shutil.rmtree(ceiling_dir, ignore_errors=True)
    return rows


def run(args: argparse.Namespace) -> int:
    # One intra-op thread: a 2 MiB copy gains nothing from more, and on a shared machine OpenMP
    # workers spinning against other processes made copies up to 10x slower (measured).
    torch.set_num_threads(1)
    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="tier-bench-", dir="/tmp")
        root = Path(tmp)
    else:
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
    try:
        sizes = [(kib, kv) for kv in args.kv_dtypes for kib in args.block_kib]
        rows = [r for kib, kv in sizes for r in _run_size(kib, args, root, kv)]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    head = f"{'kv':<10}{'B/token':>9} {'tier':<5}{'op':<7}{'block':>10}"
    print(head + f"{'blocks':>8}{'GB/s':>9}{'ceiling':>9}{'ratio':>7}")
    for r in rows:
        print(
            f"{r['kv_cache']:<10}{r['bytes_per_token']:>9} "
            f"{r['tier']:<5}{r['op']:<7}{r['block_bytes'] // 1024:>8}Ki{r['blocks']:>8}"
            f"{r['gbps']:>9.2f}{r['ceiling_gbps']:>9.2f}{r['ratio']:>7.2f}"
        )
    return 0
