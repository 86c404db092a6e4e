"""BlockManager: exact block ids, ref counts, prefix reuse, LRU eviction and on_evict order."""

from __future__ import annotations

import pytest

from engine.block_hash import BlockHash, hash_blocks
from engine.block_manager import BlockManager
from engine.sequence import Sequence

pytestmark = pytest.mark.unit

FP = "test-model"


def make_bm(num_blocks: int = 8, block_size: int = 4, **kw) -> tuple[BlockManager, list]:
    evicted: list[tuple[BlockHash, int]] = []
    bm = BlockManager(num_blocks, block_size, FP, on_evict=lambda h, b: evicted.append((h, b)), **kw)
    return bm, evicted


def run_prompt(bm: BlockManager, seq: Sequence) -> None:
    """Admit and compute the whole prompt in one step, as the scheduler would."""
    assert bm.allocate_prompt(seq)
    assert bm.append_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq, seq.num_computed_tokens)


def test_fresh_allocation_ids_and_refcounts() -> None:
    bm, _ = make_bm()
    seq = Sequence("a", list(range(10)))
    assert bm.allocate_prompt(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    assert bm.append_slots(seq, 6)
    assert seq.block_table == [0, 1]
    assert bm.append_slots(seq, 6)  # positions [0, 6) still: already covered, nothing added
    assert seq.block_table == [0, 1]
    seq.num_computed_tokens = 6
    assert bm.append_slots(seq, 4)  # positions [6, 10) need block 2
    assert seq.block_table == [0, 1, 2]
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3


def test_append_slots_short_changes_nothing() -> None:
    bm, _ = make_bm(num_blocks=3)
    seq = Sequence("a", list(range(20)))
    assert bm.allocate_prompt(seq)
    assert not bm.can_append(seq, 13)
    assert not bm.append_slots(seq, 13)  # needs 4 blocks, 3 exist
    assert seq.block_table == [] and bm.num_free_blocks == 3
    assert bm.can_append(seq, 12)
    assert bm.append_slots(seq, 12)
    assert seq.block_table == [0, 1, 2] and bm.num_free_blocks == 0


def test_free_returns_unhashed_blocks_tail_first_to_the_right() -> None:
    bm, evicted = make_bm(num_blocks=6, enable_prefix_caching=False)
    a, b = Sequence("a", list(range(6))), Sequence("b", list(range(6)))
    run_prompt(bm, a)
    run_prompt(bm, b)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    bm.free(a)
    assert a.block_table == [] and bm.num_used_blocks == 2
    c = Sequence("c", list(range(100, 116)))
    run_prompt(bm, c)
    # free deque was [4, 5] + [1, 0] (a freed tail first)
    assert c.block_table == [4, 5, 1, 0]
    # prefix caching off: b's identical prompt was never cached, nothing is evicted
    assert bm.lookup_prefix(list(range(6))) == 0 and evicted == []
    bm.free(b)
    bm.free(c)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 0


def test_prefix_reuse_of_full_blocks_only() -> None:
    bm, _ = make_bm()
    prompt = list(range(10))  # blocks [0..4) [4..8) full, [8, 10) partial
    a = Sequence("a", prompt)
    run_prompt(bm, a)
    assert a.block_table == [0, 1, 2]
    assert bm.lookup_prefix(prompt) == 2
    assert bm.block_hashes("a") == hash_blocks(prompt, 4, FP)
    assert bm.block_hash_of(0) == hash_blocks(prompt, 4, FP)[0] and bm.block_hash_of(2) is None

    b = Sequence("b", prompt + [99, 98])  # shares 10 tokens, but only 2 full blocks are cached
    assert bm.allocate_prompt(b)
    assert b.block_table == [0, 1]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert [bm.ref_count(i) for i in range(4)] == [2, 2, 1, 0]
    assert bm.append_slots(b, 4)
    assert b.block_table == [0, 1, 3]  # the shared partial block 2 is not reused
    bm.free(a)
    bm.free(b)
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == 8


def test_prefix_hit_is_capped_to_leave_one_token() -> None:
    bm, _ = make_bm()
    prompt = list(range(8))
    a = Sequence("a", prompt)
    run_prompt(bm, a)
    assert bm.lookup_prefix(prompt) == 2
    b = Sequence("b", list(prompt))  # fully cached: the last block is recomputed for its logits
    assert bm.prefix_hit_tokens(b) == 4
    assert bm.allocate_prompt(b)
    assert b.block_table == [0] and b.num_computed_tokens == 4
    assert bm.append_slots(b, 4)
    assert b.block_table == [0, 2]
    b.num_computed_tokens = 8
    bm.mark_computed(b, 8)
    assert bm.block_hash_of(2) is None  # duplicate of block 1: first copy stays canonical
    assert bm.block_hashes("b") == hash_blocks(prompt, 4, FP)
    bm.free(b)
    bm.free(a)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2


def test_different_prefix_misses_and_chain_breaks() -> None:
    bm, _ = make_bm()
    run_prompt(bm, Sequence("a", list(range(12))))
    assert bm.lookup_prefix([0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11]) == 1  # block 2 equal, parent not
    assert bm.lookup_prefix([5, 1, 2, 3]) == 0
    assert bm.lookup_prefix(list(range(12))) == 3
    assert bm.lookup_prefix(list(range(11))) == 2


def test_hit_confirmed_by_tokens_not_only_hash() -> None:
    bm, _ = make_bm()
    h = hash_blocks([1, 2, 3, 4], 4, FP)[0]
    bm.register(5, h, token_ids=[9, 9, 9, 9])  # a (simulated) collision: tokens disagree
    assert bm.lookup_prefix([1, 2, 3, 4]) == 0
    bm.register(5, h, token_ids=[1, 2, 3, 4])
    assert bm.lookup_prefix([1, 2, 3, 4]) == 1


def test_register_free_block_makes_it_a_hit() -> None:
    bm, evicted = make_bm(num_blocks=4)
    tokens = list(range(8))
    h0, h1 = hash_blocks(tokens, 4, FP)
    bm.register(3, h0)  # onboarded KV, tokens unknown: the hash is trusted
    bm.register(2, h1, token_ids=tokens[4:])
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    seq = Sequence("s", tokens + [8])
    assert bm.allocate_prompt(seq)
    assert seq.block_table == [3, 2] and seq.num_computed_tokens == 8
    assert bm.append_slots(seq, 1)
    assert seq.block_table == [3, 2, 0]
    bm.register(1, h0)  # a second copy of a known hash is ignored
    assert bm.block_hash_of(1) is None
    bm.free(seq)
    assert bm.num_used_blocks == 0 and evicted == []


def test_lru_eviction_order_and_on_evict() -> None:
    bm, evicted = make_bm(num_blocks=6, block_size=2)
    a, b = Sequence("a", [1, 2, 3, 4, 5]), Sequence("b", [6, 7, 8, 9])
    run_prompt(bm, a)  # blocks 0, 1 hashed; 2 partial
    run_prompt(bm, b)  # blocks 3, 4 hashed
    ha, hb = hash_blocks(a.all_token_ids, 2, FP), hash_blocks(b.all_token_ids, 2, FP)
    bm.free(a)  # tail first: 2 -> free deque; cached LRU: 1, 0
    bm.free(b)  # cached LRU: 1, 0, 4, 3
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0 and bm.num_cached_blocks == 4

    # A hit takes block 0 out of the LRU; freeing it again puts it at the most recent end.
    a2 = Sequence("a2", [1, 2, 9])
    assert bm.allocate_prompt(a2) and a2.block_table == [0]
    assert bm.append_slots(a2, 1) and a2.block_table == [0, 5]  # truly free blocks go first
    bm.free(a2)  # 5 -> free deque (unhashed), 0 -> LRU end: 1, 4, 3, 0
    assert evicted == []

    c = Sequence("c", list(range(100, 112)))  # 6 blocks: free deque [2, 5], then evict 1, 4, 3, 0
    run_prompt(bm, c)
    assert c.block_table == [2, 5, 1, 4, 3, 0]
    assert evicted == [(ha[1], 1), (hb[1], 4), (hb[0], 3), (ha[0], 0)]
    assert bm.lookup_prefix(a.all_token_ids) == 0
    bm.free(c)
    assert bm.num_used_blocks == 0


def test_allocate_prompt_refuses_when_no_block_left_for_the_rest() -> None:
    bm, _ = make_bm(num_blocks=2)
    a = Sequence("a", list(range(8)))
    run_prompt(bm, a)  # holds both blocks, both hashed
    b = Sequence("b", list(range(8)) + [50])  # would hit both blocks, but none left for token 8
    assert bm.prefix_hit_tokens(b) == 8
    assert not bm.can_allocate(b, 1)
    assert not bm.allocate_prompt(b)
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert [bm.ref_count(i) for i in range(2)] == [1, 1]
    bm.free(a)  # now both are cached-free; b's hits would take both of them
    assert not bm.can_allocate(b, 1) and not bm.allocate_prompt(b)
    c = Sequence("c", list(range(4)) + [60])  # hits block 0, block 1 is evictable
    assert bm.can_allocate(c, 1) and bm.allocate_prompt(c)
    assert bm.append_slots(c, 1)
    assert c.block_table == [0, 1]
    bm.free(c)
    assert bm.num_used_blocks == 0


def test_mark_computed_hashes_outputs_incrementally() -> None:
    bm, _ = make_bm()
    seq = Sequence("s", [1, 2, 3])
    run_prompt(bm, seq)
    assert bm.block_hashes("s") == []
    for tok in (4, 5, 6, 7, 8):  # decode: each step computes the previously sampled token
        seq.output_token_ids.append(tok)
        assert bm.append_slots(seq, 1)
        seq.num_computed_tokens += 1
        bm.mark_computed(seq, seq.num_computed_tokens)
    assert seq.block_table == [0, 1]
    assert bm.block_hashes("s") == hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, FP)
    assert bm.lookup_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9]) == 2
    bm.free(seq)
    assert bm.block_hashes("s") == [] and bm.num_used_blocks == 0


def test_evict_cached_offloads_lru_first_and_frees_the_blocks() -> None:
    bm, evicted = make_bm()
    seq = Sequence("a", list(range(9)))  # two full blocks (hashed) + one partial
    run_prompt(bm, seq)
    table = list(seq.block_table)
    bm.free(seq)  # tail first: the partial block is plain-free, then block 1, then block 0 cached
    assert bm.num_cached_blocks == 2
    assert bm.evict_cached(1) == 1
    hashes = hash_blocks(list(range(9)), 4, FP)
    assert evicted == [(hashes[1], table[1])]  # the tail of the prefix leaves first
    assert bm.evict_cached() == 1
    assert evicted == [(hashes[1], table[1]), (hashes[0], table[0])]
    assert bm.num_cached_blocks == 0 and bm.lookup_prefix(list(range(9))) == 0
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0


def test_take_register_release_makes_an_onboarded_block_a_prefix_hit() -> None:
    bm, evicted = make_bm(num_blocks=3)
    tokens = list(range(8))
    hashes = hash_blocks(tokens, 4, FP)
    ids = [bm.take_block(), bm.take_block()]
    assert ids == [0, 1] and bm.num_used_blocks == 2
    for block_id, h, start in zip(ids, hashes, (0, 4), strict=True):
        bm.register(block_id, h, tokens[start : start + 4])  # KV copied in from G2 / G3
        bm.release_block(block_id)
    assert bm.num_used_blocks == 0 and bm.lookup_prefix(tokens) == 2
    seq = Sequence("b", tokens + [99])
    assert bm.allocate_prompt(seq)
    assert seq.block_table == [0, 1] and seq.num_cached_tokens == 8
    bm.free(seq)
    assert bm.take_block() == 2  # plain free first
    assert bm.take_block() == 1  # then the LRU cached block (freed tail-first), offloaded first
    assert evicted == [(hashes[1], 1)]
    assert bm.take_block() == 0
    assert bm.take_block() is None  # everything in use
    for block_id in (0, 1, 2):
        bm.release_block(block_id)
    assert bm.num_used_blocks == 0
