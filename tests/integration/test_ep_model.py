"""Expert and tensor parallelism of MoE and MLA models, on CPU: two spawned processes, gloo.

Each checkpoint runs on one pair of ranks (tests/tp_ranks.py) split three ways
(engine/tp_layout.Parallelism):

- tp 1, ep 2: attention replicated, each rank half the experts, pairs dispatched and combined
  all-to-all. Logits must equal one rank's **bit for bit**: every expert row is computed by the same
  batch-invariant kernel wherever it runs, and the weighting and the per-token sum in expert order
  are the same operations (engine/expert_parallel.py).
- tp 2, ep 2: heads (MLA: query heads; the latent is replicated) split, experts split.
- tp 2, ep 1: heads split, every expert's columns split.
  With tp 2 the row-parallel sums run in another order: within ATOL of one rank, as dense TP
  (tests/integration/test_tp_model.py).

And the engine (rank 0 schedules, rank 1 follows every step; chunked prefill, batched decode) with
ep 2 gives exactly one rank's greedy tokens and transformers' ``generate`` tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.llm_engine import EngineConfig, LLMEngine
from engine.model import load_model
from engine.sampling_params import SamplingParams
from tests.helpers_checkpoints import load_reference, make_checkpoint
from tests.tp_ranks import RankProcesses

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ATOL = 5e-5
MAX_NEW = 10
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe-shared": ("qwen2_moe", {}),
    "deepseek_v3-mla": ("deepseek_v3", {"num_hidden_layers": 3}),
}
ENGINE = dict(block_size=16, max_num_batched_tokens=32, num_blocks=64)


@pytest.fixture(scope="module")
def ranks() -> Iterator[RankProcesses]:
    group = RankProcesses(2)
    try:
        yield group
    finally:
        group.close()


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list]:
    arch, kwargs = CONFIGS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=5, **kwargs)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in (3, 17, 40, 64)]
    return request.param, path, prompts


def test_logits_by_split(ranks: RankProcesses, case: tuple[str, Path, list]) -> None:
    name, path, prompts = case
    model = load_model(path)
    one = []
    for p in prompts:
        n = len(p)
        kv = model.kv_layout(16).allocate(-(-n // 16))
        meta = AttentionMetadata.build([n], [n], [list(range(-(-n // 16)))], 16)
        one.append(model.compute_logits(model.forward(torch.tensor(p), torch.arange(n), kv, meta)))
    for tp, ep in ((1, 2), (2, 2), (2, 1)):
        got = ranks.call("logits", path=str(path), prompts=prompts, dtype="float32", tp=tp, ep=ep)
        worst = max(float((g - w).abs().max()) for g, w in zip(got, one, strict=True))
        print(f"\n{name} tp {tp} ep {ep}: max |diff| vs one rank {worst:.3g}")
        if tp == 1:
            assert all(torch.equal(g, w) for g, w in zip(got, one, strict=True)), name
        else:
            assert worst <= ATOL, (name, tp, ep)
            assert all(torch.equal(g.argmax(-1), w.argmax(-1)) for g, w in zip(got, one, strict=True))


def test_ep2_engine_greedy_equals_one_rank_and_transformers(ranks: RankProcesses, case: tuple) -> None:
    name, path, prompts = case
    kw = dict(ENGINE, tensor_parallel_size=1, expert_parallel_size=2)
    ep2 = ranks.call("generate", path=str(path), prompts=prompts, max_new=MAX_NEW, engine_kw=kw)
    engine = LLMEngine(EngineConfig(model=path, **ENGINE))
    one = [o.new_token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))]
    engine.close()
    ref = load_reference(path)
    with torch.inference_mode():
        expected = [
            ref.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)[0, len(p) :].tolist()
            for p in prompts
        ]
    assert one == expected, name
    assert ep2 == expected, name
