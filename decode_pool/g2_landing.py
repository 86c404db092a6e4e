"""G2 landing: a handed-off prompt whose KV does not fit in G1 lands in host memory and waits there.

One request's way through (every step under the decode worker's lock)::

    reserve  ─▶ G2 slots (TierStore.reserve_host) + inbox blocks under a KV lease; the grant's
                destination is the inbox, which the sender WRITEs into like any receiver's pool
    commit   ─▶ (every layer verified) inbox blocks copied into the G2 slots; the full blocks
                become cached G2 blocks under their chained hashes, pinned; a partial tail block
                stays a reserved slot; the lease ends and the inbox blocks are free again
    onboard  ─▶ (G1 has room: the engine reserved the prompt's blocks) G2 → G1 through the
                engine's TierOnboarder by hash, the tail from its slot; pins dropped, tail freed;
                the full blocks stay cached in G2 (tiers are inclusive)
    release  ─▶ at any point before: lease dropped, inbox blocks and G2 slots freed, pins dropped

Why an inbox and not the G2 slots themselves: every transport addresses a pool layer-major,
``(L, N, 2, H_kv, B, D)`` (kv_transfer/pool.py), while G2 is slot-major, ``(N2, L, 2, H_kv, B, D)``
— one block across all layers contiguous, which the disk tier writes with O_DIRECT. The inbox is a
layer-major host pool registered with the transport once (its own receiver, so the sender needs
nothing new), sized for the transfers in flight; the extra host copy per block is cheap next to
the transfer. A transport that could address a slot-major pool would let the sender WRITE straight
into the slots and drop the inbox.

Accounting: G2 slots in use (reserved or pinned) are ``TierStore.num_host_in_use``; the room a new
reservation could get is ``room`` (G2 room, bounded by the free inbox blocks).
Lifecycle: construct (allocates and registers the inbox) → reserve / poll / commit / onboard /
release → close (idempotent; releases what is left).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.block_hash import BlockHash, hash_blocks
from engine.llm_engine import LLMEngine
from engine.sequence import Sequence
from kv_transfer.transport import Completed, Failed, KVDestination, KVTransport
from memory_tiers.tier_store import TierStore


def _np_bytes(t: torch.Tensor) -> Any:
    """A contiguous CPU tensor's bytes as a numpy array of its shape (last dim in bytes), no copy:
    numpy has no bfloat16, and raw bytes copy the same for every dtype."""
    return t.view(torch.uint8).numpy()


@dataclass(slots=True)
class _HostKV:
    prompt_ids: list[int]
    inbox_ids: list[int]  # until commit
    slots: list[int]  # G2 slots, one per prompt block, in prompt order
    hashes: list[BlockHash] = field(default_factory=list)  # after commit: the pinned full blocks
    committed: bool = False


class HostLanding:
    def __init__(
        self, engine: LLMEngine, store: TierStore, transport: KVTransport, num_inbox_blocks: int
    ) -> None:
        if engine.tier_store is not store or engine.onboarder is None:
            raise ValueError("a G2 landing needs the tier store below the engine's G1 (tiers with G2 room)")
        if num_inbox_blocks <= 0:
            raise ValueError(f"num_inbox_blocks must be > 0, got {num_inbox_blocks}")
        self.store = store
        self.onboarder = engine.onboarder
        self.layout = engine.kv_layout
        self.block_size = self.layout.block_size
        self.fingerprint = engine.block_manager.fingerprint
        self.num_inbox_blocks = num_inbox_blocks
        # (L, N_in, 2, H_kv, B, D); empty, not zeroed: only verified bytes are ever read, and
        # untouched pages cost no memory until a transfer lands there
        self.inbox = torch.empty(self.layout.pool_shape(num_inbox_blocks), dtype=self.layout.torch_dtype)
        self._inbox_bytes = _np_bytes(self.inbox)  # (L, N_in, 2, H_kv, B, D * itemsize) uint8
        self.receiver = transport.receiver(self.inbox)
        self._free: deque[int] = deque(range(num_inbox_blocks))  # popped left, freed appended right
        self._held: dict[str, _HostKV] = {}
        self._closed = False

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def room(self) -> int:
        """Blocks a reservation could get now."""
        return min(len(self._free), self.store.host_room())

    @property
    def num_free_inbox_blocks(self) -> int:
        return len(self._free)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    # -- one request ------------------------------------------------------------------------------
    def reserve(
        self, request_id: str, prompt_ids: list[int], lease_s: float, parts: tuple[tuple[int, int], ...] = ()
    ) -> KVDestination | None:
        """G2 slots and inbox blocks for the whole prompt, and the inbox destination; None (nothing
        changed) when either is short."""
        n = self.layout.blocks_for(len(prompt_ids))
        if n > len(self._free):
            return None  # checked first: reserve_host may evict G2 blocks to make room
        slots = self.store.reserve_host(request_id, n)
        if slots is None:
            return None
        inbox_ids = [self._free.popleft() for _ in range(n)]
        try:
            dest = self.receiver.reserve(request_id, inbox_ids, self.layout.num_layers, lease_s, parts)
        except BaseException:
            self._free.extend(inbox_ids)
            self.store.release_host(request_id)
            raise
        self._held[request_id] = _HostKV(list(prompt_ids), inbox_ids, slots)
        return dest

    def poll(self) -> list[Completed | Failed]:
        return self.receiver.poll()

    def commit(self, request_id: str) -> None:
        """Every layer arrived and was verified: move the KV from the inbox into G2."""
        kv = self._held[request_id]
        self.receiver.release(request_id)
        for b, slot in zip(kv.inbox_ids, kv.slots, strict=True):
            # numpy: one memcpy per layer; torch's strided copy_ runs 10x slower here when the
            # machine is busy (its intra-op threads)
            _np_bytes(self.store.host_block(slot))[:] = self._inbox_bytes[:, b]  # (L, 2, H_kv, B, D*)
        self._free.extend(kv.inbox_ids)
        kv.inbox_ids = []
        kv.hashes = hash_blocks(kv.prompt_ids, self.block_size, self.fingerprint)
        self.store.commit_host(request_id, kv.hashes)
        kv.committed = True

    def onboard(self, request_id: str, seq: Sequence) -> bool:
        """Fill the G1 blocks ``engine.reserve_prompt`` gave ``seq`` (after its G1 prefix hit) from
        G2, then let go of G2. False when a block could not be copied (the request must fail)."""
        kv = self._held[request_id]
        assert kv.committed, f"{request_id}: KV not committed"
        table, full = seq.block_table, len(kv.hashes)
        skip = seq.num_cached_tokens // self.block_size  # G1 prefix hit: in place already
        ok = self.onboarder.onboard_into(table[skip:full], kv.hashes[skip:full])
        if ok and len(table) > full:  # the partial tail block, from its reserved slot
            self.store.copy_host_to_device(kv.slots[full], table[full])
        self.release(request_id)
        return ok

    def release(self, request_id: str) -> bool:
        """Give back whatever the request holds here; False if it holds nothing."""
        kv = self._held.pop(request_id, None)
        if kv is None:
            return False
        if not kv.committed:
            self.receiver.release(request_id)  # harmless when the receiver already dropped it
            self._free.extend(kv.inbox_ids)
        for h in kv.hashes:
            self.store.unpin(h)
        self.store.release_host(request_id)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for rid in list(self._held):
            self.release(rid)
        self.receiver.close()
