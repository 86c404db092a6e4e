"""PrefillWorker -> in-process transport -> DecodeWorker, stepped by hand in one process: the output
equals the single-engine output, and every cancel / failure path returns every block."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from decode_pool.worker import DecodeWorker
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer.protocol import KVTransferError
from pool_runtime.handoff import FirstToken, PoolError
from prefill_pool.worker import Cancelled, PrefillWorker
from tests.integration.pools.helpers import decode_all, handoff, prefill_all, start, take, work, worker_config

pytestmark = pytest.mark.integration

MAX_NEW = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    shared = [rng.randrange(3, 384) for _ in range(20)]
    out = [[rng.randrange(3, 384) for _ in range(n)] for n in (3, 16, 41, 9, 30)]
    out += [
        shared + [rng.randrange(3, 384) for _ in range(6)],
        shared + [rng.randrange(3, 384) for _ in range(13)],
    ]
    return out


@pytest.fixture(scope="module")
def expected(ckpt: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=ckpt, block_size=4))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, seed=1))
    engine.close()
    return [o.new_token_ids for o in outs]


@pytest.fixture
def pair(ckpt: Path) -> Iterator[tuple[PrefillWorker, DecodeWorker]]:
    p = PrefillWorker(worker_config(ckpt, "p0"))
    d = DecodeWorker(worker_config(ckpt, "d0"))
    try:
        yield p, d
    finally:
        p.close()
        d.close()
    assert p.load().used_blocks == 0 and d.load().used_blocks == 0


def _assert_idle(p: PrefillWorker, d: DecodeWorker) -> None:
    assert p.load().used_blocks == 0
    assert p.sender.num_in_flight == 0
    dl = d.load()
    assert (dl.used_blocks, dl.reserved_blocks, dl.running, dl.waiting) == (0, 0, 0, 0)


def test_handoff_matches_single_engine(pair, prompts, expected) -> None:
    p, d = pair
    reqs = [work(f"r{i}", pr, MAX_NEW) for i, pr in enumerate(prompts)]
    got = handoff(p, d, reqs)
    assert [got[r.request_id] for r in reqs] == expected
    _assert_idle(p, d)
    # the same prompts again: both sides now hold the prompts' full blocks in their prefix caches,
    # so the decode worker asks only for the tail and the prefill worker recomputes only the tail
    reqs2 = [work(f"again{i}", pr, MAX_NEW) for i, pr in enumerate(prompts)]
    grants = [d.reserve(r) for r in reqs2]
    assert [g.num_cached_blocks for g in grants] == [(len(pr) - 1) // 4 for pr in prompts]
    assert [len(g.dest.block_ids) for g in grants] == [1] * len(prompts)  # only the last block
    futs = [p.submit(r, g) for r, g in zip(reqs2, grants, strict=True)]
    prefill_all(p, futs)
    firsts = [f.result() for f in futs]
    assert [f.num_cached_tokens for f in firsts] == [4 * ((len(pr) - 1) // 4) for pr in prompts]
    for r, f in zip(reqs2, firsts, strict=True):
        start(d, r.request_id, f)
    chunks = decode_all(d, [r.request_id for r in reqs2])
    assert [[t for c in chunks[r.request_id] for t in c.token_ids] for r in reqs2] == expected
    _assert_idle(p, d)


def test_workers_report_their_measured_speed(pair, prompts) -> None:
    p, d = pair
    assert (p.load().prefill_tokens_per_s, d.load().decode_step_s) == (0.0, 0.0)  # nothing measured yet
    handoff(p, d, [work(f"s{i}", pr, MAX_NEW) for i, pr in enumerate(prompts)])
    # steps that carried prompt chunks (prefill) and steps of decodes alone (decode), as measured
    assert p.load().prefill_tokens_per_s > 0 and d.load().decode_step_s > 0


def test_first_token_finishes_request(pair, prompts, expected) -> None:
    p, d = pair
    got = handoff(p, d, [work("one", prompts[2], max_tokens=1)])
    assert got["one"] == expected[2][:1]
    _assert_idle(p, d)


def test_local_prefill_matches(pair, prompts, expected) -> None:
    p, d = pair
    for i, pr in enumerate(prompts):
        d.submit_local(work(f"l{i}", pr, MAX_NEW))
    chunks = decode_all(d, [f"l{i}" for i in range(len(prompts))])
    assert [[t for c in chunks[f"l{i}"] for t in c.token_ids] for i in range(len(prompts))] == expected
    _assert_idle(p, d)


def test_cancel_queued(pair, prompts) -> None:
    p, d = pair
    req = work("q", prompts[2])
    fut = p.submit(req, d.reserve(req))
    p.cancel("q")
    assert d.cancel("q")
    p.step()
    with pytest.raises(Cancelled):
        fut.result(0)
    _assert_idle(p, d)


@pytest.mark.parametrize("steps", [1, 3])
def test_cancel_mid_transfer(pair, prompts, expected, steps: int) -> None:
    p, d = pair
    req = work("m", prompts[2])  # 41 tokens, 8 per step: 6 steps
    fut = p.submit(req, d.reserve(req))
    for _ in range(steps):
        p.step()
    assert not fut.done() and p.load().used_blocks > 0
    p.cancel("m")
    p.step()
    assert d.cancel("m")
    with pytest.raises(Cancelled):
        fut.result(0)
    d.step()
    _assert_idle(p, d)
    # the blocks are reused by a full request, which comes out right
    assert handoff(p, d, [work("after", prompts[2], MAX_NEW)])["after"] == expected[2]
    _assert_idle(p, d)


def test_cancel_committed_and_decoding(pair, prompts) -> None:
    p, d = pair
    a, b = work("a", prompts[1]), work("b", prompts[3])
    ga, gb = d.reserve(a), d.reserve(b)
    fa, fb = p.submit(a, ga), p.submit(b, gb)
    prefill_all(p, [fa, fb])
    d.step()  # both committed, not started
    assert d.cancel("a")  # committed, never started
    start(d, "b", fb.result())
    d.step()
    d.step()
    assert take(d, "b")[0].token_ids
    assert d.cancel("b")  # decoding
    assert not d.cancel("b")
    assert take(d, "b") == []  # nothing more is streamed for it
    _assert_idle(p, d)


def test_digest_mismatch_fails_both_sides(pair, prompts) -> None:
    p, d = pair
    req = work("bad", prompts[1])
    fut = p.submit(req, d.reserve(req))
    p.sender.corrupt_after_digest = True
    try:
        prefill_all(p, [fut])
    finally:
        p.sender.corrupt_after_digest = False
    with pytest.raises(KVTransferError, match="digest mismatch"):
        fut.result(0)
    d.step()
    (chunk,) = take(d, "bad")
    assert chunk.finished and chunk.finish_reason == "abort" and "digest mismatch" in chunk.error
    with pytest.raises(PoolError, match="no reservation"):
        start(d, "bad", FirstToken("bad", 7, "p0"))
    _assert_idle(p, d)


def test_lease_expiry_frees_blocks(ckpt: Path, prompts) -> None:
    d = DecodeWorker(worker_config(ckpt, "d-lease", lease_s=0.05))
    try:
        d.reserve(work("late", prompts[2]))
        assert d.load().used_blocks == 11
        time.sleep(0.1)
        d.step()
        (chunk,) = take(d, "late")
        assert chunk.finished and "deadline passed" in chunk.error
        assert (d.load().used_blocks, d.load().reserved_blocks) == (0, 0)
    finally:
        d.close()


def test_no_room_is_backpressure(ckpt: Path, prompts) -> None:
    from kv_transfer.protocol import NoRoomError

    d = DecodeWorker(worker_config(ckpt, "d-small", num_blocks=12))
    try:
        d.reserve(work("big", prompts[2]))  # 11 of 12 blocks
        with pytest.raises(NoRoomError):
            d.reserve(work("big2", prompts[2]))
        assert d.load().used_blocks == 11
        d.cancel("big")
        assert d.load().used_blocks == 0
    finally:
        d.close()
