"""Failure and cancel paths with real Ray actors over NIXL: a prefill actor killed mid-transfer, a
decode actor killed mid-generation, and caller cancels at every stage. Every request ends (completed
by a retry with the exact tokens, or with a clear error) and every worker's in-use block count
returns to zero."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from pool_runtime.actors import PoolSpec
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import TokenChunk
from router.coordinator import PoolRequest, Pools
from tests.ray_fixture import ray_cluster, running_pools  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MAX_NEW = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(8)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in (41, 23, 7, 60)]


@pytest.fixture(scope="module")
def expected(ckpt: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=ckpt, block_size=4))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, seed=1))
    engine.close()
    return [o.new_token_ids for o in outs]


@pytest.fixture(scope="module")
def cluster(ckpt: Path, ray_cluster) -> Iterator[tuple[list, list]]:  # noqa: F811
    # an 8-token budget: a 41-token prompt takes 6 prefill steps, so "mid-transfer" is a real stage
    cfg = WorkerConfig(
        EngineConfig(model=ckpt, block_size=4, num_blocks=128, max_num_batched_tokens=8),
        kv_backend="nixl",
        ack_timeout_s=20,
    )
    with running_pools(cfg, PoolSpec(replicas=2, num_cpus=0.25)) as pools:
        yield pools


def _pid_when_back(handle: object) -> int:
    """The actor's pid once it answers again (Ray refuses calls while it restarts)."""
    import ray
    from ray.exceptions import ActorUnavailableError

    for _ in range(600):
        try:
            return ray.get(handle.actor.pid.remote())  # type: ignore[attr-defined]
        except ActorUnavailableError:
            time.sleep(0.2)
    raise AssertionError("actor did not come back")


def _zero_blocks(pools: Pools, timeout_s: float = 30.0) -> list[tuple[str, int, int]]:
    """Every worker's (in-use, reserved) blocks once they are back to zero — a cancel is applied at
    the worker's next step boundary — or as they are past ``timeout_s`` (a hang bound)."""
    for h in [*pools.prefill, *pools.decode]:
        _pid_when_back(h)
    deadline = time.monotonic() + timeout_s
    while True:
        loads = asyncio.run(pools.load())
        got = [(w.worker_id, w.used_blocks, w.reserved_blocks) for w in loads]
        if all((u, r) == (0, 0) for _, u, r in got) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


IDLE = [("prefill-0", 0, 0), ("prefill-1", 0, 0), ("decode-0", 0, 0), ("decode-1", 0, 0)]


async def _stream(pools: Pools, req: PoolRequest) -> list[TokenChunk]:
    return [c async for c in pools.submit(req)]


def _req(rid: str, prompt: list[int], **kw: object) -> PoolRequest:
    return PoolRequest(rid, prompt, SamplingParams(max_tokens=MAX_NEW, seed=1), **kw)  # type: ignore[arg-type]


def test_prefill_killed_mid_transfer_is_retried(cluster, prompts, expected) -> None:
    import ray

    prefill, decode = cluster
    pools = Pools(prefill, decode)
    pid_before = ray.get(prefill[0].actor.pid.remote())
    ray.get(prefill[0].actor.crash_after_layer.remote("kill-p", 0))  # dies after sending layer 0
    chunks = asyncio.run(_stream(pools, _req("kill-p", prompts[0], prefill_worker="prefill-0")))
    assert [t for c in chunks for t in c.token_ids] == expected[0]
    assert chunks[-1].finished and chunks[-1].error == ""
    assert _pid_when_back(prefill[0]) != pid_before  # it died and Ray restarted it
    assert _zero_blocks(pools) == IDLE


def test_decode_killed_mid_generation_resumes(cluster, prompts, expected) -> None:
    import ray

    prefill, decode = cluster
    pools = Pools(prefill, decode)
    pid_before = ray.get(decode[0].actor.pid.remote())
    ray.get(decode[0].actor.crash_after_tokens.remote("kill-d", 5))

    async def go() -> tuple[list[TokenChunk], list[list[TokenChunk]]]:
        # bystanders on both workers' token streams: those on the killed one resume too
        others = [
            asyncio.ensure_future(
                _stream(pools, _req(f"by-{i}", prompts[i], decode_worker=f"decode-{i % 2}"))
            )
            for i in (0, 2, 3)
        ]
        victim = await _stream(pools, _req("kill-d", prompts[1], decode_worker="decode-0"))
        return victim, list(await asyncio.gather(*others))

    chunks, others = asyncio.run(go())
    assert [t for c in chunks for t in c.token_ids] == expected[1]  # resumed: the same tokens
    assert chunks[-1].finished and chunks[-1].error == "" and chunks[-1].worker_id == "decode-1"
    assert [[t for c in o for t in c.token_ids] for o in others] == [expected[i] for i in (0, 2, 3)]
    assert _pid_when_back(decode[0]) != pid_before
    assert _zero_blocks(pools) == IDLE


def test_decode_killed_in_colocated_mode_resumes(cluster, prompts, expected) -> None:
    prefill, decode = cluster
    pools = Pools(prefill, decode, disaggregation="never")
    import ray

    ray.get(decode[1].actor.crash_after_tokens.remote("kill-dl", 3))
    chunks = asyncio.run(_stream(pools, _req("kill-dl", prompts[3], decode_worker="decode-1")))
    assert [t for c in chunks for t in c.token_ids] == expected[3]
    assert chunks[-1].worker_id == "decode-0"
    assert _zero_blocks(pools) == IDLE


@pytest.mark.parametrize("after_chunks", [0, 1, 3])
def test_cancel_at_any_point_returns_every_block(cluster, prompts, after_chunks: int, tmp_path: Path) -> None:
    """after_chunks = 0 cancels mid-transfer: the prefill worker is held after layer 0 of the
    41-token prompt's first 8-token chunk (its ``pause_at_layer`` seam), so the stage is certain;
    1 and 3 cancel while decoding. The other requests still complete."""
    import ray

    prefill, decode = cluster
    pools = Pools(prefill, decode)
    rid, marker = f"v{after_chunks}", tmp_path / "held.marker"
    if after_chunks == 0:
        ray.get(prefill[1].actor.pause_at_layer.remote(rid, 0, str(marker), False, 60.0))

    async def go() -> tuple[list[TokenChunk], list[list[TokenChunk]]]:
        others = [
            asyncio.ensure_future(_stream(pools, _req(f"o{after_chunks}-{i}", p)))
            for i, p in enumerate(prompts)
        ]
        victim: list[TokenChunk] = []
        # a prompt no other request shares: no prefix hit shortens its prefill to fewer chunks
        gen = pools.submit(_req(rid, prompts[0][::-1], prefill_worker="prefill-1", decode_worker="decode-1"))
        if after_chunks == 0:
            first = asyncio.ensure_future(gen.__anext__())
            while not marker.exists():  # held mid-transfer
                await asyncio.sleep(0.01)
            await pools.cancel(rid)  # its cancel, once queued on the worker, ends the hold there
            marker.unlink()
            victim.append(await first)
            await gen.aclose()
        else:
            async for c in gen:
                victim.append(c)
                if len(victim) == after_chunks:
                    await gen.aclose()
                    break
        return victim, list(await asyncio.gather(*others))

    victim, others = asyncio.run(go())
    if after_chunks == 0:
        assert [(c.token_ids, c.error, c.finished) for c in victim] == [([], "cancelled", True)]
    else:
        assert len(victim) == after_chunks and not victim[-1].finished
    assert all(o[-1].finished and o[-1].error == "" for o in others)
    assert _zero_blocks(pools) == IDLE


@pytest.mark.parametrize("mode", ["never", "always"])
def test_a_slow_reader_holds_up_no_other_stream(cluster, prompts, expected, mode: str) -> None:
    """Five requests share one decode worker's token stream; one client reads its first chunk and
    then stops reading. The four others finish with their exact tokens while it has still read one
    chunk (the stream fans out into per-request queues: nothing waits for a slow reader); then it
    reads the rest, exact too, and nothing is held."""
    prefill, decode = cluster
    pools = Pools(prefill, decode, disaggregation=mode)

    async def go() -> tuple[list[TokenChunk], int, list[list[TokenChunk]]]:
        others_done = asyncio.Event()
        slow: list[TokenChunk] = []
        read_when_others_done = -1

        async def slow_reader() -> None:
            nonlocal read_when_others_done
            async for c in pools.submit(_req(f"slow-{mode}", prompts[0], decode_worker="decode-0")):
                slow.append(c)
                if len(slow) == 1:
                    await others_done.wait()  # the client stalls: reads nothing more for now
                    read_when_others_done = len(slow)

        reader = asyncio.ensure_future(slow_reader())
        others = await asyncio.gather(
            *(
                _stream(pools, _req(f"fast-{mode}-{i}", p, decode_worker="decode-0"))
                for i, p in enumerate(prompts)
            )
        )
        others_done.set()
        await reader
        return slow, read_when_others_done, list(others)

    slow, read_then, others = asyncio.run(go())
    assert read_then == 1  # every other stream finished while the slow one had read one chunk
    assert [[t for c in o for t in c.token_ids] for o in others] == expected
    assert [t for c in slow for t in c.token_ids] == expected[0] and slow[-1].error == ""
    assert _zero_blocks(pools) == IDLE
