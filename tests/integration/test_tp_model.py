"""Tensor parallelism against one rank and against transformers, on CPU: two spawned processes, gloo.

For each tiny checkpoint (KV heads divided, KV heads replicated, q/k/v and output biases, a tied
and an odd-sized vocabulary) a TP = 2 group runs the prompts through its two shards:

- logits: every position's logits equal TP = 1's within ``ATOL`` (fp32). They cannot be bit-equal:
  the output and down projections are row-parallel, so each rank sums half of every dot product
  and the all-reduce adds the halves, where one rank runs one FMA chain in order. Measured on
  these checkpoints (an AVX-512 machine, the C GEMM): max |TP2 - TP1| 1.9e-06 .. 2.5e-06 with
  logits up to ~3.6, i.e. about 10 float32 ulps at that magnitude; ``ATOL`` = 5e-5 leaves 20x.
  No position of these prompts has its top two TP = 1 logits within 2 x ATOL of each other
  (asserted; the smallest gap, 8e-4 on these, is printed), so within the tolerance no argmax can flip.
- greedy output: the TP = 2 engine (rank 0 schedules and samples, rank 1 follows every step,
  chunked prefill and batched decode) gives exactly TP = 1's tokens and transformers' ``generate``
  tokens, token for token.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.model import load_model
from engine.sampling_params import SamplingParams
from tests.helpers_checkpoints import load_reference, make_checkpoint
from tests.tp_ranks import RankProcesses

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ATOL = 5e-5
MAX_NEW = 12
# name -> (arch, checkpoint kwargs)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa-kv-split": ("llama", {}),  # 4 heads, 2 KV heads: one KV head per rank
    "llama-kv-replicated-bias-odd-vocab": (
        "llama",
        {"num_key_value_heads": 1, "attention_bias": True, "vocab_size": 385},
    ),  # 1 KV head on both ranks; o_proj bias added once; vocab 385 = 193 + 192 (+ 1 pad row)
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),  # q/k/v bias; LM head = embedding rows
}
ENGINE = dict(block_size=16, max_num_batched_tokens=32, num_blocks=64)  # 40/64-token prompts: chunked


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(3, vocab) for _ in range(20)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (3, 17, 40, 64)]
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(5)])  # shares a prefix block
    prompts.append(shared + [rng.randrange(3, vocab) for _ in range(9)])
    return prompts


@pytest.fixture(scope="module")
def ranks() -> Iterator[RankProcesses]:
    group = RankProcesses(2)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, list[list[int]]]:
    arch, kwargs = CONFIGS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=5, **kwargs)
    vocab = int(kwargs.get("vocab_size", 384))
    return request.param, path, _prompts(vocab)


def test_tp2_logits_equal_tp1_within_the_stated_tolerance(ranks: RankProcesses, case: tuple) -> None:
    name, path, prompts = case
    got = ranks.call("logits", path=str(path), prompts=prompts, dtype="float32")
    model = load_model(path)
    worst, scale, gap = 0.0, 0.0, float("inf")
    from engine.attention import AttentionMetadata

    for p, tp2 in zip(prompts, got, strict=True):
        n = len(p)
        kv = model.kv_layout(16).allocate(-(-n // 16))
        meta = AttentionMetadata.build([n], [n], [list(range(-(-n // 16)))], 16)
        tp1 = model.compute_logits(model.forward(torch.tensor(p), torch.arange(n), kv, meta))  # (n, V)
        assert tp2.shape == tp1.shape == (n, model.config.vocab_size)
        worst = max(worst, float((tp2 - tp1).abs().max()))
        scale = max(scale, float(tp1.abs().max()))
        top2 = tp1.topk(2, dim=-1).values
        gap = min(gap, float((top2[:, 0] - top2[:, 1]).min()))
        assert torch.equal(tp2.argmax(-1), tp1.argmax(-1))
    print(f"\n{name}: max |TP2 - TP1| = {worst:.3g} (logits up to {scale:.3g}); smallest top-2 gap {gap:.3g}")
    assert worst <= ATOL
    assert gap > 2 * ATOL  # no near tie: within the tolerance, no argmax can flip


def test_tp2_greedy_equals_tp1_and_transformers(ranks: RankProcesses, case: tuple) -> None:
    name, path, prompts = case
    tp2 = ranks.call("generate", path=str(path), prompts=prompts, max_new=MAX_NEW, engine_kw=ENGINE)
    engine = LLMEngine(EngineConfig(model=path, **ENGINE))
    tp1 = [o.new_token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))]
    engine.close()
    ref = load_reference(path)
    expected = []
    with torch.inference_mode():
        for p in prompts:
            out = ref.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
            expected.append(out[0, len(p) :].tolist())
    assert tp1 == expected, name
    assert tp2 == expected, name
