"""RedisMetadataStore against a real redis-server: block index, shared state, TTL expiry, loads."""

from __future__ import annotations

import time

import pytest

from memory_tiers.metadata import BlockEvent, EventKind, Tier, WorkerInfo, prefix_lengths
from memory_tiers.redis_metadata import RedisMetadataStore

pytestmark = pytest.mark.integration

H = [bytes([i + 1]) * 16 for i in range(4)]
S, R = EventKind.STORED, EventKind.REMOVED


def test_block_index_is_shared_between_routers_and_survives_a_restart(redis_url: str) -> None:
    a = RedisMetadataStore(redis_url)
    a.publish(
        [
            BlockEvent(S, "w1", Tier.G2, H[0]),
            BlockEvent(S, "w1", Tier.G3, H[0]),
            BlockEvent(S, "w1", Tier.G3, H[1]),
            BlockEvent(S, "w2", Tier.G1, H[0]),
        ]
    )
    a.close()
    a.close()  # idempotent
    b = RedisMetadataStore(redis_url)  # another router, or the same one restarted
    found = b.find_blocks(H[:3])
    assert found == [{"w1": Tier.G2, "w2": Tier.G1}, {"w1": Tier.G3}, {}]
    assert prefix_lengths(found) == {"w1": 2, "w2": 1}
    b.publish([BlockEvent(R, "w1", Tier.G2, H[0])])
    assert b.find_blocks([H[0]]) == [{"w1": Tier.G3, "w2": Tier.G1}]
    b.drop_worker_blocks("w1")
    assert b.find_blocks(H[:2]) == [{"w2": Tier.G1}, {}]
    b.publish([])
    b.close()


def test_namespaces_do_not_mix(redis_url: str) -> None:
    a = RedisMetadataStore(redis_url, ns="one")
    b = RedisMetadataStore(redis_url, ns="two")
    a.publish([BlockEvent(S, "w", Tier.G2, H[0])])
    a.put_load("w", {"queue": 1})
    assert b.find_blocks([H[0]]) == [{}] and b.get_loads() == {}
    a.close()
    b.close()


def test_worker_registry_expires_without_heartbeats(redis_url: str) -> None:
    m = RedisMetadataStore(redis_url)
    m.register_worker(WorkerInfo("p0", "prefill", "10.0.0.1:5000", {"slots": 4}), ttl_s=60)
    m.register_worker(WorkerInfo("d0", "decode"), ttl_s=0.2)
    assert [w.worker_id for w in m.live_workers()] == ["d0", "p0"]
    assert m.heartbeat("p0", ttl_s=60) is True
    for _ in range(200):  # d0's key expires in Redis itself; poll, never time an assertion
        if len(m.live_workers()) == 1:
            break
        time.sleep(0.05)
    assert m.live_workers() == [WorkerInfo("p0", "prefill", "10.0.0.1:5000", {"slots": 4})]
    assert m.heartbeat("d0", ttl_s=60) is False
    m.deregister_worker("p0")
    assert m.live_workers() == []
    m.close()


def test_load_reports(redis_url: str) -> None:
    m = RedisMetadataStore(redis_url)
    m.put_load("p0", {"queue": 3, "kv_free": 0.5})
    m.put_load("p0", {"queue": 2, "kv_free": 0.25})
    m.put_load("d0", {"running": 7})
    assert m.get_loads() == {"p0": {"queue": 2, "kv_free": 0.25}, "d0": {"running": 7}}
    m.close()
