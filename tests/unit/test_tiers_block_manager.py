"""The seam with the engine's BlockManager: its on_evict hook offloads to G2; onboard + register
bring a prefix back into G1."""

from __future__ import annotations

import pytest
import torch

from engine.block_hash import hash_blocks
from engine.block_manager import BlockManager
from engine.kv_layout import KVLayout
from engine.sequence import Sequence
from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.metadata import Tier
from memory_tiers.tier_store import TierConfig, TierStore

pytestmark = pytest.mark.unit

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, block_size=4)


def content(b: int) -> torch.Tensor:
    return torch.full((2, 2, 1, 4, 8), float(b + 1))  # (L, 2, H_kv, B, D)


def test_evicted_prefix_goes_to_g2_and_comes_back() -> None:
    kv = LAYOUT.allocate(4)  # (L, N, 2, H_kv, B, D)
    store = TierStore(LAYOUT, TorchDevicePool(kv, LAYOUT), TierConfig(host_blocks=4))
    bm = BlockManager(num_blocks=4, block_size=4, fingerprint="m", on_evict=store.on_evict)
    prompt = list(range(12))
    hashes = hash_blocks(prompt, 4, "m")
    for b, h in enumerate(hashes):  # a finished request left 3 computed blocks: cached-free in G1
        kv[:, b] = content(b)
        bm.register(b, h, prompt[4 * b : 4 * b + 4])
    assert bm.lookup_prefix(prompt) == 3

    other = Sequence("other", list(range(100, 116)))
    assert bm.allocate_prompt(other)
    assert bm.append_slots(other, 16)  # takes free block 3, then evicts blocks 0, 1, 2 (LRU)
    assert sorted(other.block_table) == [0, 1, 2, 3]
    kv.zero_()  # the other request overwrites them
    assert bm.lookup_prefix(prompt) == 0
    assert store.lookup(hashes) == [Tier.G2] * 3
    assert [store.slots.slot_of(h) for h in hashes] == [0, 1, 2]
    for b in range(3):
        assert torch.equal(store.host_block(b), content(b))

    bm.free(other)
    for b, h in enumerate(hashes):  # onboard into G1 blocks 3, 2, 1, then declare them
        target = 3 - b
        assert store.onboard(h, target).result() is True
        bm.register(target, h, prompt[4 * b : 4 * b + 4])
        assert torch.equal(kv[:, target], content(b))
    assert bm.lookup_prefix(prompt) == 3
    assert store.metrics().bytes_onboarded["g2"] == 3 * LAYOUT.block_bytes
    store.check()
    store.close()
