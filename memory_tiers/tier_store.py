"""TierStore: G2 host and G3 disk behind one API keyed by the chained block hash; G1 via a DevicePool.

G1 accounting stays with the engine's BlockManager; this store copies bytes and keeps G2/G3::

    G1 (BlockManager) ──offload(h, id)──▶ G2 host slots (LRU) ──spill, async──▶ G3 files (LRU)
         ▲                                   │                                  │ full: drop LRU file
         └────────── onboard(h, id) ─────────┴───── (G3: a Future, read thread) ┘

- ``offload`` is meant for BlockManager's ``on_evict`` hook: one copy G1 -> G2. When G2 runs low
  (``spill_watermark``), its LRU unpinned blocks are written to G3 in the background; their slot
  stays readable until the write ends. Only when G2 is full of blocks being written does a caller
  wait (for the first write to end).
- ``onboard`` copies a block back into a G1 block id: from G2 at once, from G3 on a read thread
  (a Future), so a decode step never waits on the disk. Tiers are inclusive: an onboarded block
  stays where it was.
- ``reserve_host`` hands out G2 slots to a request whose incoming KV does not fit in G1 (so a
  prefill is never blocked by decode's memory pressure); ``release_host`` frees them or keeps them
  as cached blocks; ``commit_host`` makes the arrived full blocks cached and pinned while the
  request waits for G1.
- Pinned blocks are never evicted. ``check()`` asserts the exact accounting.

Lifecycle: construct (G3 index rebuilt from its directory) → serve (thread-safe) → ``close()``
(waits for writes and reads; idempotent).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine.block_hash import BlockHash
from engine.kv_layout import KVLayout
from memory_tiers.device_pool import DevicePool, block_shape
from memory_tiers.disk_format import layout_fingerprint
from memory_tiers.disk_tier import DiskTier
from memory_tiers.host_tier import HostPool, aligned_tensor, as_bytes
from memory_tiers.metadata import BlockEvent, EventKind, Tier
from memory_tiers.metrics import TierCounters, TierMetrics
from memory_tiers.slot_index import SlotIndex


@dataclass(frozen=True, slots=True)
class TierConfig:
    """G2 / G3 capacities and the store's knobs: the one tier configuration (a deployment's
    ``tiers`` section derives it, deploy/derive.py)."""

    host_blocks: int = 0  # G2 slots
    host_bytes: int = 0  # alternative to host_blocks: G2 bytes, turned into slots by EngineTiers
    disk_dir: str | None = None  # None: no G3
    disk_bytes: int = 0
    direct_io: bool = True  # O_DIRECT for G3 when buffers and sizes allow it
    # fdatasync each G3 file before its rename. Off by default: the rename alone makes a write atomic
    # for a crashed process, and after a power loss a renamed file whose data did not reach the disk
    # fails its checksum and is dropped, never served. Turning it on buys a cache that survives a
    # power cut, at about half the write bandwidth (docs/benchmarks-tiers.md).
    fsync: bool = False
    spill_watermark: float = 0.1  # keep this fraction of G2 free (or being spilled) when G3 exists
    model_fingerprint: str = ""  # names the model, so G3 files of another model are never served
    read_threads: int = 4  # G3 reads in flight (and staging buffers); disks like a deeper queue
    pin_host: bool | None = None  # None: pinned when a GPU exists


def _done(value: bool) -> Future[bool]:
    f: Future[bool] = Future()
    f.set_result(value)
    return f


class TierStore:
    def __init__(
        self,
        layout: KVLayout,
        device: DevicePool,
        config: TierConfig,
        worker_id: str = "local",
        publish: Callable[[list[BlockEvent]], None] | None = None,
    ) -> None:
        self.layout = layout
        self.device = device
        self.config = config
        self.worker_id = worker_id
        self._publish = publish
        self._bb = layout.block_bytes
        self.host = HostPool(layout, config.host_blocks, config.pin_host)
        self.slots = SlotIndex(config.host_blocks)
        self._cond = threading.Condition()
        self._ev_lock = threading.Lock()  # a leaf lock: taken under the others, never around them
        self._events: list[BlockEvent] = []
        self._pin_where: dict[BlockHash, list[Tier]] = {}
        self._counters = TierCounters()
        self._closed = False
        self.disk: DiskTier | None = None
        if config.disk_dir is not None:
            fp = layout_fingerprint(layout, config.model_fingerprint)
            self.disk = DiskTier(
                config.disk_dir,
                self._bb,
                config.disk_bytes,
                fp,
                config.direct_io,
                config.fsync,
                on_removed=lambda h: self._emit(EventKind.REMOVED, Tier.G3, h),
            )
            for h in self.disk.hashes():  # a restarted worker announces what it still holds
                self._emit(EventKind.STORED, Tier.G3, h)
        self._readers = ThreadPoolExecutor(config.read_threads, thread_name_prefix="g3-read")
        # Page-aligned staging buffers for G3 reads (O_DIRECT), one per read thread.
        self._staging: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._staging_mmaps = []
        for _ in range(config.read_threads if self.disk is not None else 0):
            t, mm = aligned_tensor(block_shape(layout), layout.torch_dtype)  # (L, 2, H_kv, B, D)
            self._staging_mmaps.append(mm)
            self._staging.put(t)
        self._flush_events()

    # -- events ------------------------------------------------------------------------------------
    def _emit(self, kind: EventKind, tier: Tier, h: BlockHash) -> None:
        with self._ev_lock:
            self._events.append(BlockEvent(kind, self.worker_id, tier, h))

    def _flush_events(self) -> None:
        with self._ev_lock:
            events, self._events = self._events, []
        if events and self._publish is not None:
            self._publish(events)

    # -- G2 room (lock held) -------------------------------------------------------------------------
    def _evict(self, h: BlockHash) -> None:
        """Move one cached, unpinned G2 block out: spill it to G3 (async) or drop it."""
        if self.disk is not None and h not in self.disk:
            slot = self.slots.start_spill(h)
            fut = self.disk.write_async(h, self.host.slot_bytes(slot), lambda ok: self._spill_done(h, ok))
            if fut is not None:
                return
            self.slots.finish_spill(h)
            self._counters.dropped += 1
        else:
            self.slots.remove(h)
            if self.disk is None:
                self._counters.dropped += 1
        self._emit(EventKind.REMOVED, Tier.G2, h)

    def _spill_done(self, h: BlockHash, ok: bool) -> None:
        with self._cond:
            freed = self.slots.finish_spill(h)
            if freed:
                self._emit(EventKind.REMOVED, Tier.G2, h)
            if ok:
                self._counters.bytes_spilled += self._bb
                self._emit(EventKind.STORED, Tier.G3, h)
            elif freed:
                self._counters.dropped += 1
            self._cond.notify_all()
        self._flush_events()

    def _make_free(self, n: int) -> bool:
        """Make ``n`` G2 slots free, evicting LRU unpinned blocks; waits only for spills in flight."""
        if self.slots.num_free >= n:
            return True
        have = self.slots.num_free + len(self.slots.spilling)
        if have + len(self.slots.victims(n - have)) < n:
            return False  # refuse up front rather than evict blocks for a request that cannot fit
        while self.slots.num_free < n:
            short = n - self.slots.num_free - len(self.slots.spilling)
            if short > 0:
                for h in self.slots.victims(short):
                    self._evict(h)
            if self.slots.num_free >= n:
                return True
            if not self.slots.spilling:
                if not self.slots.victims(1):
                    return False
                continue
            self._cond.wait()
        return True

    def _spill_ahead(self) -> None:
        if self.disk is None:
            return
        deficit = int(self.config.spill_watermark * self.slots.capacity)
        deficit -= self.slots.num_free + len(self.slots.spilling)
        if deficit > 0:
            for h in self.slots.victims(deficit):
                self._evict(h)

    # -- offload / lookup / onboard ------------------------------------------------------------------
    def offload(self, h: BlockHash, g1_block_id: int) -> bool:
        """Copy G1 block ``g1_block_id`` (holding ``h``) into G2; False when G2 has no room."""
        with self._cond:
            if h in self.slots:
                self.slots.touch(h)
                return True
            if not self._make_free(1):
                self._counters.dropped += 1
                ok = False
            else:
                slot = self.slots.take()
                self.device.read_block(g1_block_id, self.host.slot(slot))
                self.slots.insert(h, slot)
                self._counters.bytes_offloaded += self._bb
                self._emit(EventKind.STORED, Tier.G2, h)
                self._spill_ahead()
                ok = True
        self._flush_events()
        return ok

    def on_evict(self, h: BlockHash, g1_block_id: int) -> None:
        """BlockManager's ``on_evict`` hook: offload a cached G1 block before it is repurposed."""
        self.offload(h, g1_block_id)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[Tier]:
        """Tiers of the longest prefix of ``hashes`` held in G2 or G3 (G2 when in both)."""
        out: list[Tier] = []
        c = self._counters
        with self._cond:
            for h in hashes:
                if h in self.slots:
                    c.hits["g2"] += 1
                    out.append(Tier.G2)
                    continue
                c.misses["g2"] += 1
                if self.disk is not None:
                    if h in self.disk:
                        c.hits["g3"] += 1
                        out.append(Tier.G3)
                        continue
                    c.misses["g3"] += 1
                break
        return out

    def onboard(self, h: BlockHash, g1_block_id: int) -> Future[bool]:
        """Copy ``h`` into G1 block ``g1_block_id``. Done at once from G2; from G3 on a read thread.

        The Future's result is False when the block is absent (or its file turned out corrupt):
        the caller recomputes it.
        """
        with self._cond:
            slot = self.slots.slot_of(h)
            if slot is not None:
                self.device.write_block(g1_block_id, self.host.slot(slot))
                self.slots.touch(h)
                self._counters.bytes_onboarded["g2"] += self._bb
                return _done(True)
            if self.disk is None or not self.disk.pin(h):
                return _done(False)
        return self._readers.submit(self._read_job, h, g1_block_id)

    def _read_job(self, h: BlockHash, g1_block_id: int) -> bool:
        assert self.disk is not None
        buf = self._staging.get()
        try:
            ok = self.disk.read(h, as_bytes(buf))
            if ok:
                self.device.write_block(g1_block_id, buf)
        finally:
            self._staging.put(buf)
            self.disk.unpin(h)
        with self._cond:
            if ok:
                self._counters.bytes_onboarded["g3"] += self._bb
            else:
                self._counters.onboard_failures += 1
        self._flush_events()
        return ok

    # -- pins ----------------------------------------------------------------------------------------
    def pin(self, h: BlockHash) -> Tier | None:
        """Protect ``h`` from eviction in the tier holding it (G2 before G3); None if absent."""
        with self._cond:
            if h in self.slots:
                self.slots.pin(h)
                tier = Tier.G2
            elif self.disk is not None and self.disk.pin(h):
                tier = Tier.G3
            else:
                return None
            self._pin_where.setdefault(h, []).append(tier)
            return tier

    def unpin(self, h: BlockHash) -> None:
        with self._cond:
            where = self._pin_where[h]
            tier = where.pop()
            if not where:
                del self._pin_where[h]
            if tier is Tier.G2:
                self.slots.unpin(h)
            elif self.disk is not None:
                self.disk.unpin(h)
            self._cond.notify_all()

    # -- host reservations ---------------------------------------------------------------------------
    def reserve_host(self, request_id: str, n: int) -> list[int] | None:
        """``n`` G2 slots for a request's incoming KV (evicting LRU blocks); None if they cannot be had."""
        with self._cond:
            if not self._make_free(n):
                return None
            got = [self.slots.take() for _ in range(n)]
            self.slots.reserve(request_id, got)
            self._spill_ahead()
        self._flush_events()
        return got

    def host_block(self, slot: int) -> torch.Tensor:
        """A G2 slot's tensor view, (L, 2, H_kv, B, D), e.g. to receive a reserved block's KV."""
        return self.host.slot(slot)

    def copy_host_to_device(self, slot: int, g1_block_id: int) -> None:
        """Move a reserved slot's KV into G1 once the engine has a device block for it."""
        self.device.write_block(g1_block_id, self.host.slot(slot))
        with self._cond:
            self._counters.bytes_onboarded["g2"] += self._bb

    def release_host(self, request_id: str, hashes: Sequence[BlockHash | None] | None = None) -> None:
        """End a reservation. Slot i becomes a cached G2 block when ``hashes[i]`` is given, else free."""
        with self._cond:
            for i, slot in enumerate(self.slots.release(request_id)):
                h = hashes[i] if hashes is not None and i < len(hashes) else None
                if h is not None and h not in self.slots:
                    self.slots.insert(h, slot)
                    self._emit(EventKind.STORED, Tier.G2, h)
                else:
                    self.slots.give_back(slot)
            self._cond.notify_all()
        self._flush_events()

    def commit_host(self, request_id: str, hashes: Sequence[BlockHash]) -> None:
        """A reservation's KV has arrived (decode_pool/g2_landing.py): its first ``len(hashes)``
        slots become cached G2 blocks under ``hashes``, each pinned once (``unpin`` each when done
        with it), so neither eviction nor a spill takes them while the request waits for G1. The
        slots after them (a partial tail block, which has no hash) stay reserved until
        ``release_host``. A hash G2 already holds keeps that copy and the new slot is freed."""
        with self._cond:
            slots = self.slots.release(request_id)
            if len(hashes) > len(slots):
                self.slots.reserve(request_id, slots)
                raise ValueError(f"{request_id}: {len(hashes)} hashes for {len(slots)} reserved slots")
            for h, slot in zip(hashes, slots, strict=False):
                if h in self.slots:
                    self.slots.give_back(slot)
                else:
                    self.slots.insert(h, slot)
                    self._emit(EventKind.STORED, Tier.G2, h)
                self.slots.pin(h)
                self._pin_where.setdefault(h, []).append(Tier.G2)
            if len(slots) > len(hashes):
                self.slots.reserve(request_id, slots[len(hashes) :])
            self._cond.notify_all()
        self._flush_events()

    def host_room(self) -> int:
        """G2 slots a ``reserve_host`` could get now: free, being spilled, or cached and unpinned."""
        with self._cond:
            s = self.slots
            pinned_cached = sum(1 for h in s.pins if h in s.cached)  # pins are few: no walk of the LRU
            return s.num_free + len(s.spilling) + len(s.cached) - pinned_cached

    @property
    def num_host_in_use(self) -> int:
        """G2 slots held for requests: reserved, or cached and pinned (0 when nothing is in flight)."""
        with self._cond:
            return sum(len(v) for v in self.slots.reserved.values()) + len(self.slots.pins)

    # -- lifecycle / introspection -------------------------------------------------------------------
    def spill_all(self) -> int:
        """Demote every cached, unpinned G2 block to G3 (writes queued; ``flush`` waits for them).
        Used before a planned restart, and to measure the G3 path. Returns the number demoted."""
        if self.disk is None:
            return 0
        with self._cond:
            victims = self.slots.victims(self.slots.capacity)
            for h in victims:
                self._evict(h)
        self._flush_events()
        return len(victims)

    def flush(self) -> None:
        """Wait until every queued G3 write has ended."""
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._readers.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()
        self.host.close()
        self._flush_events()

    def metrics(self) -> TierMetrics:
        with self._cond:
            c = self._counters
            d = self.disk
            return TierMetrics(
                g2_used_blocks=self.slots.num_used,
                g2_capacity_blocks=self.slots.capacity,
                g2_reserved_blocks=sum(len(s) for s in self.slots.reserved.values()),
                g3_blocks=len(d) if d else 0,
                g3_used_bytes=d.used_bytes if d else 0,
                g3_capacity_bytes=d.capacity_bytes if d else 0,
                hits=dict(c.hits),
                misses=dict(c.misses),
                bytes_offloaded=c.bytes_offloaded,
                bytes_spilled=c.bytes_spilled,
                bytes_onboarded=dict(c.bytes_onboarded),
                dropped=c.dropped,
                onboard_failures=c.onboard_failures,
                g3_corrupt_dropped=d.stats.corrupt_dropped if d else 0,
            )

    def check(self) -> None:
        """Assert the exact accounting of G2 and G3 (tests call it after every step)."""
        with self._cond:
            self.slots.check()
            for h, where in self._pin_where.items():
                assert where.count(Tier.G2) == self.slots.pins.get(h, 0), "G2 pin count drifted"
            if self.disk is not None:
                self.disk.check()
