"""G3 on its own: file format, index rebuilt at start-up, planted corruption detected and dropped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.kv_layout import KVLayout
from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.disk_format import HEADER_SIZE, file_size
from memory_tiers.metadata import BlockEvent, EventKind, Tier
from memory_tiers.tier_store import TierConfig, TierStore

pytestmark = pytest.mark.unit

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=4)  # 4096-byte blocks
BB = LAYOUT.block_bytes
H = [bytes([i + 1]) * 16 for i in range(8)]


def block(b: int, layout: KVLayout = LAYOUT) -> torch.Tensor:
    n = layout.block_bytes // 4
    shape = (layout.num_layers, 2, layout.num_kv_heads, layout.block_size, layout.head_dim)
    return torch.arange(n, dtype=torch.float32).view(shape) + 1000 * b


def open_store(d: Path, files: int = 8, fingerprint: str = "m", layout: KVLayout = LAYOUT, events=None):
    kv = layout.allocate(8)  # (L, N, 2, H_kv, B, D)
    for b in range(8):
        kv[:, b] = block(b, layout)
    cfg = TierConfig(
        host_blocks=1,
        disk_dir=str(d),
        disk_bytes=files * file_size(layout.block_bytes),
        spill_watermark=0.0,
        model_fingerprint=fingerprint,
    )
    pub = events.extend if events is not None else None
    return TierStore(layout, TorchDevicePool(kv, layout), cfg, worker_id="w", publish=pub), kv


def fill(d: Path, n: int, layout: KVLayout = LAYOUT) -> None:
    """Offload n blocks through a one-slot G2, so H[0..n-2] end up on disk; then close."""
    store, _ = open_store(d, layout=layout)
    for i in range(n):
        store.offload(H[i], i)
    store.flush()
    store.close()


def path(d: Path, h: bytes) -> Path:
    return d / (h.hex() + ".kvb")


def test_file_layout_and_restart_rebuilds_the_index(tmp_path: Path) -> None:
    fill(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(h.hex() + ".kvb" for h in H[:3])
    data = path(tmp_path, H[1]).read_bytes()
    assert len(data) == HEADER_SIZE + BB and data[:8] == b"TNDMKVB1" and data[16:32] == H[1]
    assert data[HEADER_SIZE:] == block(1).numpy().tobytes()
    events: list[BlockEvent] = []
    store, kv = open_store(tmp_path, events=events)
    store.check()
    assert sorted(store.disk.hashes()) == sorted(H[:3])  # type: ignore[union-attr]
    assert sorted(e.block_hash for e in events) == sorted(H[:3])
    assert {(e.kind, e.tier, e.worker_id) for e in events} == {(EventKind.STORED, Tier.G3, "w")}
    assert store.lookup(H[:3]) == [Tier.G3] * 3
    for i in range(3):
        assert store.onboard(H[i], 7).result(timeout=30) is True
        assert torch.equal(kv[:, 7], block(i))
    store.close()


def test_flipped_payload_byte_is_detected_on_read_and_the_file_dropped(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    p = path(tmp_path, H[0])
    raw = bytearray(p.read_bytes())
    raw[HEADER_SIZE + 1234] ^= 0x01
    p.write_bytes(bytes(raw))
    store, kv = open_store(tmp_path)
    assert store.lookup([H[0]]) == [Tier.G3]  # the header is fine: only reading the payload tells
    kv[:, 7] = -1
    assert store.onboard(H[0], 7).result(timeout=30) is False
    assert torch.equal(kv[:, 7], torch.full_like(kv[:, 7], -1))  # nothing corrupt reached G1
    assert not p.exists() and store.lookup([H[0]]) == []
    assert store.metrics().g3_corrupt_dropped == 1 and store.metrics().onboard_failures == 1
    assert store.onboard(H[1], 7).result(timeout=30) is True
    store.check()
    store.close()


@pytest.mark.parametrize("damage", ["header_byte", "truncate", "truncate_header", "empty", "renamed"])
def test_damaged_files_are_dropped_at_start_up(tmp_path: Path, damage: str) -> None:
    fill(tmp_path, 4)
    p = path(tmp_path, H[1])
    raw = p.read_bytes()
    if damage == "header_byte":
        p.write_bytes(raw[:40] + bytes([raw[40] ^ 0x80]) + raw[41:])
    elif damage == "truncate":
        p.write_bytes(raw[:-1])
    elif damage == "truncate_header":
        p.write_bytes(raw[:100])
    elif damage == "empty":
        p.write_bytes(b"")
    else:  # a valid file under another block's name
        p.unlink()
        path(tmp_path, H[5]).write_bytes(raw)
    events: list[BlockEvent] = []
    store, kv = open_store(tmp_path, events=events)
    store.check()
    assert sorted(store.disk.hashes()) == sorted([H[0], H[2]])  # type: ignore[union-attr]
    assert store.metrics().g3_corrupt_dropped == 1
    bad = H[5] if damage == "renamed" else H[1]  # routers may have heard of it before the restart
    assert [(e.kind, e.block_hash) for e in events if e.kind is EventKind.REMOVED] == [
        (EventKind.REMOVED, bad)
    ]
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(h.hex() + ".kvb" for h in (H[0], H[2]))
    store.close()


def test_leftover_temporary_files_and_other_models_files_are_removed(tmp_path: Path) -> None:
    fill(tmp_path, 3)
    (tmp_path / f".{H[6].hex()}.123.0.tmp").write_bytes(b"half a block")
    (tmp_path / "notes.txt").write_text("not ours")
    store, _ = open_store(tmp_path, fingerprint="another-model")
    store.check()
    assert store.disk.hashes() == []  # type: ignore[union-attr]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["notes.txt"]
    store.close()


def test_start_up_over_capacity_evicts_the_oldest_files(tmp_path: Path) -> None:
    fill(tmp_path, 5)  # H0..H3 on disk, written in that order
    for i, h in enumerate(H[:4]):
        os.utime(path(tmp_path, h), (1_000_000 + i, 1_000_000 + i))
    store, _ = open_store(tmp_path, files=2)
    store.check()
    assert store.disk.hashes() == [H[2], H[3]]  # type: ignore[union-attr]
    assert store.disk.used_bytes == 2 * file_size(BB)  # type: ignore[union-attr]
    store.close()


def test_unaligned_blocks_use_buffered_io_and_round_trip(tmp_path: Path) -> None:
    small = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=3)  # 192 bytes
    fill(tmp_path, 3, layout=small)
    assert path(tmp_path, H[0]).stat().st_size == HEADER_SIZE + small.block_bytes
    store, kv = open_store(tmp_path, layout=small)
    assert store.onboard(H[1], 5).result(timeout=30) is True
    assert torch.equal(kv[:, 5], block(1, small))
    store.close()
