"""A prefill worker reuses a prefix it holds below G1: blocks its engine evicted were offloaded to G2
(or spilled on to G3), and a later prompt sharing the prefix onboards them into G1 instead of
recomputing them — then streams all of its blocks, onboarded ones included, to a decode worker that
holds nothing. In-process workers stepped by hand; the output equals the single engine's."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from decode_pool.worker import DecodeWorker
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from memory_tiers.tier_store import TierConfig
from prefill_pool.worker import PrefillWorker
from tests.integration.pools.helpers import decode_all, handoff, prefill_all, start, work, worker_config

pytestmark = pytest.mark.integration

MAX_NEW = 12
BLOCK = 4
PREFIX_BLOCKS = 10
G2_BLOCKS = 32


@pytest.fixture(scope="module")
def prompts() -> tuple[list[int], list[int]]:
    """Two prompts sharing a 10-block prefix, with different tails."""
    rng = random.Random(23)
    prefix = [rng.randrange(3, 384) for _ in range(PREFIX_BLOCKS * BLOCK)]
    return prefix + [rng.randrange(3, 384) for _ in range(3)], prefix + [
        rng.randrange(3, 384) for _ in range(6)
    ]


@pytest.fixture(scope="module")
def reference(ckpt: Path, prompts: tuple[list[int], list[int]]) -> tuple[list[list[int]], int]:
    """The single engine's output per prompt, and the KV layout's block bytes."""
    engine = LLMEngine(EngineConfig(model=ckpt, block_size=BLOCK))
    outs = engine.generate(list(prompts), SamplingParams(max_tokens=MAX_NEW, seed=1))
    block_bytes = engine.kv_layout.block_bytes
    engine.close()
    return [o.new_token_ids for o in outs], block_bytes


def _first_then_evict(p: PrefillWorker, ckpt: Path, first: list[int], expected: list[int]) -> None:
    """Hand ``first`` off once (the prefix enters the prefill worker's G1 prefix cache), then evict
    that cache: the engine offloads the evicted blocks to G2."""
    d = DecodeWorker(worker_config(ckpt, "d-first"))
    try:
        assert handoff(p, d, [work("first", first, MAX_NEW)])["first"] == expected
    finally:
        d.close()
    assert p.engine.block_manager.evict_cached() >= PREFIX_BLOCKS
    assert p.engine.block_manager.lookup_prefix(first) == 0  # nothing of it is left in G1


def _second(p: PrefillWorker, ckpt: Path, second: list[int]) -> tuple[list[int], int]:
    """Hand ``second`` off to a fresh decode worker (it holds no block, so every block is sent);
    (its output tokens, the prompt tokens the prefill worker served from its caches)."""
    d = DecodeWorker(worker_config(ckpt, "d-second"))
    try:
        req = work("second", second, MAX_NEW)
        grant = d.reserve(req)
        assert grant.num_cached_blocks == 0
        fut = p.submit(req, grant)
        prefill_all(p, [fut])
        first = fut.result()
        start(d, req.request_id, first)
        chunks = decode_all(d, [req.request_id])[req.request_id]
        assert d.load().used_blocks == 0
        return [t for c in chunks for t in c.token_ids], first.num_cached_tokens
    finally:
        d.close()


def test_prefill_worker_onboards_a_prefix_from_g2(ckpt: Path, prompts, reference) -> None:  # type: ignore[no-untyped-def]
    (first, second), (expected, block_bytes) = prompts, reference
    p = PrefillWorker(worker_config(ckpt, "p0", host_kv_bytes=G2_BLOCKS * block_bytes))
    try:
        store = p.tier_store
        assert store is not None and p.engine.tier_store is store
        _first_then_evict(p, ckpt, first, expected[0])
        assert store.metrics().g2_used_blocks >= PREFIX_BLOCKS  # ... and went down to G2
        tokens, cached = _second(p, ckpt, second)
        assert tokens == expected[1]
        assert cached == PREFIX_BLOCKS * BLOCK  # the shared prefix was not recomputed
        assert p.engine.onboarder is not None and p.engine.onboarder.blocks_onboarded == PREFIX_BLOCKS
        m = store.metrics()
        assert m.hits["g2"] >= PREFIX_BLOCKS
        assert m.bytes_onboarded["g2"] == PREFIX_BLOCKS * block_bytes
        store.check()
        assert p.load().used_blocks == 0 and p.sender.num_in_flight == 0
    finally:
        p.close()


def test_prefill_worker_onboards_a_prefix_from_g3(ckpt: Path, prompts, reference, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (first, second), (expected, block_bytes) = prompts, reference
    cfg = worker_config(ckpt, "p0")
    tiers = TierConfig(host_bytes=G2_BLOCKS * block_bytes, disk_dir=str(tmp_path), disk_bytes=1 << 24)
    p = PrefillWorker(dataclasses.replace(cfg, tiers=tiers))
    try:
        store = p.tier_store
        assert store is not None
        _first_then_evict(p, ckpt, first, expected[0])
        assert store.spill_all() >= PREFIX_BLOCKS  # G2 -> G3, and G2 emptied
        store.flush()
        assert store.metrics().g2_used_blocks == 0
        assert (tmp_path / "p0").is_dir()  # the worker's own G3 directory
        tokens, cached = _second(p, ckpt, second)
        assert tokens == expected[1]
        assert cached == PREFIX_BLOCKS * BLOCK
        m = store.metrics()
        assert m.hits["g3"] >= PREFIX_BLOCKS
        assert m.bytes_onboarded["g3"] == PREFIX_BLOCKS * block_bytes
        store.check()
        assert p.load().used_blocks == 0 and p.sender.num_in_flight == 0
    finally:
        p.close()
