"""SlotIndex: exact slot states, LRU victim order, pins, spills, and the invariant check."""

from __future__ import annotations

import pytest

from memory_tiers.slot_index import SlotIndex

pytestmark = pytest.mark.unit

H = [bytes([i]) * 16 for i in range(8)]


def test_slots_are_handed_out_in_order_and_victims_are_lru_first() -> None:
    idx = SlotIndex(4)
    for i in range(3):
        idx.insert(H[i], idx.take())
    assert dict(idx.cached) == {H[0]: 0, H[1]: 1, H[2]: 2}
    assert idx.num_free == 1 and idx.num_used == 3
    idx.touch(H[0])
    assert idx.victims(3) == [H[1], H[2], H[0]]
    assert idx.remove(H[1]) == 1
    slot = idx.take()
    assert slot == 1  # the slot just freed is reused first
    idx.insert(H[3], slot)
    idx.check()


def test_pinned_blocks_are_never_victims() -> None:
    idx = SlotIndex(3)
    for i in range(3):
        idx.insert(H[i], idx.take())
    idx.pin(H[0])
    idx.pin(H[0])
    assert idx.victims(3) == [H[1], H[2]]
    idx.unpin(H[0])
    assert idx.victims(1) == [H[1]]
    idx.unpin(H[0])
    assert idx.victims(1) == [H[0]]
    with pytest.raises(AssertionError):
        idx.pin(H[5])
    idx.check()


def test_spill_keeps_slot_until_finished_and_a_pin_keeps_it_cached() -> None:
    idx = SlotIndex(2)
    idx.insert(H[0], idx.take())
    idx.insert(H[1], idx.take())
    assert idx.start_spill(H[0]) == 0
    assert H[0] in idx and idx.slot_of(H[0]) == 0 and idx.victims(2) == [H[1]]
    assert idx.num_free == 0
    idx.check()
    assert idx.finish_spill(H[0]) is True
    assert idx.free == [0] and H[0] not in idx
    idx.start_spill(H[1])
    idx.pin(H[1])
    assert idx.finish_spill(H[1]) is False
    assert dict(idx.cached) == {H[1]: 1}
    idx.check()


def test_reservations_and_check_catches_a_slot_in_two_states() -> None:
    idx = SlotIndex(3)
    got = [idx.take(), idx.take()]
    idx.reserve("r1", got)
    assert got == [0, 1] and idx.num_free == 1
    idx.check()
    assert idx.release("r1") == [0, 1]
    assert idx.release("r1") == []
    idx.cached[H[0]] = 2  # slot 2 is also still on the free list: an accounting bug
    with pytest.raises(AssertionError, match="two states"):
        idx.check()
