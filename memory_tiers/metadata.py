"""The metadata store seam: block index, worker registry with TTL, load reports; in-process default.

Pure Python (no torch), imported by the router. Three kinds of facts, each keyed by worker id:

- block events (stored / removed, worker, tier) -> a block index that answers "which workers hold
  which of these hashes, in which tier" (``find_blocks``; ``prefix_lengths`` turns that into each
  worker's longest cached prefix of a hash chain);
- worker entries, registered with a TTL and kept alive by heartbeats; an expired worker is gone;
- load reports (a small dict per worker, latest wins).

``RedisMetadataStore`` (memory_tiers/redis_metadata.py) implements the same Protocol for several
routers and a router restart. Lifecycle of both: construct → use → ``close()`` (idempotent).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.block_hash import BlockHash


class Tier(enum.IntEnum):
    """Lower is faster; a block held in several tiers of one worker is reported at the lowest."""

    G1 = 1  # device
    G2 = 2  # host DRAM
    G3 = 3  # disk


class EventKind(enum.Enum):
    STORED = "stored"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class BlockEvent:
    kind: EventKind
    worker_id: str
    tier: Tier
    block_hash: BlockHash


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode" | ...
    address: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)


class MetadataStore(Protocol):
    def publish(self, events: Sequence[BlockEvent]) -> None: ...

    def find_blocks(self, hashes: Sequence[BlockHash]) -> list[dict[str, Tier]]:
        """For each hash, {worker id: lowest tier holding it} (empty dict when nobody has it)."""
        ...

    def drop_worker_blocks(self, worker_id: str) -> None: ...

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None: ...

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        """Extend a worker's TTL; False when it had already expired (it must register again)."""
        ...

    def deregister_worker(self, worker_id: str) -> None: ...

    def live_workers(self) -> list[WorkerInfo]: ...

    def put_load(self, worker_id: str, load: dict[str, Any]) -> None: ...

    def get_loads(self) -> dict[str, dict[str, Any]]: ...

    def close(self) -> None: ...


def prefix_lengths(found: Sequence[dict[str, Tier]]) -> dict[str, int]:
    """Each worker's number of leading hashes held (in any tier), from ``find_blocks``' answer."""
    lengths: dict[str, int] = {}
    alive = set(found[0]) if found else set()
    for i, holders in enumerate(found):
        alive &= set(holders)
        for w in alive:
            lengths[w] = i + 1
        if not alive:
            break
    return lengths


class InProcessMetadataStore:
    """The embedded default: dicts behind one lock. ``clock`` is injectable so TTL tests need no sleep."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._blocks: dict[BlockHash, dict[str, set[Tier]]] = {}
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}  # id -> (info, expires at)
        self._loads: dict[str, dict[str, Any]] = {}

    def publish(self, events: Iterable[BlockEvent]) -> None:
        with self._lock:
            for ev in events:
                holders = self._blocks.setdefault(ev.block_hash, {})
                tiers = holders.setdefault(ev.worker_id, set())
                if ev.kind is EventKind.STORED:
                    tiers.add(ev.tier)
                else:
                    tiers.discard(ev.tier)
                    if not tiers:
                        del holders[ev.worker_id]
                    if not holders:
                        del self._blocks[ev.block_hash]

    def find_blocks(self, hashes: Sequence[BlockHash]) -> list[dict[str, Tier]]:
        with self._lock:
            return [
                {w: min(tiers) for w, tiers in self._blocks.get(h, {}).items()}  # type: ignore[misc]
                for h in hashes
            ]

    def drop_worker_blocks(self, worker_id: str) -> None:
        with self._lock:
            for h in list(self._blocks):
                holders = self._blocks[h]
                holders.pop(worker_id, None)
                if not holders:
                    del self._blocks[h]

    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        with self._lock:
            self._workers[info.worker_id] = (info, self._clock() + ttl_s)

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        with self._lock:
            self._expire()
            entry = self._workers.get(worker_id)
            if entry is None:
                return False
            self._workers[worker_id] = (entry[0], self._clock() + ttl_s)
            return True

    def deregister_worker(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    def live_workers(self) -> list[WorkerInfo]:
        with self._lock:
            self._expire()
            return [info for info, _ in sorted(self._workers.values(), key=lambda e: e[0].worker_id)]

    def _expire(self) -> None:
        now = self._clock()
        for wid in [w for w, (_, exp) in self._workers.items() if exp <= now]:
            del self._workers[wid]

    def put_load(self, worker_id: str, load: dict[str, Any]) -> None:
        with self._lock:
            self._loads[worker_id] = dict(load)

    def get_loads(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {w: dict(v) for w, v in self._loads.items()}

    def close(self) -> None:
        pass
