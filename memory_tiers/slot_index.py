"""Exact slot accounting for the host tier (G2): which slot is free, cached, reserved or spilling.

Pure Python on integers (no torch), so eviction order and the accounting invariants are tested
alone. Every slot is in exactly one state::

    FREE ──take──▶ RESERVED(request) ──release(hash)──▶ CACHED(hash) ──start_spill──▶ SPILLING(hash)
     ▲                    │ release(None)                 │ drop / evict                   │ finish_spill
     └────────────────────┴───────────────────────────────┴────────────────────────────────┘

A CACHED slot sits in an LRU order (least recently used first) and carries a pin count; a pinned
slot is never chosen as a victim. A SPILLING slot is being written to the disk tier: it still
serves reads, but it is not a victim again and becomes FREE (or CACHED again if it was pinned
meanwhile) when its write ends.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.block_hash import BlockHash


@dataclass(slots=True)
class SlotIndex:
    capacity: int
    free: list[int] = field(default_factory=list)
    cached: OrderedDict[BlockHash, int] = field(default_factory=OrderedDict)  # LRU first
    spilling: dict[BlockHash, int] = field(default_factory=dict)
    reserved: dict[str, list[int]] = field(default_factory=dict)  # request id -> slots
    pins: dict[BlockHash, int] = field(default_factory=dict)  # hash -> pin count (> 0)

    def __post_init__(self) -> None:
        # Popped from the end, so slot 0 is handed out first: tests can name exact slots.
        self.free = list(range(self.capacity - 1, -1, -1))

    # -- queries ---------------------------------------------------------------------------------
    def slot_of(self, h: BlockHash) -> int | None:
        slot = self.cached.get(h)
        return slot if slot is not None else self.spilling.get(h)

    def __contains__(self, h: BlockHash) -> bool:
        return h in self.cached or h in self.spilling

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self.free)

    def is_pinned(self, h: BlockHash) -> bool:
        return self.pins.get(h, 0) > 0

    def victims(self, n: int) -> list[BlockHash]:
        """Up to ``n`` least recently used cached, unpinned hashes (not removed)."""
        out: list[BlockHash] = []
        for h in self.cached:
            if len(out) == n:
                break
            if not self.is_pinned(h):
                out.append(h)
        return out

    # -- moves -----------------------------------------------------------------------------------
    def take(self) -> int:
        """A free slot (raises IndexError when none is free)."""
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        """Return a taken (or released reserved) slot to the free list."""
        self.free.append(slot)

    def insert(self, h: BlockHash, slot: int) -> None:
        """Make a slot just taken (or a reserved one) CACHED as the most recently used."""
        assert h not in self.cached and h not in self.spilling, "hash already in G2"
        self.cached[h] = slot

    def touch(self, h: BlockHash) -> None:
        if h in self.cached:
            self.cached.move_to_end(h)

    def remove(self, h: BlockHash) -> int:
        """Drop a cached, unpinned block; its slot becomes free."""
        assert not self.is_pinned(h), "a pinned block is never evicted"
        slot = self.cached.pop(h)
        self.free.append(slot)
        return slot

    def start_spill(self, h: BlockHash) -> int:
        assert not self.is_pinned(h), "a pinned block is never evicted"
        slot = self.cached.pop(h)
        self.spilling[h] = slot
        return slot

    def finish_spill(self, h: BlockHash) -> bool:
        """End a spill; True when the slot was freed, False when a pin kept it cached."""
        slot = self.spilling.pop(h)
        if self.is_pinned(h):
            self.cached[h] = slot
            return False
        self.free.append(slot)
        return True

    def pin(self, h: BlockHash) -> None:
        assert h in self, "pin of a hash not in G2"
        self.pins[h] = self.pins.get(h, 0) + 1

    def unpin(self, h: BlockHash) -> None:
        count = self.pins[h] - 1
        if count:
            self.pins[h] = count
        else:
            del self.pins[h]

    def reserve(self, request_id: str, slots: list[int]) -> None:
        self.reserved.setdefault(request_id, []).extend(slots)

    def release(self, request_id: str) -> list[int]:
        return self.reserved.pop(request_id, [])

    # -- invariants --------------------------------------------------------------------------------
    def check(self) -> None:
        """Every slot in exactly one state; pins only on present hashes."""
        seen: list[int] = list(self.free)
        seen += self.cached.values()
        seen += self.spilling.values()
        for slots in self.reserved.values():
            seen += slots
        assert len(seen) == len(set(seen)), f"a slot is in two states: {sorted(seen)}"
        assert sorted(seen) == list(range(self.capacity)), "a slot is lost or out of range"
        assert not set(self.cached) & set(self.spilling), "a hash both cached and spilling"
        for h, count in self.pins.items():
            assert count > 0 and h in self, "pin on an absent hash"
