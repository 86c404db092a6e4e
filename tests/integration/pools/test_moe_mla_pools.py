"""A DeepSeek-V3 (MLA latent cache, a dense first layer, routed experts with group-limited routing)
served by real Ray actors over NIXL, with expert parallelism on either side:

    prefill-ep1  one rank               decode-ep1  one rank
    prefill-ep2  2 ranks: tp 2, ep 2    decode-ep2  2 ranks: tp 1 (attention replicated), ep 2
                 (query heads split,
                  latent on both ranks)

Every pairing (EP1 -> EP1, EP2 -> EP1, EP1 -> EP2, EP2 -> EP2) gives the one-process engine's tokens,
and moves exactly the prompt's latent blocks once per receiving rank: never once per sending rank,
never per-head K and V. A latent payload damaged on the way is caught by its digest and the request
retried; cancels and a killed expert-parallel rank leave no block held on any rank.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import ModelConfig
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from pool_runtime.actors import PoolSpec, shutdown
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import TokenChunk
from router.coordinator import PoolRequest, Pools
from tests.helpers_checkpoints import make_checkpoint
from tests.integration.pools.test_tp_pools import _all_returned, _handle, _stream, _tokens
from tests.ray_fixture import ray_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MAX_NEW = 8
LONG = 48
BLOCK = 4
PAIRS = [(p, d) for p in ("prefill-ep1-0", "prefill-ep2-0") for d in ("decode-ep1-0", "decode-ep2-0")]
IDLE = {
    "prefill-ep1-0": ([(0, 0)], 0, 0),
    "prefill-ep2-0": ([(0, 0), (0, 0)], 0, 0),
    "decode-ep1-0": ([(0, 0)], 0, 0),
    "decode-ep2-0": ([(0, 0), (0, 0)], 0, 0),
}


def _prompts(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in lens]


PROMPTS = {pair: _prompts(50 + i, (29, 11)) for i, pair in enumerate(PAIRS)}
FAULT_PROMPTS = _prompts(60, (33, 30, 37))


@pytest.fixture(scope="module")
def mla_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mla-pools"), "deepseek_v3", seed=9, num_hidden_layers=3)


@pytest.fixture(scope="module")
def expected(mla_ckpt: Path) -> dict[tuple[int, ...], list[int]]:
    everything = [p for ps in PROMPTS.values() for p in ps] + FAULT_PROMPTS[:2]
    engine = LLMEngine(EngineConfig(model=mla_ckpt, block_size=BLOCK))
    outs = engine.generate(everything, SamplingParams(max_tokens=MAX_NEW, seed=1))
    (long,) = engine.generate([FAULT_PROMPTS[2]], SamplingParams(max_tokens=LONG, seed=1))
    engine.close()
    out = {tuple(p): o.new_token_ids for p, o in zip(everything, outs, strict=True)}
    out[tuple(FAULT_PROMPTS[2])] = long.new_token_ids
    return out


def _config(ckpt: Path, tp: int, ep: int) -> WorkerConfig:
    engine = EngineConfig(
        model=ckpt,
        block_size=BLOCK,
        num_blocks=96,
        max_num_batched_tokens=8,  # a 33-token prompt: 5 prefill steps, each streaming its latents
        tensor_parallel_size=tp,
        expert_parallel_size=ep,
    )
    return WorkerConfig(
        engine, kv_backend="nixl", ack_timeout_s=20, tensor_parallel_size=tp, expert_parallel_size=ep
    )


@pytest.fixture(scope="module")
def pools(mla_ckpt: Path, ray_cluster) -> Iterator[Pools]:  # noqa: F811
    from decode_pool.pool import build_decode_pool
    from prefill_pool.pool import build_prefill_pool

    spec = PoolSpec(replicas=1, num_cpus=0.25)
    handles: list[Any] = []
    try:
        prefill = [
            *build_prefill_pool(_config(mla_ckpt, 1, 1), spec, prefix="prefill-ep1"),
            *build_prefill_pool(_config(mla_ckpt, 2, 2), spec, prefix="prefill-ep2"),
        ]
        handles += prefill
        decode = [
            *build_decode_pool(_config(mla_ckpt, 1, 1), spec, prefix="decode-ep1"),
            *build_decode_pool(_config(mla_ckpt, 1, 2), spec, prefix="decode-ep2"),
        ]
        handles += decode
        yield Pools(prefill, decode, disaggregation="always")
    finally:
        shutdown(handles)


def _req(rid: str, prompt: list[int], max_tokens: int = MAX_NEW, **kw: Any) -> PoolRequest:
    return PoolRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, seed=1), **kw)


@pytest.mark.parametrize(("prefill", "decode"), PAIRS, ids=["1to1", "1to2", "2to1", "2to2"])
def test_every_ep_pairing_gives_the_one_process_tokens(
    pools: Pools, expected: dict, mla_ckpt: Path, prefill: str, decode: str
) -> None:
    latent = ModelConfig.from_pretrained(mla_ckpt).kv_layout(BLOCK)
    assert latent.latent and latent.num_kv_heads == 1
    receiving_ranks = 2 if decode == "decode-ep2-0" else 1  # a replicated-attention rank needs it too

    async def go() -> list[list[TokenChunk]]:
        reqs = [
            _req(f"{prefill}>{decode}-{i}", p, prefill_worker=prefill, decode_worker=decode)
            for i, p in enumerate(PROMPTS[(prefill, decode)])
        ]
        return list(await asyncio.gather(*(_stream(pools, r) for r in reqs)))

    for prompt, chunks in zip(PROMPTS[(prefill, decode)], asyncio.run(go()), strict=True):
        assert chunks[-1].error == "" and chunks[-1].finished
        assert (chunks[-1].prefill_worker, chunks[-1].worker_id) == (prefill, decode)
        assert _tokens(chunks) == expected[tuple(prompt)]
        # the prompt's latent blocks, all layers, once per receiving rank: (L, 1, 1, B, r + rope) fp32
        assert chunks[-1].kv_bytes == -(-len(prompt) // BLOCK) * latent.block_bytes * receiving_ranks
    assert _all_returned(pools) == IDLE


def test_a_damaged_latent_payload_is_caught_and_retried(pools: Pools, expected: dict) -> None:
    import ray

    d = _handle(pools, "decode-ep1-0")
    before = ray.get(d.actor.transfer_faults.remote())
    ray.get(d.actor.corrupt_next_payload.remote("corrupt-latent", 1))
    prompt = FAULT_PROMPTS[0]
    chunks = asyncio.run(_stream(pools, _req("corrupt-latent", prompt, decode_worker="decode-ep1-0")))
    after = ray.get(d.actor.transfer_faults.remote())
    assert after["corrupted"] - before["corrupted"] == 1
    assert after["digest_mismatches"] - before["digest_mismatches"] == 1
    assert chunks[-1].error == "" and _tokens(chunks) == expected[tuple(prompt)]
    assert _all_returned(pools) == IDLE


def test_a_cancel_mid_transfer_between_ep2_workers_returns_every_block(pools: Pools) -> None:
    async def go() -> TokenChunk:
        gen = pools.submit(
            _req("cancel-ep2", FAULT_PROMPTS[1], prefill_worker="prefill-ep2-0", decode_worker="decode-ep2-0")
        )
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.15)  # the 30-token prompt is being prefilled and streamed (4 steps)
        await pools.cancel("cancel-ep2")
        got = await first
        await gen.aclose()
        return got

    got = asyncio.run(go())
    assert got.error == "cancelled" or not got.finished
    assert _all_returned(pools) == IDLE


def test_an_expert_rank_killed_mid_generation_resumes_elsewhere(pools: Pools, expected: dict) -> None:
    """Rank 1 of the EP2 decode worker (half of every MoE layer's experts) is killed while the
    request decodes there: the request resumes on the EP1 decode worker with the same tokens, and
    the EP2 worker comes back whole with nothing held."""
    from tests.integration.pools.test_tp_pools import _back

    d = _handle(pools, "decode-ep2-0")
    victim = _back(d)[1]["pid"]
    prompt = FAULT_PROMPTS[2]

    async def go() -> list[TokenChunk]:
        got: list[TokenChunk] = []
        req = _req("kill-ep-rank", prompt, LONG, prefill_worker="prefill-ep1-0", decode_worker="decode-ep2-0")
        async for c in pools.submit(req):
            got.append(c)
            if len(got) == 1:
                os.kill(victim, signal.SIGKILL)
        return got

    chunks = asyncio.run(go())
    assert chunks[-1].error == "" and chunks[-1].worker_id == "decode-ep1-0"
    assert _tokens(chunks) == expected[tuple(prompt)]
    assert _all_returned(pools) == IDLE
