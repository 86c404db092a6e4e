"""The engine reuses cached prefixes through the tier store: blocks evicted from G1 are offloaded to
G2 (host) and spilled to G3 (disk), and a later request sharing the prefix onboards them instead of
recomputing — with output identical to a run that never cached anything. Every case runs on a
dense Llama and on a DeepSeek-V3 (MLA), whose blocks hold the latent (one plane of one 'head')."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from engine.make_model import make_model
from engine.sampling_params import SamplingParams
from memory_tiers.engine_tiers import EngineTiers
from memory_tiers.tier_store import TierConfig

pytestmark = pytest.mark.integration

BLOCK = 4
PREFIX = 40  # ten full blocks


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4 MLA layers: a latent block (4 x 4 tokens x 40 fp32) is 2.5 KiB + header, over the 4 KiB
    # the corruption case below tells block files by
    overrides = {"num_hidden_layers": 5} if request.param == "deepseek_v3" else None
    path = make_model(
        tmp_path_factory.mktemp("tiers") / "m", "tiny", request.param, seed=3, overrides=overrides
    )
    from engine.config import ModelConfig

    assert ModelConfig.from_pretrained(path).kv_layout(BLOCK).latent == (request.param == "deepseek_v3")
    return path


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> tuple[list[int], list[int], list[int]]:
    rng = random.Random(5)
    prefix = [rng.randrange(4, 500) for _ in range(PREFIX)]
    return prefix, prefix + [7, 8, 9], prefix + [11, 12, 13, 14, 15]


def _engine(model_dir: Path, disk: Path | None, **kw) -> LLMEngine:  # type: ignore[no-untyped-def]
    tiers = TierConfig(
        host_blocks=kw.pop("host_kv_blocks", 64),
        disk_dir=str(disk) if disk else None,
        disk_bytes=1 << 24 if disk else 0,
    )
    return LLMEngine(EngineConfig(model=model_dir, block_size=BLOCK, **kw), tiers=EngineTiers(tiers))


def _reference(model_dir: Path, prompt: list[int]) -> list[int]:
    engine = LLMEngine(EngineConfig(model=model_dir, block_size=BLOCK, enable_prefix_caching=False))
    out = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].new_token_ids
    engine.close()
    return out


def test_prefix_onboarded_from_g2_matches_uncached(model_dir: Path, prompts) -> None:  # type: ignore[no-untyped-def]
    _, first, second = prompts
    engine = _engine(model_dir, None)
    engine.generate([first], SamplingParams(max_tokens=12, ignore_eos=True))
    evicted = engine.block_manager.evict_cached()
    assert evicted >= PREFIX // BLOCK  # the prefix left G1 ...
    assert engine.block_manager.lookup_prefix(second) == 0
    assert (
        engine.tier_store is not None and engine.tier_store.metrics().g2_used_blocks == evicted
    )  # ... for G2
    out = engine.generate([second], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.num_cached_tokens == PREFIX
    assert engine.onboarder is not None and engine.onboarder.blocks_onboarded == PREFIX // BLOCK
    assert out.new_token_ids == _reference(model_dir, second)
    assert engine.block_manager.num_used_blocks == 0
    engine.tier_store.check()
    engine.close()


def test_prefix_survives_restart_in_g3(model_dir: Path, prompts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, first, second = prompts
    engine = _engine(model_dir, tmp_path)
    engine.generate([first], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.block_manager.evict_cached()
    assert engine.tier_store is not None
    assert engine.tier_store.spill_all() >= PREFIX // BLOCK
    engine.tier_store.flush()
    engine.close()

    restarted = _engine(model_dir, tmp_path)  # G2 empty; the G3 index is rebuilt from the files
    out = restarted.generate([second], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.num_cached_tokens == PREFIX
    assert restarted.tier_store is not None
    assert restarted.tier_store.metrics().hits["g3"] >= PREFIX // BLOCK
    assert out.new_token_ids == _reference(model_dir, second)
    assert restarted.block_manager.num_used_blocks == 0
    restarted.close()


def test_corrupt_g3_block_is_recomputed_not_served(model_dir: Path, prompts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, first, second = prompts
    engine = _engine(model_dir, tmp_path)
    engine.generate([first], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.block_manager.evict_cached()
    assert engine.tier_store is not None
    engine.tier_store.spill_all()
    engine.tier_store.flush()
    # flip one payload byte in every block file: each read fails its checksum
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size > 4096:
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
    out = engine.generate([second], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.num_cached_tokens == 0  # nothing corrupt was registered: the prefix was recomputed
    assert out.new_token_ids == _reference(model_dir, second)
    assert engine.block_manager.num_used_blocks == 0
    engine.close()


def test_abort_while_onboarding_returns_every_block(model_dir: Path, prompts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, first, second = prompts
    engine = _engine(model_dir, tmp_path)
    engine.generate([first], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.block_manager.evict_cached()
    assert engine.tier_store is not None
    engine.tier_store.spill_all()
    engine.tier_store.flush()
    rid = engine.add_request(second, SamplingParams(max_tokens=4))
    assert engine.onboarder is not None and engine.onboarder.num_pending == 1  # G3 reads in flight
    assert engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0
    engine.tier_store.check()
    engine.close()
