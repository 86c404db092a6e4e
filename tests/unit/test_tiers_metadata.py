"""InProcessMetadataStore: block index from events, per-worker prefix lengths, TTL'd registry, loads."""

from __future__ import annotations

import pytest

from memory_tiers.metadata import (
    BlockEvent,
    EventKind,
    InProcessMetadataStore,
    Tier,
    WorkerInfo,
    prefix_lengths,
)

pytestmark = pytest.mark.unit

H = [bytes([i + 1]) * 16 for i in range(6)]
S, R = EventKind.STORED, EventKind.REMOVED


def test_block_index_reports_lowest_tier_per_worker_and_prefix_lengths() -> None:
    m = InProcessMetadataStore()
    m.publish(
        [
            BlockEvent(S, "a", Tier.G2, H[0]),
            BlockEvent(S, "a", Tier.G3, H[0]),
            BlockEvent(S, "a", Tier.G3, H[1]),
            BlockEvent(S, "b", Tier.G1, H[0]),
            BlockEvent(S, "b", Tier.G2, H[1]),
            BlockEvent(S, "b", Tier.G2, H[2]),
            BlockEvent(S, "c", Tier.G1, H[1]),  # no H[0]: holds no prefix
        ]
    )
    found = m.find_blocks(H[:4])
    assert found == [
        {"a": Tier.G2, "b": Tier.G1},
        {"a": Tier.G3, "b": Tier.G2, "c": Tier.G1},
        {"b": Tier.G2},
        {},
    ]
    assert prefix_lengths(found) == {"a": 2, "b": 3}
    m.publish([BlockEvent(R, "a", Tier.G2, H[0]), BlockEvent(R, "b", Tier.G2, H[1])])
    assert m.find_blocks(H[:2]) == [{"a": Tier.G3, "b": Tier.G1}, {"a": Tier.G3, "c": Tier.G1}]
    assert prefix_lengths(m.find_blocks(H[:3])) == {"a": 2, "b": 1}
    m.drop_worker_blocks("a")
    assert m.find_blocks(H[:2]) == [{"b": Tier.G1}, {"c": Tier.G1}]
    assert prefix_lengths([]) == {}
    m.close()


def test_workers_expire_without_heartbeats() -> None:
    now = [100.0]
    m = InProcessMetadataStore(clock=lambda: now[0])
    m.register_worker(WorkerInfo("p0", "prefill", "127.0.0.1:1", {"gpu": 0}), ttl_s=5)
    m.register_worker(WorkerInfo("d0", "decode"), ttl_s=5)
    assert [w.worker_id for w in m.live_workers()] == ["d0", "p0"]
    now[0] = 104.0
    assert m.heartbeat("p0", ttl_s=5) is True  # p0 now lives until 109
    now[0] = 105.0
    assert m.live_workers() == [WorkerInfo("p0", "prefill", "127.0.0.1:1", {"gpu": 0})]
    assert m.heartbeat("d0", ttl_s=5) is False  # expired: must register again
    now[0] = 109.0
    assert m.live_workers() == []
    m.register_worker(WorkerInfo("d0", "decode"), ttl_s=5)
    m.deregister_worker("d0")
    assert m.live_workers() == []


def test_load_reports_latest_wins() -> None:
    m = InProcessMetadataStore()
    m.put_load("p0", {"queue": 3, "free_blocks": 10})
    m.put_load("d0", {"queue": 0})
    m.put_load("p0", {"queue": 1})
    assert m.get_loads() == {"p0": {"queue": 1}, "d0": {"queue": 0}}
