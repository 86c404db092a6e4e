"""End to end through real gRPC connections to ``tandem serve`` on the Ray prefill/decode pools.

Two kinds of server:

- a ``tandem serve`` child process with its default backend (pools): its own local Ray cluster, one
  prefill and one decode worker (Ray actors, KV over NIXL). Greedy output equals the in-process
  engine, concurrent streams lose nothing, cancels and deadlines free every block.
- a ``TandemServer`` in this process over one prefill and two decode workers in the shared test Ray
  cluster (tests/ray_fixture.py), so a router can be stopped and started again over the same
  workers: requests sharing a prefix go to the decode worker holding it, also after a restart of a
  router backed by Redis; the routing decision is on the request's span.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request
from tests.e2e.test_grpc_serve import ManagedServer, _health, _server_info
from tests.integration.memory_tiers.conftest import redis_url  # noqa: F401  (fixture)
from tests.ray_fixture import ray_cluster, running_pools  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time there was a long prompt that spans blocks"]
MAX_NEW = 10
BLOCK = 16
BLOCK_BYTES = 8192  # the tiny model: 2 layers x K,V x 2 KV heads x 16 tokens x 32 dims x fp32


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, list[int]]:
    """Greedy ids of the in-process engine, each prompt alone."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=checkpoint))
    try:
        return {
            p: engine.generate([p], SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))[0].new_token_ids
            for p in PROMPTS
        }
    finally:
        engine.close()


# -- tandem serve, a child process (tests/e2e/conftest.py's, shared with the HTTP tests) ------------------
@pytest.fixture(scope="module")
def served(served_pools: ManagedServer) -> ManagedServer:
    return served_pools


def _wait_all_idle(address: str) -> list[tuple[str, int, int, int]]:
    """(worker, running, waiting, used blocks) per worker, once all are idle (liveness bound only)."""
    deadline = time.monotonic() + 20
    while True:
        ws = [
            (w.worker_id, w.running_seqs, w.waiting_seqs, w.used_blocks)
            for w in _server_info(address).workers
        ]
        if all(w[1:] == (0, 0, 0) for w in ws) or time.monotonic() > deadline:
            return ws
        time.sleep(0.05)


def test_serve_on_pools_greedy_equals_engine(
    served: ManagedServer, checkpoint: Path, reference: dict
) -> None:
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(checkpoint)
    # Disaggregated first: no worker holds any block yet, so every full and partial block moves.
    for mode in ("always", "never"):
        for prompt, msgs in zip(PROMPTS, asyncio.run(_gather(served.address, mode)), strict=True):
            assert [t for m in msgs for t in m.token_ids] == reference[prompt], (mode, prompt)
            t, u = msgs[-1].timings, msgs[-1].usage
            assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert u.completion_tokens == MAX_NEW and u.prompt_tokens == len(tok.encode(prompt))
            assert t.decode_worker == "decode-0"
            if mode == "always":
                blocks = -(-u.prompt_tokens // BLOCK)
                assert (t.prefill_worker, t.disaggregated) == ("prefill-0", True)
                assert t.kv_bytes_moved == blocks * BLOCK_BYTES
            else:
                assert (t.prefill_worker, t.disaggregated, t.kv_bytes_moved) == ("decode-0", False, 0)
    assert _wait_all_idle(served.address) == [("prefill-0", 0, 0, 0), ("decode-0", 0, 0, 0)]


async def _gather(address: str, mode: str | None, prompts: list[str] = PROMPTS) -> list[list[Any]]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.TandemStub(ch)

        async def one(p: str) -> list[Any]:
            call = stub.Generate(build_request(p, max_tokens=MAX_NEW, ignore_eos=True, disaggregation=mode))
            return [m async for m in call]

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def test_64_concurrent_streams_lose_no_token(served: ManagedServer, reference: dict) -> None:
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
    results = asyncio.run(_gather(served.address, None, jobs))  # the server's default: auto
    for prompt, msgs in zip(jobs, results, strict=True):
        assert [t for m in msgs for t in m.token_ids] == reference[prompt]
    assert _wait_all_idle(served.address) == [("prefill-0", 0, 0, 0), ("decode-0", 0, 0, 0)]


def test_cancel_and_deadline_free_blocks_on_the_workers(served: ManagedServer) -> None:
    async def main() -> int:
        async with grpc.aio.insecure_channel(served.address) as ch:
            stub = pb_grpc.TandemStub(ch)
            req = build_request("cancel me " * 20, max_tokens=1500, ignore_eos=True, disaggregation="always")
            call = stub.Generate(req)
            for _ in range(3):
                await call.read()
            used = 0
            for _ in range(200):  # the router's load view refreshes every 0.1 s
                info = await stub.GetServerInfo(pb.GetServerInfoRequest())
                used = {w.worker_id: w.used_blocks for w in info.workers}["decode-0"]
                if used:
                    break
                await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(
                    build_request("deadline", max_tokens=1500, ignore_eos=True), timeout=1
                ):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return used

    assert asyncio.run(main()) > 0  # the stream held blocks on decode-0 while it ran...
    assert _wait_all_idle(served.address) == [("prefill-0", 0, 0, 0), ("decode-0", 0, 0, 0)]  # ...no more


def test_health_info_and_bad_input(served: ManagedServer) -> None:
    assert _health(served.address) == health_pb2.HealthCheckResponse.SERVING
    info = _server_info(served.address)
    assert info.routing_policy == "cost_model"
    assert [(w.worker_id, w.role) for w in info.workers] == [("prefill-0", "prefill"), ("decode-0", "decode")]

    async def main() -> None:
        async with grpc.aio.insecure_channel(served.address) as ch:
            stub = pb_grpc.TandemStub(ch)
            for kwargs, expected in (
                (dict(prompt=[1, 512]), "prompt.token_ids: token id 512 is outside the vocabulary"),
                (dict(max_tokens=0), "sampling.max_tokens: must be > 0"),
            ):
                kw: dict[str, Any] = dict(kwargs)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Generate(build_request(kw.pop("prompt", "Hello"), **kw)):
                        pass
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details().startswith(expected)

    asyncio.run(main())


# -- a router in this process over workers that outlive it ---------------------------------------------
@pytest.fixture(scope="module")
def workers(checkpoint: Path, ray_cluster: None) -> Iterator[tuple[list, list]]:  # noqa: F811
    from engine.llm_engine import EngineConfig
    from pool_runtime.actors import PoolSpec
    from pool_runtime.config import WorkerConfig

    cfg = WorkerConfig(EngineConfig(model=checkpoint, block_size=BLOCK, num_blocks=64), kv_backend="nixl")
    spec = PoolSpec(replicas=1, num_cpus=0.5, max_restarts=0)
    with running_pools(cfg, spec, decode_spec=dataclasses.replace(spec, replicas=2)) as pools:
        yield pools


@contextlib.asynccontextmanager
async def router(
    workers: tuple[list, list], checkpoint: Path, store: Any, telemetry: Any
) -> AsyncIterator[Any]:
    """(a client of a TandemServer, its PoolsBackend): fresh routing state over the same workers."""
    from router.coordinator import Pools
    from router.pools_backend import PoolsBackend
    from router.server import TandemServer
    from router.topology import Placement, Topology

    prefill, decode = workers
    topo = Topology.build({h.worker_id: Placement("node-a") for h in prefill + decode})
    backend = PoolsBackend.over_pools(
        Pools(prefill, decode, disaggregation="auto"),
        checkpoint,
        store,
        topology=topo,
        load_interval_s=0.05,
        tracer=telemetry.tracer,
    )
    await backend.start()
    server = TandemServer(
        backend, port=0, telemetry=telemetry, default_disaggregation="auto", routing_policy="cost_model"
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            yield pb_grpc.TandemStub(ch), backend
    finally:
        await server.stop(1.0)


async def _final(stub: pb_grpc.TandemStub, prompt: list[int], max_tokens: int = 4) -> pb.GenerateResponse:
    last = None
    async for m in stub.Generate(build_request(prompt, max_tokens=max_tokens, ignore_eos=True)):
        last = m
    assert last is not None
    return last


async def _idle(stub: pb_grpc.TandemStub) -> list[tuple[str, int, int]]:
    deadline = time.monotonic() + 20
    while True:
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        ws = [(w.worker_id, w.running_seqs + w.waiting_seqs, w.used_blocks) for w in info.workers]
        # in_flight: the router's own handlers (and so its in-flight tally of each worker) are done too
        if (info.in_flight == 0 and all(w[1:] == (0, 0) for w in ws)) or time.monotonic() > deadline:
            return ws
        await asyncio.sleep(0.05)


async def _warm_prefix_on_decode_1(stub: pb_grpc.TandemStub, shared: list[int]) -> None:
    """With a long stream in flight on decode-0 (the tie-break of two idle workers), a request with a
    new shared prefix goes to the idle decode-1, which then holds the prefix; cancel the stream."""
    long = stub.Generate(build_request([7] * 20, max_tokens=1000, ignore_eos=True, disaggregation="never"))
    await long.read()
    a = await _final(stub, shared + [11, 12, 13])
    assert (a.timings.decode_worker, a.usage.cached_tokens) == ("decode-1", 0)
    long.cancel()
    assert await _idle(stub) == [("prefill-0", 0, 0), ("decode-0", 0, 0), ("decode-1", 0, 0)]


def test_shared_prefix_goes_to_the_decode_worker_holding_it(workers, checkpoint: Path) -> None:
    from memory_tiers.metadata import InProcessMetadataStore
    from router.telemetry import setup_telemetry

    shared = [(5 * i) % 500 + 3 for i in range(3 * BLOCK)]  # three full blocks
    tel = setup_telemetry("memory")

    async def main() -> None:
        async with router(workers, checkpoint, InProcessMetadataStore(), tel) as (stub, _):
            await _warm_prefix_on_decode_1(stub, shared)
            b = await _final(stub, shared + [21, 22])  # both idle: the prefix decides
            assert (b.timings.decode_worker, b.usage.cached_tokens) == ("decode-1", 3 * BLOCK)
            c = await _final(stub, [9] * 40)  # no prefix anywhere: the tie-break, decode-0
            assert c.timings.decode_worker == "decode-0"
            assert c.usage.cached_tokens == 0

    asyncio.run(main())
    spans = {s.attributes["tandem.request_id"]: s for s in tel.span_exporter.get_finished_spans()
             if s.name == "tandem.generate"}  # fmt: skip
    routed = [dict(s.attributes) for s in spans.values()]
    b_span = [a for a in routed if a["tandem.prompt_tokens"] == 3 * BLOCK + 2]
    assert len(b_span) == 1
    assert b_span[0]["tandem.route.decode_worker"] == "decode-1"
    assert b_span[0]["tandem.route.cached_tokens"] == 3 * BLOCK
    assert b_span[0]["tandem.route.policy"] == "cost_model"
    assert b_span[0]["tandem.route.disaggregate"] is False
    route_spans = [s for s in tel.span_exporter.get_finished_spans() if s.name == "tandem.route"]
    assert len(route_spans) == len(spans)
    tel.shutdown()


def test_restarted_router_on_redis_still_routes_to_the_holder(
    workers,
    checkpoint: Path,
    redis_url: str,  # noqa: F811  (the fixture)
) -> None:
    from memory_tiers.redis_metadata import RedisMetadataStore
    from router.telemetry import setup_telemetry

    shared = [(7 * i) % 500 + 3 for i in range(2 * BLOCK)]  # a prefix no earlier test used

    async def main() -> None:
        async with router(workers, checkpoint, RedisMetadataStore(redis_url), setup_telemetry("none")) as (
            stub,
            _,
        ):
            await _warm_prefix_on_decode_1(stub, shared)
        # a new router: no routing state of its own, only what Redis kept
        async with router(workers, checkpoint, RedisMetadataStore(redis_url), setup_telemetry("none")) as (
            stub,
            _,
        ):
            b = await _final(stub, shared + [1, 2, 3])
            assert (b.timings.decode_worker, b.usage.cached_tokens) == ("decode-1", 2 * BLOCK)
            c = await _final(stub, [8] * 40)
            assert c.timings.decode_worker == "decode-0"

    asyncio.run(main())


def test_no_decode_room_is_resource_exhausted(workers, checkpoint: Path) -> None:
    from memory_tiers.metadata import InProcessMetadataStore
    from router.telemetry import setup_telemetry

    async def main() -> None:
        async with router(workers, checkpoint, InProcessMetadataStore(), setup_telemetry("none")) as (
            stub,
            _,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:  # 1100 tokens: 69 blocks, 64 per worker
                await _final(stub, [3] * 1100)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.value.details() == "no decode worker has KV room for 69 blocks"
            assert (await _final(stub, [3] * 20)).usage.completion_tokens == 4  # others go on

    asyncio.run(main())


def test_the_index_follows_a_workers_evictions(workers, checkpoint: Path) -> None:
    from engine.block_hash import hash_blocks
    from engine.sampling_params import SamplingParams
    from memory_tiers.metadata import InProcessMetadataStore, prefix_lengths
    from router.coordinator import PoolRequest
    from router.telemetry import setup_telemetry

    shared = [(11 * i) % 500 + 3 for i in range(2 * BLOCK)]

    def held(backend: Any) -> dict[str, int]:
        r = backend.router
        return prefix_lengths(r.store.find_blocks(hash_blocks(shared, BLOCK, r.fingerprint)))

    async def main() -> None:
        async with router(workers, checkpoint, InProcessMetadataStore(), setup_telemetry("none")) as (
            stub,
            backend,
        ):
            await _warm_prefix_on_decode_1(stub, shared)
            await backend.sync_evictions()  # nothing of the prefix evicted so far: it stays indexed
            assert held(backend) == {"decode-1": 2}
            # 1010 tokens straight onto decode-1 fill all its 64 blocks: every cached block there goes
            flood = PoolRequest("flood", [4] * 1010, SamplingParams(max_tokens=1), "never", None, "decode-1")
            assert [c.worker_id async for c in backend.pools.submit(flood)] == ["decode-1"]
            await backend.sync_evictions()  # (the backend's refresh task may have done it already)
            assert held(backend) == {}
            b = await _final(stub, shared + [5])  # the index no longer sends it to decode-1
            assert (b.timings.decode_worker, b.usage.cached_tokens) == ("decode-0", 0)

    asyncio.run(main())
