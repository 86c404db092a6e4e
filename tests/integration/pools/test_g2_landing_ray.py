"""G2 landing through the Ray pools over NIXL: a decode actor whose G1 holds one of two concurrent
prompts takes the other's KV in host memory (a second NIXL agent over its inbox), onboards it once
the first finishes, and both outputs equal the single engine's; every in-use count returns to zero.
Run with a one-rank prefill worker and with a TP = 2 one, whose two ranks each write their half of
every block's heads into the inbox."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from memory_tiers.tier_store import TierConfig
from pool_runtime.actors import PoolSpec
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import TokenChunk
from router.coordinator import PoolRequest, Pools
from tests.ray_fixture import ray_cluster, running_pools  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MAX_NEW = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in (41, 30)]


@pytest.fixture(scope="module")
def reference(ckpt: Path, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
    engine = LLMEngine(EngineConfig(model=ckpt, block_size=4))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, seed=1))
    block_bytes = engine.kv_layout.block_bytes
    engine.close()
    return [o.new_token_ids for o in outs], block_bytes


@pytest.fixture(scope="module", params=[1, 2], ids=["prefill-tp1", "prefill-tp2"])
def cluster(
    request: pytest.FixtureRequest,
    ckpt: Path,
    reference,
    ray_cluster,  # noqa: F811
) -> Iterator[tuple[list, list]]:
    engine = EngineConfig(model=ckpt, block_size=4, num_blocks=64, max_num_batched_tokens=8)
    cfg = WorkerConfig(engine, kv_backend="nixl", ack_timeout_s=20, tensor_parallel_size=request.param)
    # G1: 14 blocks, the 41-token prompt takes 11 and the 30-token one needs 8; G2: 16 blocks
    decode_cfg = dataclasses.replace(
        cfg,
        engine=dataclasses.replace(engine, num_blocks=14),
        tiers=TierConfig(host_bytes=16 * reference[1]),
        tensor_parallel_size=1,
    )
    with running_pools(cfg, PoolSpec(replicas=1, num_cpus=0.25), decode_cfg=decode_cfg) as pools:
        yield pools


async def _stream(pools: Pools, req: PoolRequest) -> list[TokenChunk]:
    return [c async for c in pools.submit(req)]


def test_concurrent_prompts_one_lands_in_g2(cluster, prompts, reference) -> None:
    import ray

    prefill, decode = cluster
    pools = Pools(prefill, decode)
    params = SamplingParams(max_tokens=MAX_NEW, seed=1)

    async def both() -> list[list[TokenChunk]]:
        reqs = [PoolRequest(f"g2-{i}", pr, params) for i, pr in enumerate(prompts)]
        return list(await asyncio.gather(*(_stream(pools, r) for r in reqs)))

    results = asyncio.run(both())
    for chunks in results:
        assert chunks[-1].finished and chunks[-1].error == ""
    assert [[t for c in chunks for t in c.token_ids] for chunks in results] == reference[0]

    metrics = ray.get(decode[0].actor.tier_metrics.remote())
    # whichever prompt reserved second went to G2 (11 + 8 > 14) and was onboarded from there
    assert metrics.bytes_onboarded["g2"] >= 8 * reference[1]
    loads = {w.worker_id: w for w in asyncio.run(pools.load())}
    assert (loads["prefill-0"].used_blocks, loads["decode-0"].used_blocks) == (0, 0)
    d = loads["decode-0"]
    assert (d.reserved_blocks, d.g2_used_blocks, d.running, d.waiting) == (0, 0, 0, 0)
    assert d.g2_total_blocks == 16
