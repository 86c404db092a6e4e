"""The disaggregated golden test: greedy output through prefill worker -> NIXL (UCX) -> decode worker,
each a Ray actor in its own process, equals the in-process engine and transformers token for token,
for a batch of mixed-length prompts (chunked prefill, shared prefixes, a prompt ending mid-block)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from pool_runtime.actors import PoolSpec
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import TokenChunk
from router.coordinator import PoolRequest, Pools
from tests.helpers_checkpoints import load_reference, make_checkpoint
from tests.ray_fixture import ray_cluster, running_pools  # noqa: F401  (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MAX_NEW = 16


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(3, vocab) for _ in range(24)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (3, 17, 40, 9, 64, 101)]
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(5)])
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(11)])
    return prompts


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], list[list[int]]]:
    path = make_checkpoint(tmp_path_factory.mktemp("disagg-golden"), "llama", seed=7)
    ref = load_reference(path)
    prompts = _prompts(ref.config.vocab_size)
    expected = []
    with torch.inference_mode():
        for p in prompts:
            out = ref.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
            expected.append(out[0, len(p) :].tolist())
    return path, prompts, expected


@pytest.fixture(scope="module")
def pools(golden, ray_cluster) -> Iterator[tuple[Pools, list, list]]:  # noqa: F811
    path = golden[0]
    # 4-token blocks and an 8-token budget: every long prompt is prefilled (and streamed) in chunks
    engine = EngineConfig(model=path, block_size=4, num_blocks=256, max_num_batched_tokens=8)
    cfg = WorkerConfig(engine, kv_backend="nixl")
    with running_pools(cfg, PoolSpec(replicas=1, num_cpus=0.5, max_restarts=0)) as (prefill, decode):
        yield Pools(prefill, decode, disaggregation="always"), prefill, decode


async def _collect(pools: Pools, prompts: list[list[int]], mode: str) -> list[list[TokenChunk]]:
    async def one(i: int, prompt: list[int]) -> list[TokenChunk]:
        req = PoolRequest(f"{mode}-{i}", prompt, SamplingParams(max_tokens=MAX_NEW), disaggregation=mode)
        return [c async for c in pools.submit(req)]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def test_disaggregated_equals_engine_and_transformers(golden, pools) -> None:
    path, prompts, expected = golden
    engine = LLMEngine(EngineConfig(model=path, block_size=4))
    in_process = [o.new_token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))]
    engine.close()
    assert in_process == expected

    p, prefill, decode = pools
    import ray

    pids = ray.get([prefill[0].actor.pid.remote(), decode[0].actor.pid.remote()])
    assert len({os.getpid(), *pids}) == 3  # driver, prefill and decode: three processes

    streams = asyncio.run(_collect(p, prompts, "always"))
    assert [[t for c in s for t in c.token_ids] for s in streams] == expected
    for s in streams:
        assert [c.error for c in s] == [""] * len(s)
        assert s[-1].finished and s[-1].finish_reason == "length"
        assert {c.worker_id for c in s} == {"decode-0"}
    loads = asyncio.run(p.load())
    assert [(w.worker_id, w.used_blocks, w.reserved_blocks) for w in loads] == [
        ("prefill-0", 0, 0),
        ("decode-0", 0, 0),
    ]


def test_colocated_mode_equals_transformers(golden, pools) -> None:
    _, prompts, expected = golden
    p = pools[0]
    streams = asyncio.run(_collect(p, prompts, "never"))
    assert [[t for c in s for t in c.token_ids] for s in streams] == expected
    assert [w.used_blocks for w in asyncio.run(p.load())] == [0, 0]


def test_penalties_disaggregated_equal_in_process_and_transformers(golden, pools) -> None:
    # The prefill worker samples the first token (its penalties see the prompt), the decode worker the
    # rest (prompt + output so far): the same tokens as one process, and as transformers' generate.
    path, prompts, _ = golden
    prompts = prompts[:3]
    rep = SamplingParams(max_tokens=MAX_NEW, repetition_penalty=1.4)
    mixed = SamplingParams(
        max_tokens=MAX_NEW,
        temperature=0.8,
        seed=5,
        repetition_penalty=1.2,
        frequency_penalty=0.6,
        presence_penalty=0.3,
    )
    engine = LLMEngine(EngineConfig(model=path, block_size=4))
    want = {
        name: [o.new_token_ids for o in engine.generate(prompts, sp)]
        for name, sp in (("rep", rep), ("mixed", mixed))
    }
    engine.close()
    ref = load_reference(path)
    with torch.inference_mode():
        for p, ids in zip(prompts, want["rep"], strict=True):
            out = ref.generate(
                torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=1.4
            )
            assert out[0, len(p) :].tolist() == ids

    async def run(sp: SamplingParams, tag: str) -> list[list[int]]:
        async def one(i: int, prompt: list[int]) -> list[int]:
            req = PoolRequest(f"{tag}-{i}", prompt, sp, disaggregation="always")
            return [t async for c in pools[0].submit(req) for t in c.token_ids]

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    assert asyncio.run(run(rep, "rep")) == want["rep"]
    assert asyncio.run(run(mixed, "mixed")) == want["mixed"]
    assert [w.used_blocks for w in asyncio.run(pools[0].load())] == [0, 0]
