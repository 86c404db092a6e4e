"""The routing glue (router/routing.py) and the pools backend's edges, without Ray.

Exact decisions from load reports and the block index (in-process and on a real redis-server),
the index the router keeps as it routes, how pool errors become gRPC statuses, and the handoff facts
the coordinator puts on a request's last chunk."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest

from engine.block_hash import hash_blocks
from engine.sampling_params import SamplingParams
from memory_tiers.metadata import InProcessMetadataStore, Tier
from pool_runtime.handoff import FirstToken, KVGrant, WorkRequest
from pool_runtime.reports import WorkerLoad
from router.coordinator import PoolRequest, Pools
from router.cost_model import CostParams
from router.errors import status_for
from router.policies import NoRouteError
from router.pools_backend import _error_for
from router.routing import Router, span_attributes
from router.topology import Placement, Topology
from tests.integration.memory_tiers.conftest import redis_url  # noqa: F401  (fixture)
from tests.unit.test_pools_coordinator import FakeDecode, FakePrefill

pytestmark = pytest.mark.integration

FP = "llama-float32-test"
PARAMS = CostParams(kv_bytes_per_token=512, block_size=16, handoff_overhead_s=0.005)
TOPO = Topology.build({w: Placement("n0") for w in ("prefill-0", "decode-0", "decode-1")})
SHARED = list(range(3, 51))  # three full blocks


def _reports(free: int = 64) -> list[WorkerLoad]:
    return [
        WorkerLoad("prefill-0", "prefill", free_blocks=free),
        WorkerLoad("decode-0", "decode", free_blocks=free),
        WorkerLoad("decode-1", "decode", free_blocks=free),
    ]


def _router(store: object = None, policy: str = "cost_model") -> Router:
    return Router(store or InProcessMetadataStore(), FP, PARAMS, TOPO, policy)  # type: ignore[arg-type]


def test_ties_go_to_the_smallest_id_and_this_routers_in_flight_requests_move_them() -> None:
    r = _router()
    first = r.route([1] * 40, "auto", _reports())
    d = first.decision
    assert (d.prefill_worker, d.decode_worker, d.disaggregate, d.cached_tokens) == (
        None,
        "decode-0",
        False,
        0,
    )
    assert d.predicted_ttft_s == pytest.approx(0.04)
    r.commit(first)
    assert r.in_flight("decode-0") == 1
    # decode-0 now prefills at half the rate (it shares its steps with one running request)
    second = r.route([2] * 40, "auto", _reports())
    assert second.decision.decode_worker == "decode-1"
    r.release(first)
    assert r.in_flight("decode-0") == 0
    assert r.route([2] * 40, "auto", _reports()).decision.decode_worker == "decode-0"


def test_commit_indexes_the_prompt_and_a_shared_prefix_follows_it() -> None:
    store = InProcessMetadataStore()
    r = _router(store)
    r.commit(r.route([9] * 20, "never", _reports()))  # keeps decode-0 busy
    a = r.route(SHARED + [100, 101], "auto", _reports())
    assert (a.decision.decode_worker, a.cached_blocks) == ("decode-1", {})
    r.commit(a)
    assert store.find_blocks(hash_blocks(SHARED, 16, FP)) == [{"decode-1": Tier.G1}] * 3
    b = r.route(SHARED + [7], "auto", _reports())
    assert b.cached_blocks == {"decode-1": 3}
    d = b.decision
    assert (d.decode_worker, d.disaggregate, d.cached_tokens) == ("decode-1", False, 48)
    # one uncached token at 500 tokens/s: decode-1 shares its steps with ``a``, still in flight
    assert d.predicted_ttft_s == pytest.approx(1 / 500)


def test_a_disaggregated_route_indexes_the_prefill_worker_too() -> None:
    store = InProcessMetadataStore()
    r = _router(store)
    route = r.route(SHARED, "always", _reports())
    d = route.decision
    assert (d.prefill_worker, d.decode_worker, d.disaggregate, d.kv_bytes) == (
        "prefill-0",
        "decode-0",
        True,
        48 * 512,
    )
    r.commit(route)
    assert store.find_blocks(hash_blocks(SHARED, 16, FP)) == [{"prefill-0": Tier.G1, "decode-0": Tier.G1}] * 3
    assert span_attributes(route) == {
        "tandem.route.policy": "cost_model",
        "tandem.route.prefill_worker": "prefill-0",
        "tandem.route.decode_worker": "decode-0",
        "tandem.route.disaggregate": True,
        "tandem.route.predicted_ttft_s": d.predicted_ttft_s,
        "tandem.route.cached_tokens": 0,
        "tandem.route.kv_bytes": 48 * 512,
        "tandem.route.prompt_blocks": 3,
        "tandem.route.reason": d.reason,
    }


def test_no_route_says_whether_it_is_overload() -> None:
    r = _router()
    with pytest.raises(NoRouteError) as e:
        r.route([1] * 40, "auto", [WorkerLoad("prefill-0", "prefill", free_blocks=64)])
    assert (str(e.value), e.value.overloaded) == ("no live decode worker", False)
    with pytest.raises(NoRouteError) as e:
        r.route([1] * 40, "auto", _reports(free=2))
    assert (str(e.value), e.value.overloaded) == ("no decode worker has KV room for 3 blocks", True)


def test_g2_room_counts_as_decode_room() -> None:
    """A decode worker whose G1 is full but whose host tier has room takes the request: its KV
    lands in G2 and is onboarded when G1 frees (decode_pool/g2_landing.py)."""
    r = _router()
    reports = _reports(free=2)
    reports[2] = dataclasses.replace(reports[2], g2_free_blocks=3)
    assert r.route([1] * 40, "auto", reports).decision.decode_worker == "decode-1"
    reports[2] = dataclasses.replace(reports[2], g2_free_blocks=0)
    with pytest.raises(NoRouteError):
        r.route([1] * 40, "auto", reports)


def test_round_robin_and_unknown_policies() -> None:
    r = _router(policy="round_robin")
    picks = [r.route([1] * 20, "never", _reports()).decision.decode_worker for _ in range(3)]
    assert picks == ["decode-0", "decode-1", "decode-0"]
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        _router(policy="fastest")


def test_a_restarted_router_on_redis_keeps_the_index(redis_url: str) -> None:  # noqa: F811
    from memory_tiers.redis_metadata import RedisMetadataStore

    first = RedisMetadataStore(redis_url)
    r = _router(first)
    r.commit(r.route([9] * 20, "never", _reports()))
    r.commit(r.route(SHARED + [1], "auto", _reports()))
    first.close()
    again = RedisMetadataStore(redis_url)
    b = _router(again).route(SHARED + [2, 3], "auto", _reports())
    assert (b.cached_blocks, b.decision.decode_worker, b.decision.cached_tokens) == (
        {"decode-1": 3},
        "decode-1",
        48,
    )
    again.close()


@pytest.mark.parametrize(
    ("kind", "code", "details"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "prompt: token id 900 is outside the vocabulary"),
        ("overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, "r1: no room"),
        ("unavailable", grpc.StatusCode.UNAVAILABLE, "r1: no room"),
        ("failed", grpc.StatusCode.UNAVAILABLE, "r1: no room"),
    ],
)
def test_pool_errors_become_statuses(kind: str, code: grpc.StatusCode, details: str) -> None:
    from pool_runtime.handoff import TokenChunk

    error = "r1: token id 900 is outside the vocabulary" if kind == "invalid" else "r1: no room"
    chunk = TokenChunk("r1", [], finished=True, finish_reason="abort", error=error, error_kind=kind)
    assert status_for(_error_for(chunk)) == (code, details)


class _CachingPrefill(FakePrefill):
    async def prefill(self, req: WorkRequest, grant: KVGrant) -> AsyncIterator[FirstToken]:
        async for first in super().prefill(req, grant):
            yield dataclasses.replace(first, num_cached_tokens=16, kv_bytes=4096 if first.committed else 0)


def test_the_last_chunk_carries_the_handoff_facts_and_errors_their_kind() -> None:
    async def main() -> tuple[list, list]:
        pools = Pools([_CachingPrefill("prefill-0")], [FakeDecode("decode-0")], disaggregation="always")
        ok = [c async for c in pools.submit(PoolRequest("r1", [1, 2, 3], SamplingParams(max_tokens=2)))]
        dead = Pools([], [FakeDecode("decode-0", die_at=1)], disaggregation="never", max_attempts=1)
        failed = [c async for c in dead.submit(PoolRequest("r2", [1, 2], SamplingParams(max_tokens=3)))]
        return ok, failed

    ok, failed = asyncio.run(main())
    facts = [(c.prefill_worker, c.kv_bytes, c.prefill_cached_tokens, c.finished) for c in ok]
    # the first token (from the prefill worker, before its commit) says who prefilled; the last
    # carries the committed handoff's bytes
    assert facts == [("prefill-0", 0, 16, False), ("prefill-0", 4096, 16, True)]
    assert [(c.error_kind, c.error) for c in failed][-1] == (
        "unavailable",
        "no decode worker left after 1 attempts",
    )


def test_a_workers_evictions_leave_the_index(tmp_path) -> None:
    """A real DecodeWorker (no Ray, in-process KV transport) reports the prefix blocks its engine
    evicts; the router's ``forget`` drops exactly those from the index."""
    from decode_pool.worker import DecodeWorker
    from engine.config import ModelConfig
    from engine.llm_engine import EngineConfig
    from engine.make_model import make_model
    from pool_runtime.config import WorkerConfig

    make_model(tmp_path, "tiny")
    fp = ModelConfig.from_pretrained(tmp_path).fingerprint
    worker = DecodeWorker(WorkerConfig(EngineConfig(model=tmp_path, num_blocks=6), kv_backend="inprocess"))

    def run(rid: str, prompt: list[int]) -> None:
        worker.submit_local(WorkRequest(rid, prompt, SamplingParams(max_tokens=2, seed=1)))
        while not any(c.finished for c in worker.drain("", 0.0) if c.request_id == rid):
            worker.step()

    try:
        a, b = SHARED, [7] * 80  # a: three full blocks; b needs all six blocks, so a's are evicted
        run("a", a)
        assert worker.take_evictions() == []
        store = InProcessMetadataStore()
        r = Router(store, fp, PARAMS, TOPO)
        r.commit(r.route(a, "never", _reports()))
        assert store.find_blocks(hash_blocks(a, 16, fp)) == [{"decode-0": Tier.G1}] * 3
        run("b", b)
        evicted = worker.take_evictions()
        assert sorted(evicted) == sorted(hash_blocks(a, 16, fp))
        assert worker.take_evictions() == []  # taken once
        r.forget("decode-0", evicted)
        assert store.find_blocks(hash_blocks(a, 16, fp)) == [{}, {}, {}]
    finally:
        worker.close()


def test_a_store_that_cannot_answer_routes_without_prefix_hints() -> None:
    """Redis down (the chaos suite's restart case): routing goes on with no cached prefix, the
    index events are dropped, nothing raises into the request."""

    class Down(InProcessMetadataStore):
        def find_blocks(self, hashes):  # type: ignore[no-untyped-def]
            raise ConnectionError("Connection refused")

        def publish(self, events):  # type: ignore[no-untyped-def]
            raise ConnectionError("Connection refused")

    r = _router(Down())
    route = r.route(SHARED + [100, 101], "auto", _reports())
    assert route.cached_blocks == {} and route.decision.cached_tokens == 0
    r.commit(route)  # the index events are lost, the request is counted in flight all the same
    assert r.in_flight(route.decision.decode_worker) == 1
    r.forget("decode-0", hash_blocks(SHARED, 16, FP))
    r.release(route)
