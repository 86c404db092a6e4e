"""Tensor parallelism on CUDA (``make test-gpu``; skipped without a GPU): the NCCL path.

- NCCL, one rank: a real NCCL process group runs every collective of the forward (two
  all-reduces per block, the LM head's gather) on the GPU; with one rank each is the identity,
  so logits equal the model without a group bit for bit.
- two ranks on one GPU over gloo (NCCL refuses two ranks on one device): the sharded model on CUDA
  (Triton attention, its half of the heads, the padded vocabulary gather) against TP = 1 on CUDA.
- NCCL, two ranks on two GPUs (needs two): logits within ``GPU_ATOL`` of TP = 1 and the same
  greedy tokens. cuBLAS picks its kernels by shape, so a sharded matmul may round differently
  from the whole one beyond the all-reduce's reordering: the bound is wider than on CPU.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.llm_engine import EngineConfig, LLMEngine
from engine.model import load_model
from engine.sampling_params import SamplingParams
from tests.helpers_checkpoints import make_checkpoint
from tests.tp_ranks import RankProcesses

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.timeout(600)]

GPU_ATOL = 2e-4
MAX_NEW = 12
ENGINE = dict(block_size=16, max_num_batched_tokens=32, num_blocks=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp-gpu"), "llama", seed=5, vocab_size=385)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 385) for _ in range(n)] for n in (3, 17, 40, 64)]


def _tp1(ckpt: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    model = load_model(ckpt, device="cuda")
    out = []
    for p in prompts:
        n = len(p)
        kv = model.kv_layout(16).allocate(-(-n // 16), "cuda")
        meta = AttentionMetadata.build([n], [n], [list(range(-(-n // 16)))], 16, "cuda")
        ids = torch.tensor(p, device="cuda")
        out.append(model.compute_logits(model.forward(ids, torch.arange(n, device="cuda"), kv, meta)).cpu())
    return out


def _greedy_tp1(ckpt: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=ckpt, device="cuda", **ENGINE))
    try:
        return [o.new_token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))]
    finally:
        engine.close()


def _group(size: int, backend: str) -> Iterator[RankProcesses]:
    group = RankProcesses(size, "cuda", backend=backend)
    try:
        yield group
    finally:
        group.close()


def test_an_nccl_group_runs_the_forwards_collectives_on_the_gpu(ckpt: Path, prompts: list[list[int]]) -> None:
    for group in _group(1, "nccl"):
        got = group.call("logits", path=str(ckpt), prompts=prompts, dtype="float32")
        tokens = group.call("generate", path=str(ckpt), prompts=prompts, max_new=MAX_NEW, engine_kw=ENGINE)
    for a, b in zip(got, _tp1(ckpt, prompts), strict=True):
        assert torch.equal(a, b)  # one rank: every all-reduce and the gather are the identity
    assert tokens == _greedy_tp1(ckpt, prompts)


def test_two_ranks_on_one_gpu_over_gloo_equal_tp1(ckpt: Path, prompts: list[list[int]]) -> None:
    for group in _group(2, "gloo"):
        got = group.call("logits", path=str(ckpt), prompts=prompts, dtype="float32")
        tokens = group.call("generate", path=str(ckpt), prompts=prompts, max_new=MAX_NEW, engine_kw=ENGINE)
    worst = max(float((a - b).abs().max()) for a, b in zip(got, _tp1(ckpt, prompts), strict=True))
    print(f"\nTP2 on one GPU (gloo): max |TP2 - TP1| = {worst:.3g}")
    assert worst <= GPU_ATOL
    assert tokens == _greedy_tp1(ckpt, prompts)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tp2_over_nccl_on_two_gpus_equals_tp1(ckpt: Path, prompts: list[list[int]]) -> None:
    for group in _group(2, "nccl"):
        got = group.call("logits", path=str(ckpt), prompts=prompts, dtype="float32")
        tokens = group.call("generate", path=str(ckpt), prompts=prompts, max_new=MAX_NEW, engine_kw=ENGINE)
    worst = max(float((a - b).abs().max()) for a, b in zip(got, _tp1(ckpt, prompts), strict=True))
    print(f"\nTP2 over NCCL: max |TP2 - TP1| = {worst:.3g}")
    assert worst <= GPU_ATOL
    assert tokens == _greedy_tp1(ckpt, prompts)
