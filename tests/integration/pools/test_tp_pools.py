"""Tensor-parallel workers as real Ray actors over NIXL: a prefill and a decode worker of TP = 1 and of
TP = 2 (each TP = 2 worker a placement group of two processes, gloo between them). Every pairing —
TP1 -> TP1, TP1 -> TP2, TP2 -> TP1, TP2 -> TP2, and TP2 colocated — gives the tokens of the one-process
engine; a mismatching KV layout is refused at reserve with a clear error; cancels and a killed rank
of either pool leave no block held on any rank of any worker."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer.heads import KVShardLayout
from pool_runtime.actors import PoolSpec, shutdown
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import IncompatibleKV, TokenChunk, WorkRequest
from router.coordinator import PoolRequest, Pools
from tests.ray_fixture import ray_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MAX_NEW = 10
LONG = 64  # tokens of the request whose decode rank is killed: it is still decoding when the kill lands
PAIRS = [(p, d) for p in ("prefill-tp1-0", "prefill-tp2-0") for d in ("decode-tp1-0", "decode-tp2-0")]


def _prompts(seed: int, lens: tuple[int, ...] = (41, 23, 7)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in lens]


# distinct prompts per pairing: no prefix cached by an earlier pairing shortens a transfer
PROMPTS = {pair: _prompts(20 + i) for i, pair in enumerate(PAIRS)}
PROMPTS[("colocated", "decode-tp2-0")] = _prompts(30)
FAULT_PROMPTS = _prompts(40, (41, 37, 30, 33))


@pytest.fixture(scope="module")
def expected(ckpt: Path) -> dict[tuple[int, ...], list[int]]:
    """Greedy tokens of the one-process engine (TP = 1, colocated), per prompt."""
    everything = [p for ps in PROMPTS.values() for p in ps] + FAULT_PROMPTS[:3]
    engine = LLMEngine(EngineConfig(model=ckpt, block_size=4))
    outs = engine.generate(everything, SamplingParams(max_tokens=MAX_NEW, seed=1))
    (long,) = engine.generate([FAULT_PROMPTS[3]], SamplingParams(max_tokens=LONG, seed=1))
    engine.close()
    out = {tuple(p): o.new_token_ids for p, o in zip(everything, outs, strict=True)}
    out[tuple(FAULT_PROMPTS[3])] = long.new_token_ids
    return out


def _config(ckpt: Path, tp: int) -> WorkerConfig:
    # an 8-token budget: a 41-token prompt takes 6 prefill steps, so "mid-transfer" is a real stage
    return WorkerConfig(
        EngineConfig(model=ckpt, block_size=4, num_blocks=96, max_num_batched_tokens=8),
        kv_backend="nixl",
        ack_timeout_s=20,
        tensor_parallel_size=tp,
    )


@pytest.fixture(scope="module")
def pools(ckpt: Path, ray_cluster) -> Iterator[Pools]:  # noqa: F811
    from decode_pool.pool import build_decode_pool
    from prefill_pool.pool import build_prefill_pool

    spec = PoolSpec(replicas=1, num_cpus=0.25)
    handles: list[Any] = []
    try:
        prefill = [
            *build_prefill_pool(_config(ckpt, 1), spec, prefix="prefill-tp1"),
            *build_prefill_pool(_config(ckpt, 2), spec, prefix="prefill-tp2"),
        ]
        handles += prefill
        decode = [
            *build_decode_pool(_config(ckpt, 1), spec, prefix="decode-tp1"),
            *build_decode_pool(_config(ckpt, 2), spec, prefix="decode-tp2"),
        ]
        handles += decode
        yield Pools(prefill, decode, disaggregation="always")
    finally:
        shutdown(handles)


def _handle(pools: Pools, worker_id: str) -> Any:
    return next(h for h in [*pools.prefill, *pools.decode] if h.worker_id == worker_id)


async def _stream(pools: Pools, req: PoolRequest) -> list[TokenChunk]:
    return [c async for c in pools.submit(req)]


def _req(rid: str, prompt: list[int], **kw: Any) -> PoolRequest:
    return PoolRequest(rid, prompt, SamplingParams(max_tokens=MAX_NEW, seed=1), **kw)


def _tokens(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def _back(handle: Any) -> list[dict[str, int]]:
    """Every rank's usage once the worker answers again (Ray refuses calls while it restarts)."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    for _ in range(600):
        try:
            return list(ray.get(handle.actor.rank_usage.remote(), timeout=60))
        except (ActorUnavailableError, RayActorError):
            time.sleep(0.2)
    raise AssertionError(f"{handle.worker_id} did not come back")


def _all_returned(pools: Pools, timeout_s: float = 30.0) -> dict[str, Any]:
    """What every worker still holds, rank by rank: must all be zero. A cancel is answered at once
    and applied at the worker's next step boundary, so this waits (up to ``timeout_s``, a hang
    bound) for the holdings to reach zero, and returns them as they are then."""
    deadline = time.monotonic() + timeout_s
    while True:
        held: dict[str, Any] = {}
        for h in [*pools.prefill, *pools.decode]:
            ranks = _back(h)
            held[h.worker_id] = [(u["reserved_blocks"], u["sends_in_flight"]) for u in ranks]
        for w in asyncio.run(pools.load()):
            held[w.worker_id] = (held[w.worker_id], w.used_blocks, w.reserved_blocks)
        zero = all(all(r == (0, 0) for r in ranks) and (u, v) == (0, 0) for ranks, u, v in held.values())
        if zero or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


IDLE = {
    "prefill-tp1-0": ([(0, 0)], 0, 0),
    "prefill-tp2-0": ([(0, 0), (0, 0)], 0, 0),
    "decode-tp1-0": ([(0, 0)], 0, 0),
    "decode-tp2-0": ([(0, 0), (0, 0)], 0, 0),
}


@pytest.mark.parametrize(("prefill", "decode"), PAIRS, ids=["1to1", "1to2", "2to1", "2to2"])
def test_every_tp_pairing_gives_the_one_process_tokens(
    pools: Pools, expected: dict, prefill: str, decode: str
) -> None:
    async def go() -> list[list[TokenChunk]]:
        reqs = [
            _req(f"{prefill}>{decode}-{i}", p, prefill_worker=prefill, decode_worker=decode)
            for i, p in enumerate(PROMPTS[(prefill, decode)])
        ]
        return list(await asyncio.gather(*(_stream(pools, r) for r in reqs)))  # batched on both sides

    for prompt, chunks in zip(PROMPTS[(prefill, decode)], asyncio.run(go()), strict=True):
        assert chunks[-1].error == "" and chunks[-1].finished
        assert (chunks[-1].prefill_worker, chunks[-1].worker_id) == (prefill, decode)
        assert _tokens(chunks) == expected[tuple(prompt)]
        # every block of the prompt moved once, whatever the split: the bytes of all heads
        assert (
            chunks[-1].kv_bytes == -(-len(prompt) // 4) * 2 * 2 * 2 * 4 * 16 * 4
        )  # L, K/V, H_kv, B, D, fp32
    assert _all_returned(pools) == IDLE


def test_tp2_colocated_gives_the_one_process_tokens(pools: Pools, expected: dict) -> None:
    prompts = PROMPTS[("colocated", "decode-tp2-0")]

    async def go() -> list[list[TokenChunk]]:
        reqs = [
            _req(f"colo-{i}", p, decode_worker="decode-tp2-0", disaggregation="never")
            for i, p in enumerate(prompts)
        ]
        return list(await asyncio.gather(*(_stream(pools, r) for r in reqs)))

    for prompt, chunks in zip(prompts, asyncio.run(go()), strict=True):
        assert chunks[-1].worker_id == "decode-tp2-0" and not chunks[-1].prefill_worker
        assert _tokens(chunks) == expected[tuple(prompt)]


def test_a_layout_mismatch_is_refused_at_reserve(pools: Pools, ckpt: Path) -> None:
    """Another block size (or model, dtype, head count) cannot be received: the reserve says what
    differs, holds nothing, and the worker keeps serving."""
    import ray

    d = _handle(pools, "decode-tp2-0")
    mine: KVShardLayout = ray.get(d.actor.layout.remote())
    assert (mine.tp_size, mine.num_kv_heads, mine.block_size) == (2, 2, 4)
    other = KVShardLayout(
        mine.fingerprint, mine.dtype, 16, mine.num_layers, mine.num_kv_heads, mine.head_dim, mine.held
    )
    req = WorkRequest("bad-layout", FAULT_PROMPTS[0], SamplingParams(max_tokens=2, seed=1))
    with pytest.raises(
        IncompatibleKV, match="decode worker decode-tp2-0 cannot take KV .*: block_size 4 vs 16"
    ):
        ray.get(d.actor.reserve.remote(req, other))

    class OtherModelPrefill:  # a prefill worker that announces another model's layout
        worker_id = "prefill-other"

        async def kv_layout(self) -> KVShardLayout:
            return KVShardLayout("qwen2-float32-0", mine.dtype, 4, mine.num_layers, 2, mine.head_dim)

    odd = Pools([OtherModelPrefill()], pools.decode, disaggregation="always")  # type: ignore[list-item]
    chunks = asyncio.run(_stream(odd, _req("odd", FAULT_PROMPTS[0], decode_worker="decode-tp2-0")))
    assert chunks[-1].finished and "cannot take KV from this prefill worker: fingerprint" in chunks[-1].error
    assert _all_returned(pools) == IDLE


@pytest.mark.parametrize("after_chunks", [0, 2])
def test_cancel_returns_every_ranks_blocks(pools: Pools, after_chunks: int, tmp_path: Path) -> None:
    """0: cancelled while the 41-token prompt is prefilled and streamed TP2 -> TP2 (6 steps): the
    prefill worker is held after layer 0 of its first chunk (its ``pause_at_layer`` seam), so the
    cancel lands mid-transfer for sure; 2: while decoding on the TP2 decode worker."""
    import ray

    rid = f"cancel-{after_chunks}"
    marker = tmp_path / "held.marker"
    if after_chunks == 0:
        p = _handle(pools, "prefill-tp2-0")
        ray.get(p.actor.pause_at_layer.remote(rid, 0, str(marker), False, 60.0))

    async def go() -> list[TokenChunk]:
        got: list[TokenChunk] = []
        gen = pools.submit(
            _req(rid, FAULT_PROMPTS[0], prefill_worker="prefill-tp2-0", decode_worker="decode-tp2-0")
        )
        if after_chunks == 0:
            first = asyncio.ensure_future(gen.__anext__())
            while not marker.exists():  # the prefill is held mid-transfer
                await asyncio.sleep(0.01)
            await pools.cancel(rid)  # its cancel, once queued on the worker, ends the hold there
            marker.unlink()
            got.append(await first)
        else:
            async for c in gen:
                got.append(c)
                if len(got) == after_chunks:
                    break
        await gen.aclose()
        return got

    got = asyncio.run(go())
    if after_chunks == 0:  # nothing was streamed: the stream's one chunk is the cancel
        assert [(c.token_ids, c.error, c.finished) for c in got] == [([], "cancelled", True)]
    else:
        assert len(got) == 2 and not got[-1].finished and got[-1].error == ""
    assert _all_returned(pools) == IDLE


def test_a_prefill_rank_killed_mid_transfer_is_retried_and_the_worker_restarts_whole(
    pools: Pools, expected: dict
) -> None:
    """Rank 1 of the TP2 prefill worker dies after sending layer 0 of its heads to the TP2 decode
    worker: rank 0 sees its group broken and ends too, the coordinator frees the reservation on both
    decode ranks and retries on the TP1 prefill worker, with the same tokens; Ray then restarts the
    TP2 prefill worker as a whole (two new processes), and it serves again."""
    import ray

    p = _handle(pools, "prefill-tp2-0")
    before = {u["pid"] for u in _back(p)}
    ray.get(p.actor.crash_after_layer.remote("kill-rank", 0, 1))
    prompt = FAULT_PROMPTS[1]
    chunks = asyncio.run(
        _stream(
            pools, _req("kill-rank", prompt, prefill_worker="prefill-tp2-0", decode_worker="decode-tp2-0")
        )
    )
    assert chunks[-1].error == "" and chunks[-1].prefill_worker == "prefill-tp1-0"
    assert _tokens(chunks) == expected[tuple(prompt)]
    assert _all_returned(pools) == IDLE
    after = {u["pid"] for u in _back(p)}
    assert len(after) == 2 and not before & after  # both ranks are new processes
    prompt = FAULT_PROMPTS[2]
    again = asyncio.run(
        _stream(
            pools, _req("after-restart", prompt, prefill_worker="prefill-tp2-0", decode_worker="decode-tp1-0")
        )
    )
    assert again[-1].prefill_worker == "prefill-tp2-0" and _tokens(again) == expected[tuple(prompt)]


def test_a_decode_rank_killed_mid_generation_resumes_elsewhere(pools: Pools, expected: dict) -> None:
    """Rank 1 of the TP2 decode worker is killed while the request decodes there: the worker goes
    down whole, the request resumes on the TP1 decode worker with the same tokens, and the TP2
    worker comes back with nothing held."""
    d = _handle(pools, "decode-tp2-0")
    victim = _back(d)[1]["pid"]
    prompt = FAULT_PROMPTS[3]

    async def go() -> list[TokenChunk]:
        got: list[TokenChunk] = []
        req = PoolRequest(
            "kill-decode-rank",
            prompt,
            SamplingParams(max_tokens=LONG, seed=1),
            prefill_worker="prefill-tp1-0",
            decode_worker="decode-tp2-0",
        )
        async for c in pools.submit(req):
            got.append(c)
            if len(got) == 1:  # the first token: decoding on decode-tp2-0 has just begun
                os.kill(victim, signal.SIGKILL)
        return got

    chunks = asyncio.run(go())
    assert chunks[-1].error == "" and chunks[-1].worker_id == "decode-tp1-0"
    assert _tokens(chunks) == expected[tuple(prompt)]
    assert _all_returned(pools) == IDLE


def test_rank_0_killed_takes_its_other_ranks_along(pools: Pools, expected: dict) -> None:
    """Rank 0 of the TP2 decode worker dies mid-generation (its own crash hook): its follower, owned
    by it, goes too, the request resumes on the TP1 decode worker, and the worker comes back as
    two new processes with nothing held."""
    import ray

    d = _handle(pools, "decode-tp2-0")
    before = {u["pid"] for u in _back(d)}
    prompt = FAULT_PROMPTS[3]
    ray.get(d.actor.crash_after_tokens.remote("kill-rank-0", 4))
    req = PoolRequest(
        "kill-rank-0",
        prompt,
        SamplingParams(max_tokens=LONG, seed=1),
        prefill_worker="prefill-tp2-0",
        decode_worker="decode-tp2-0",
    )
    chunks = asyncio.run(_stream(pools, req))
    assert chunks[-1].error == "" and chunks[-1].worker_id == "decode-tp1-0"
    assert _tokens(chunks) == expected[tuple(prompt)]
    assert _all_returned(pools) == IDLE
    after = {u["pid"] for u in _back(d)}
    assert len(after) == 2 and not before & after
