"""KV that lands in G2: a decode worker whose G1 is too small for a second prompt grants a host-memory
destination, commits the blocks into G2 under their hashes, and onboards them into G1 once room
frees up. In-process workers stepped by hand: the output equals the single engine's, and every way
out (finish, cancel while landing or while waiting in G2, a failed transfer, an expired lease)
returns every G1 block, G2 slot and inbox block."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from decode_pool.worker import DecodeWorker
from engine.block_hash import hash_blocks
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer.protocol import KVTransferError, NoRoomError
from memory_tiers.metadata import Tier
from memory_tiers.tier_store import TierStore
from pool_runtime.handoff import KVGrant
from prefill_pool.worker import Cancelled, PrefillWorker
from tests.integration.pools.helpers import decode_all, prefill_all, start, take, work, worker_config

pytestmark = pytest.mark.integration

MAX_NEW = 12
BLOCK = 4
G1_BLOCKS = 14  # the 41-token prompt takes 11: the 30-token one (8 blocks) must land in G2
G2_BLOCKS = 16
INBOX_BLOCKS = 14  # auto: blocks for the longest sequence, min(256, 14 * 4) = 56 tokens


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(11)
    out = [[rng.randrange(3, 384) for _ in range(n)] for n in (41, 30, 3, 32)]
    shared = [rng.randrange(3, 384) for _ in range(20)]  # 5 blocks
    return out + [shared + [rng.randrange(3, 384) for _ in range(n)] for n in (21, 10)]


@pytest.fixture(scope="module")
def reference(ckpt: Path, prompts: list[list[int]]) -> tuple[list[list[int]], int, str]:
    """The single engine's output per prompt, and the KV layout's block bytes and fingerprint."""
    engine = LLMEngine(EngineConfig(model=ckpt, block_size=BLOCK))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, seed=1))
    block_bytes, fingerprint = engine.kv_layout.block_bytes, engine.model_config.fingerprint
    engine.close()
    return [o.new_token_ids for o in outs], block_bytes, fingerprint


@pytest.fixture(scope="module")
def expected(reference: tuple[list[list[int]], int, str]) -> list[list[int]]:
    return reference[0]


@pytest.fixture
def pair(
    ckpt: Path, reference: tuple[list[list[int]], int, str]
) -> Iterator[tuple[PrefillWorker, DecodeWorker]]:
    p = PrefillWorker(worker_config(ckpt, "p0"))
    d = DecodeWorker(worker_config(ckpt, "d0", num_blocks=G1_BLOCKS, host_kv_bytes=G2_BLOCKS * reference[1]))
    try:
        yield p, d
    finally:
        p.close()
        d.close()
    assert p.load().used_blocks == 0 and d.load().used_blocks == 0


def _store(d: DecodeWorker) -> TierStore:
    assert d.engine.tier_store is not None
    return d.engine.tier_store


def _in_g2(d: DecodeWorker, grant: KVGrant) -> bool:
    assert d.landing is not None
    return grant.dest.receiver == d.landing.receiver.name


def _assert_idle(p: PrefillWorker, d: DecodeWorker) -> None:
    assert p.load().used_blocks == 0 and p.sender.num_in_flight == 0
    dl = d.load()
    assert (dl.used_blocks, dl.reserved_blocks, dl.running, dl.waiting) == (0, 0, 0, 0)
    assert dl.g2_used_blocks == 0
    assert d.landing is not None and d.landing.num_free_inbox_blocks == INBOX_BLOCKS
    assert _store(d).metrics().g2_reserved_blocks == 0
    _store(d).check()


def _tokens(chunks: dict[str, list]) -> dict[str, list[int]]:
    return {rid: [t for c in cs for t in c.token_ids] for rid, cs in chunks.items()}


def test_second_prompt_lands_in_g2_and_joins_later(pair, prompts, expected, reference) -> None:
    p, d = pair
    fingerprint = reference[2]
    a, b, c = (work(r, pr, MAX_NEW) for r, pr in zip("abc", prompts[:3], strict=True))
    ga = d.reserve(a)
    assert not _in_g2(d, ga) and d.load().used_blocks == 11
    gb = d.reserve(b)  # 8 blocks, 3 free in G1
    assert _in_g2(d, gb) and gb.num_cached_blocks == 0 and len(gb.dest.block_ids) == 8
    assert gb.dest.mem_type == "DRAM"
    # one block would fit in G1, but not beside the 8 that b, waiting in G2, will need first
    gc = d.reserve(c)
    assert _in_g2(d, gc)
    load = d.load()
    assert (load.used_blocks, load.free_blocks) == (11, 3)
    assert (load.g2_used_blocks, load.g2_total_blocks) == (9, G2_BLOCKS)
    assert load.g2_free_blocks == min(INBOX_BLOCKS - 9, G2_BLOCKS - 9)
    assert load.reserved_blocks == 11 + 9 and load.waiting == 3

    futs = [p.submit(r, g) for r, g in zip((a, b, c), (ga, gb, gc), strict=True)]
    prefill_all(p, futs)
    d.step()  # commits: b's and c's KV move from the inbox into G2
    store = _store(d)
    b_hashes = hash_blocks(b.prompt_token_ids, BLOCK, fingerprint)
    assert len(b_hashes) == 7 and store.lookup(b_hashes) == [Tier.G2] * 7
    assert store.num_host_in_use == 7 + 1 + 1  # b: 7 pinned + its partial tail; c: a partial block
    assert d.landing is not None and d.landing.num_free_inbox_blocks == INBOX_BLOCKS
    assert d.load().reserved_blocks == 11  # a's G1 lease, until it starts

    for r, f in zip((a, b, c), futs, strict=True):
        start(d, r.request_id, f.result())
    load = d.load()
    assert (load.running, load.waiting) == (1, 2)  # b and c wait in G2 for G1 room
    assert d.drain("", 0.0) == []  # b and c wait in G2: nothing decoded yet

    got = _tokens(decode_all(d, ["a", "b", "c"]))
    assert [got["a"], got["b"], got["c"]] == expected[:3]
    assert d.engine.onboarder is not None and d.engine.onboarder.blocks_onboarded == 7
    assert store.metrics().bytes_onboarded["g2"] == (7 + 1 + 1) * reference[1]
    _assert_idle(p, d)
    assert store.lookup(b_hashes) == [Tier.G2] * 7  # tiers are inclusive: still cached in G2


def test_first_token_ends_request_from_g2(pair, prompts, expected) -> None:
    p, d = pair
    a, b = work("a", prompts[0], MAX_NEW), work("b1", prompts[1], max_tokens=1)
    ga, gb = d.reserve(a), d.reserve(b)
    assert _in_g2(d, gb)
    fa, fb = p.submit(a, ga), p.submit(b, gb)
    prefill_all(p, [fa, fb])
    start(d, "a", fa.result())
    start(d, "b1", fb.result())
    got = _tokens(decode_all(d, ["a", "b1"]))
    assert got == {"a": expected[0], "b1": expected[1][:1]}
    _assert_idle(p, d)


def test_prompt_of_whole_blocks_from_g2(pair, prompts, expected) -> None:
    """32 tokens: 8 full blocks, no partial tail; the last one is onboarded by hash too."""
    p, d = pair
    a, b = work("a", prompts[0], MAX_NEW), work("w", prompts[3], MAX_NEW)
    ga, gb = d.reserve(a), d.reserve(b)
    assert _in_g2(d, gb) and len(gb.dest.block_ids) == 8
    fa, fb = p.submit(a, ga), p.submit(b, gb)
    prefill_all(p, [fa, fb])
    start(d, "a", fa.result())
    start(d, "w", fb.result())
    assert d.load().g2_used_blocks == 8  # all pinned, none reserved
    got = _tokens(decode_all(d, ["a", "w"]))
    assert (got["a"], got["w"]) == (expected[0], expected[3])
    assert d.engine.onboarder is not None and d.engine.onboarder.blocks_onboarded == 8
    _assert_idle(p, d)


def test_g1_prefix_hit_at_admission_is_not_copied(pair, prompts, expected) -> None:
    """b shares a's first 5 blocks: by the time b leaves G2, a left them in G1's prefix cache, so
    only b's other 2 full blocks and its tail come up from G2."""
    p, d = pair
    a, b = work("a", prompts[4], MAX_NEW), work("b", prompts[5], MAX_NEW)
    ga, gb = d.reserve(a), d.reserve(b)
    assert _in_g2(d, gb) and gb.num_cached_blocks == 0 and len(gb.dest.block_ids) == 8
    fa, fb = p.submit(a, ga), p.submit(b, gb)
    prefill_all(p, [fa, fb])
    start(d, "a", fa.result())
    start(d, "b", fb.result())
    got = _tokens(decode_all(d, ["a", "b"]))
    assert (got["a"], got["b"]) == (expected[4], expected[5])
    assert d.engine.onboarder is not None and d.engine.onboarder.blocks_onboarded == 2
    assert _store(d).metrics().bytes_onboarded["g2"] == 3 * d.engine.kv_layout.block_bytes
    _assert_idle(p, d)


def test_cancel_while_waiting_in_g2(pair, prompts, expected) -> None:
    p, d = pair
    a, b = work("a", prompts[0], MAX_NEW), work("b", prompts[1], MAX_NEW)
    ga, gb = d.reserve(a), d.reserve(b)
    fa, fb = p.submit(a, ga), p.submit(b, gb)
    prefill_all(p, [fa, fb])
    start(d, "a", fa.result())
    start(d, "b", fb.result())
    assert d.load().waiting == 1 and d.load().g2_used_blocks == 8
    assert d.cancel("b")
    assert d.load().g2_used_blocks == 0 and d.load().waiting == 0
    # only its first token, which came from the prefill worker: nothing was decoded, nothing follows
    assert [c.token_ids for c in take(d, "b")] == [[fb.result().token_id]]
    assert _tokens(decode_all(d, ["a"]))["a"] == expected[0]
    _assert_idle(p, d)


def test_cancel_committed_before_start(pair, prompts) -> None:
    p, d = pair
    a, b = work("a", prompts[0]), work("b", prompts[1])
    ga, gb = d.reserve(a), d.reserve(b)
    prefill_all(p, [p.submit(a, ga), p.submit(b, gb)])
    d.step()
    assert d.load().g2_used_blocks == 8
    assert d.cancel("b") and d.cancel("a")
    _assert_idle(p, d)


def test_cancel_mid_transfer_into_g2(pair, prompts, expected) -> None:
    p, d = pair
    a, b = work("a", prompts[0]), work("b", prompts[1])
    assert not _in_g2(d, d.reserve(a))
    gb = d.reserve(b)
    assert _in_g2(d, gb)
    fut = p.submit(b, gb)
    for _ in range(2):  # 30 tokens at 8 per step: 4 steps
        p.step()
    assert not fut.done() and p.sender.num_in_flight == 1
    p.cancel("b")
    p.step()
    assert d.cancel("b")
    with pytest.raises(Cancelled):
        fut.result(0)
    d.step()
    assert d.load().g2_used_blocks == 0
    assert d.landing is not None and d.landing.num_free_inbox_blocks == INBOX_BLOCKS
    assert d.cancel("a")
    _assert_idle(p, d)


def test_digest_mismatch_into_g2_frees_it(pair, prompts) -> None:
    p, d = pair
    a, b = work("a", prompts[0]), work("bad", prompts[1])
    d.reserve(a)
    gb = d.reserve(b)
    assert _in_g2(d, gb)
    fut = p.submit(b, gb)
    p.sender.corrupt_after_digest = True
    try:
        prefill_all(p, [fut])
    finally:
        p.sender.corrupt_after_digest = False
    with pytest.raises(KVTransferError, match="digest mismatch"):
        fut.result(0)
    d.step()
    (chunk,) = take(d, "bad")
    assert chunk.finished and "digest mismatch" in chunk.error
    assert d.load().g2_used_blocks == 0
    assert d.cancel("a")
    _assert_idle(p, d)


def test_g2_lease_expiry_frees_it(ckpt: Path, prompts, reference) -> None:
    d = DecodeWorker(
        worker_config(
            ckpt, "d-lease", num_blocks=G1_BLOCKS, host_kv_bytes=G2_BLOCKS * reference[1], lease_s=0.05
        )
    )
    try:
        d.reserve(work("a", prompts[0]))
        assert _in_g2(d, d.reserve(work("late", prompts[1])))
        assert d.load().g2_used_blocks == 8
        time.sleep(0.1)
        d.step()
        for rid in ("a", "late"):
            (chunk,) = take(d, rid)
            assert chunk.finished and "deadline passed" in chunk.error
        load = d.load()
        assert (load.used_blocks, load.reserved_blocks, load.g2_used_blocks, load.waiting) == (0, 0, 0, 0)
    finally:
        d.close()


def test_no_room_in_g1_or_g2_is_backpressure(ckpt: Path, prompts, reference) -> None:
    d = DecodeWorker(
        worker_config(ckpt, "d-full", num_blocks=G1_BLOCKS, host_kv_bytes=G2_BLOCKS * reference[1])
    )
    try:
        d.reserve(work("a", prompts[0]))  # 11 G1 blocks
        d.reserve(work("b", prompts[1]))  # 8 G2 blocks; 6 inbox blocks left
        with pytest.raises(NoRoomError, match="G2"):
            d.reserve(work("b2", prompts[1]))
        load = d.load()
        assert (load.used_blocks, load.g2_used_blocks, load.waiting) == (11, 8, 2)
        d.cancel("a")
        d.cancel("b")
        assert (d.load().used_blocks, d.load().g2_used_blocks) == (0, 0)
    finally:
        d.close()


def test_commit_host_pins_full_blocks_and_keeps_the_tail_reserved() -> None:
    """The TierStore contract the landing relies on, with exact slots and counts."""
    import torch

    from engine.kv_layout import KVLayout
    from memory_tiers.device_pool import TorchDevicePool
    from memory_tiers.tier_store import TierConfig

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
    kv = layout.allocate(4)  # (L, N, 2, H_kv, B, D)
    kv[:, 0] = 7.0
    store = TierStore(layout, TorchDevicePool(kv, layout), TierConfig(host_blocks=6))
    h = [bytes([i + 1]) * 16 for i in range(3)]
    assert store.offload(h[1], 0)  # h1 already cached in G2 (slot 0)
    assert store.host_room() == 6 and store.num_host_in_use == 0
    assert store.reserve_host("r", 3) == [1, 2, 3]
    assert store.num_host_in_use == 3 and store.host_room() == 3
    store.commit_host("r", [h[0], h[1]])  # slot 1 -> h0; slot 2 freed (h1 keeps slot 0); slot 3 stays
    assert dict(store.slots.cached) == {h[1]: 0, h[0]: 1}
    assert store.slots.reserved == {"r": [3]} and store.slots.pins == {h[0]: 1, h[1]: 1}
    assert store.num_host_in_use == 3  # 2 pinned + 1 reserved
    assert store.host_room() == 3  # slot 2 and the two free ones; pinned blocks are not room
    store.check()
    assert store.reserve_host("x", 4) is None  # pinned blocks are never evicted for room
    for x in (h[0], h[1]):
        store.unpin(x)
    store.release_host("r")
    assert store.num_host_in_use == 0 and store.host_room() == 6
    assert torch.equal(store.host_block(0), kv[:, 0])
    store.check()
    got = store.reserve_host("y", 1)
    with pytest.raises(ValueError, match="2 hashes for 1 reserved"):
        store.commit_host("y", [h[2], h[0]])
    assert store.slots.reserved == {"y": got} and not store.slots.pins  # unchanged
    store.release_host("y")
    store.check()
    store.close()
