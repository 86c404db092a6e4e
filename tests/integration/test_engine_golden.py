"""The engine's golden test: greedy output of the continuous-batching engine equals transformers'
``generate`` token for token, for batches that mix prompt lengths, with chunked prefill, prefix
reuse and preemption forced by a small KV pool. fp32 exactly; bf16 up to a near tie in the
reference's own logits (tests/greedy.py states the bound)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampling_params import SamplingParams
from tests.greedy import assert_greedy_matches
from tests.helpers_checkpoints import load_reference, make_checkpoint

pytestmark = pytest.mark.integration

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# name -> (arch, run dtype, checkpoint kwargs)
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-gqa-untied": ("llama", "float32", {}),
    "llama-mha-tied": ("llama", "float32", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-qkv-bias": ("qwen2", "float32", {"tie_word_embeddings": False}),
    "llama3-rope": ("llama", "float32", {"rope_parameters": LLAMA3}),
    "mistral-sharded": ("mistral", "float32", {"sharded": True}),
    "llama-bf16": ("llama", "bfloat16", {"dtype": "bfloat16"}),
}
MAX_NEW = 16


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(24)]
    lens = [3, 17, 40, 9, 64]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(5)])  # two prompts share 24 tokens
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(11)])
    return prompts


@pytest.fixture(scope="module", params=list(CONFIGS))
def golden(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch, dtype, kwargs = CONFIGS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=7, **kwargs)
    ref = load_reference(path, dtype)
    prompts = _prompts(ref.config.vocab_size, seed=len(request.param))
    expected = []
    with torch.inference_mode():
        for p in prompts:
            out = ref.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
            expected.append(out[0, len(p) :].tolist())
    return path, dtype, prompts, expected, ref


def _run(
    path: Path, dtype: str, prompts: list[list[int]], **engine_kwargs: Any
) -> tuple[list[list[int]], int]:
    engine = LLMEngine(EngineConfig(model=path, dtype=dtype, **engine_kwargs))
    preemptions = 0
    schedule = engine.scheduler.schedule

    def counting_schedule():
        nonlocal preemptions
        out = schedule()
        preemptions += len(out.preempted)
        return out

    engine.scheduler.schedule = counting_schedule  # type: ignore[method-assign]
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    assert engine.block_manager.num_used_blocks == 0
    engine.close()
    return [o.new_token_ids for o in outs], preemptions


def test_batch_matches_transformers(golden) -> None:
    path, dtype, prompts, expected, ref = golden
    got, _ = _run(path, dtype, prompts)
    assert_greedy_matches(ref, prompts, expected, got, dtype)


def test_reference_paths_match_transformers(golden) -> None:
    """The default CPU path runs decode attention in a C kernel and fp32 matmuls in prepacked
    oneDNN; the torch reference paths (SDPA-style attention, F.linear) must match as well."""
    path, dtype, prompts, expected, ref = golden
    got, _ = _run(path, dtype, prompts, attn_backend="torch", linear_backend="torch")
    assert_greedy_matches(ref, prompts, expected, got, dtype)


def test_chunked_prefill_and_preemption_match_transformers(golden) -> None:
    path, dtype, prompts, expected, ref = golden
    # an 8-token budget chunks every long prompt; 24 blocks of 4 tokens cannot hold all seven
    # requests at once, so the scheduler preempts and recomputes
    got, preemptions = _run(
        path, dtype, prompts, block_size=4, num_blocks=24, max_num_batched_tokens=8, max_num_seqs=8
    )
    assert preemptions > 0
    assert_greedy_matches(ref, prompts, expected, got, dtype)


def test_prefix_reuse_matches_transformers(golden) -> None:
    path, dtype, prompts, expected, ref = golden
    engine = LLMEngine(EngineConfig(model=path, dtype=dtype, block_size=4))
    first = engine.generate(prompts[-2:-1], SamplingParams(max_tokens=MAX_NEW))[0]
    second = engine.generate(prompts[-1:], SamplingParams(max_tokens=MAX_NEW))[0]
    assert second.num_cached_tokens == 24  # the shared 24-token prefix, six full blocks of 4
    got = [first.new_token_ids, second.new_token_ids]
    assert_greedy_matches(ref, prompts[-2:], expected[-2:], got, dtype)
    assert engine.block_manager.num_used_blocks == 0
    engine.close()
