"""TierStore: offload / onboard paths, LRU eviction order, pins, capacity, prefix lookup, G2 reservations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kv_layout import KVLayout
from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.disk_format import file_size
from memory_tiers.metadata import BlockEvent, EventKind, Tier
from memory_tiers.tier_store import TierConfig, TierStore

pytestmark = pytest.mark.unit

# 2 layers x (K, V) x 2 heads x 4 tokens x 32 dims x 4 bytes = 4096 bytes: page-aligned, so G3 uses O_DIRECT.
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_size=4)
BB = LAYOUT.block_bytes
H = [bytes([i + 1]) * 16 for i in range(12)]
G1_BLOCKS = 8


def make(tmp_path: Path | None, host: int, disk_files: int = 0, watermark: float = 0.0):
    kv = LAYOUT.allocate(G1_BLOCKS)  # (L, N, 2, H_kv, B, D)
    for b in range(G1_BLOCKS):
        kv[:, b] = torch.arange(BB // 4, dtype=torch.float32).view(kv[:, b].shape) + 1000 * b
    events: list[BlockEvent] = []
    cfg = TierConfig(
        host_blocks=host,
        disk_dir=str(tmp_path / "g3") if tmp_path is not None else None,
        disk_bytes=disk_files * file_size(BB),
        spill_watermark=watermark,
    )
    store = TierStore(LAYOUT, TorchDevicePool(kv, LAYOUT), cfg, worker_id="w0", publish=events.extend)
    return store, kv, events


def block(b: int) -> torch.Tensor:
    return torch.arange(BB // 4, dtype=torch.float32).view(LAYOUT.num_layers, 2, 2, 4, 32) + 1000 * b


def test_offload_copies_exact_bytes_and_evicts_lru_without_disk() -> None:
    store, kv, events = make(None, host=3)
    for i in range(3):
        assert store.offload(H[i], i)
        store.check()
    assert torch.equal(store.host_block(0), block(0))
    assert torch.equal(store.host_block(2), block(2))
    assert store.offload(H[0], 0)  # already in G2: touched (now most recent), not copied again
    assert store.metrics().bytes_offloaded == 3 * BB
    assert store.offload(H[3], 3)  # evicts H[1], the least recently used
    assert store.lookup([H[0]]) == [Tier.G2]
    assert store.lookup([H[1]]) == []
    assert dict(store.slots.cached) == {H[2]: 2, H[0]: 0, H[3]: 1}
    assert store.metrics().dropped == 1
    assert [(e.kind, e.tier, e.block_hash) for e in events] == [
        (EventKind.STORED, Tier.G2, H[0]),
        (EventKind.STORED, Tier.G2, H[1]),
        (EventKind.STORED, Tier.G2, H[2]),
        (EventKind.REMOVED, Tier.G2, H[1]),
        (EventKind.STORED, Tier.G2, H[3]),
    ]
    assert all(e.worker_id == "w0" for e in events)
    store.check()
    store.close()
    store.close()  # idempotent


def test_onboard_from_g2_is_immediate_and_exact() -> None:
    store, kv, _ = make(None, host=2)
    store.offload(H[0], 3)
    kv[:, 3] = 0  # G1 block repurposed by the engine
    fut = store.onboard(H[0], 5)
    assert fut.done() and fut.result() is True
    assert torch.equal(kv[:, 5], block(3))
    assert store.onboard(H[7], 6).result() is False
    assert store.metrics().bytes_onboarded == {"g2": BB, "g3": 0}
    store.close()


def test_spill_to_g3_then_onboard_from_disk_and_lru_file_eviction(tmp_path: Path) -> None:
    store, kv, events = make(tmp_path, host=2, disk_files=2)
    for i in range(4):  # G2 holds 2: H0, H1 spill to G3 in order
        store.offload(H[i], i)
    store.flush()
    store.check()
    assert dict(store.slots.cached) == {H[2]: 0, H[3]: 1}
    assert store.disk is not None and store.disk.hashes() == [H[0], H[1]]
    assert store.lookup(H[:4]) == [Tier.G3, Tier.G3, Tier.G2, Tier.G2]
    fut = store.onboard(H[0], 7)
    assert fut.result(timeout=30) is True
    assert torch.equal(kv[:, 7], block(0))
    assert store.disk.hashes() == [H[1], H[0]]  # the read made H0 most recent in G3
    store.offload(H[4], 4)  # spills H2; G3 full: drops its LRU file, H1
    store.flush()
    store.check()
    assert store.disk.hashes() == [H[0], H[2]]
    assert sorted(p.name for p in (tmp_path / "g3").iterdir()) == sorted(
        h.hex() + ".kvb" for h in (H[0], H[2])
    )
    assert (EventKind.REMOVED, Tier.G3, H[1]) in [(e.kind, e.tier, e.block_hash) for e in events]
    m = store.metrics()
    assert m.g3_blocks == 2 and m.g3_used_bytes == 2 * file_size(BB) == m.g3_capacity_bytes
    assert m.bytes_spilled == 3 * BB and m.bytes_onboarded == {"g2": 0, "g3": BB}
    store.close()


def test_prefix_lookup_across_tiers_counts_hits_and_misses(tmp_path: Path) -> None:
    store, _, _ = make(tmp_path, host=2, disk_files=8)
    for i in range(4):
        store.offload(H[i], i)
    store.flush()
    # H0, H1 in G3; H2, H3 in G2; H5 nowhere.
    assert store.lookup([H[0], H[2], H[1], H[3], H[5], H[2]]) == [Tier.G3, Tier.G2, Tier.G3, Tier.G2]
    assert store.lookup([H[5], H[0]]) == []
    m = store.metrics()
    assert m.hits == {"g2": 2, "g3": 2}
    assert m.misses == {"g2": 4, "g3": 2}
    store.close()


def test_pinned_blocks_survive_pressure_and_capacity_is_never_exceeded(tmp_path: Path) -> None:
    store, _, _ = make(tmp_path, host=2, disk_files=1)
    store.offload(H[0], 0)
    store.offload(H[1], 1)
    assert store.pin(H[0]) is Tier.G2
    store.offload(H[2], 2)  # evicts H1 (H0 is pinned although older)
    store.flush()
    assert dict(store.slots.cached) == {H[0]: 0, H[2]: 1}
    assert store.disk is not None and store.disk.hashes() == [H[1]]
    assert store.pin(H[1]) is Tier.G3
    assert store.pin(H[2]) is Tier.G2
    # G2: both pinned; G3: its one file pinned. Nothing can move: the offload is refused.
    assert store.offload(H[3], 3) is False
    assert store.reserve_host("r", 1) is None
    store.check()
    assert store.lookup(H[:3]) == [Tier.G2, Tier.G3, Tier.G2]
    store.unpin(H[2])
    store.unpin(H[1])
    assert store.offload(H[3], 3)  # H2 spills; the G3 file H1 (unpinned now) makes room
    store.flush()
    store.check()
    assert store.disk.hashes() == [H[2]]
    assert dict(store.slots.cached) == {H[0]: 0, H[3]: 1}
    assert store.disk.used_bytes == file_size(BB)
    store.unpin(H[0])
    store.check()
    store.close()


def test_a_block_pinned_while_spilling_stays_in_g2(tmp_path: Path) -> None:
    store, _, _ = make(tmp_path, host=2, disk_files=4)
    store.offload(H[0], 0)
    store.offload(H[1], 1)
    with store._cond:  # start a spill by hand, then pin before its write ends
        store._evict(H[0])
        assert H[0] in store.slots.spilling
        store.pin(H[0])
    store.flush()
    store.check()
    assert store.slots.slot_of(H[0]) == 0 and H[0] in store.slots.cached
    assert store.disk is not None and store.disk.hashes() == [H[0]]
    store.unpin(H[0])
    store.close()


def test_host_reservation_falls_back_to_g2_and_release_keeps_or_frees(tmp_path: Path) -> None:
    store, kv, _ = make(tmp_path, host=3, disk_files=4)
    store.offload(H[0], 0)
    store.offload(H[1], 1)
    slots = store.reserve_host("req-1", 2)  # 1 free slot + H0 (LRU) spilled to G3
    assert slots == [0, 2]
    store.check()
    assert store.metrics().g2_reserved_blocks == 2
    assert store.disk is not None and store.disk.hashes() == [H[0]]
    assert store.reserve_host("req-2", 2) is None  # only H1 could go: refused, and nothing moved
    assert dict(store.slots.cached) == {H[1]: 1}
    store.host_block(0).copy_(block(5))  # the decode worker receives KV into its reserved slots
    store.host_block(2).copy_(block(6))
    store.copy_host_to_device(2, 7)
    assert torch.equal(kv[:, 7], block(6))
    store.release_host("req-1", [H[5], None])  # slot 0 kept as a cached block, slot 2 freed
    store.check()
    assert dict(store.slots.cached) == {H[1]: 1, H[5]: 0}
    assert store.slots.free == [2]
    assert store.onboard(H[5], 6).result() is True and torch.equal(kv[:, 6], block(5))
    store.release_host("req-1")  # releasing twice is harmless
    store.check()
    store.close()


def test_random_operations_keep_exact_accounting(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    store, kv, _ = make(tmp_path, host=3, disk_files=3, watermark=0.34)
    pinned: list[bytes] = []
    for step in range(300):
        op = rng.randrange(6)
        h = H[rng.randrange(len(H))]
        if op <= 1:
            b = rng.randrange(G1_BLOCKS)
            kv[:, b] = block(h[0])  # every hash has its own contents
            store.offload(h, b)
        elif op == 2:
            b = rng.randrange(G1_BLOCKS)
            if store.onboard(h, b).result(timeout=30):
                assert torch.equal(kv[:, b], block(h[0]))
        elif op == 3 and len(pinned) < 3 and store.pin(h) is not None:
            pinned.append(h)
        elif op == 4 and pinned:
            store.unpin(pinned.pop(rng.randrange(len(pinned))))
        elif op == 5:
            rid = f"r{step}"
            got = store.reserve_host(rid, rng.randrange(1, 3))
            if got is not None:
                hh = H[rng.randrange(len(H))]
                store.host_block(got[0]).copy_(block(hh[0]))  # received KV for hh
                store.release_host(rid, [hh, None])
        store.check()
        assert store.slots.num_used <= 3
        assert store.disk is not None and store.disk.used_bytes <= 3 * file_size(BB)
    for h in pinned:
        store.unpin(h)
    store.flush()
    store.check()
    held = [h for h in H if store.lookup([h])]
    assert held
    for h in held:  # whatever is still held onboards with the bytes it was offloaded with
        assert store.onboard(h, 0).result(timeout=30) is True
        assert torch.equal(kv[:, 0], block(h[0]))
    store.close()


@pytest.mark.gpu
def test_cuda_g1_with_pinned_g2_round_trips(tmp_path: Path) -> None:
    kv = LAYOUT.allocate(4, "cuda")  # (L, N, 2, H_kv, B, D) on the GPU
    kv[:, 1] = block(1).cuda()
    cfg = TierConfig(host_blocks=1, disk_dir=str(tmp_path), disk_bytes=4 * file_size(BB), spill_watermark=0.0)
    store = TierStore(LAYOUT, TorchDevicePool(kv, LAYOUT), cfg)
    assert store.host.tensor.is_pinned()
    store.offload(H[0], 1)
    assert store.onboard(H[0], 2).result() is True
    store.offload(H[1], 3)  # H0 spills to G3
    store.flush()
    assert store.onboard(H[0], 0).result(timeout=30) is True
    assert torch.equal(kv[:, 0].cpu(), block(1)) and torch.equal(kv[:, 2].cpu(), block(1))
    store.check()
    store.close()
