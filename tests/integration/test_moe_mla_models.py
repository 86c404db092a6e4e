"""Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 (MLA) against the transformers class of the
same name, on tiny random checkpoints that class wrote, several shapes each.

fp32 throughout. Tolerance: atol 1e-4 on logits up to ~4 (measured max |diff| ~2e-6: the C GEMM
and the C expert kernel sum in another order than MKL, and MLA's decode attends in the latent
space, W_UK absorbed into the query, where transformers decompresses the cache). Greedy output must
equal ``generate`` token for token, in the bare model and through the continuous-batching engine
(chunked prefill, prefix reuse, a KV pool small enough to preempt).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.llm_engine import EngineConfig, LLMEngine
from engine.model import Model, load_model
from engine.sampling_params import SamplingParams
from tests.helpers_checkpoints import load_reference, make_checkpoint

pytestmark = pytest.mark.integration

ATOL = 1e-4
BLOCK = 8
# DeepSeek-V3's and long-context Qwen3's rope: YaRN (with DeepSeek's mscale on the softmax scale)
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
# id -> (arch, make_checkpoint overrides of tests/helpers_checkpoints.py ARCH_DEFAULTS)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-gqa": ("qwen3", {}),
    "qwen3-mha-bias-tied": (
        "qwen3",
        {"num_key_value_heads": 4, "attention_bias": True, "tie_word_embeddings": True},
    ),
    "mixtral-4x2": ("mixtral", {}),
    "mixtral-8x2-kv1-sharded": (
        "mixtral",
        {"num_local_experts": 8, "num_key_value_heads": 1, "sharded": True},
    ),
    "qwen2_moe-shared-gate": ("qwen2_moe", {}),
    "qwen2_moe-mlp_only-step2-norm": (
        "qwen2_moe",
        {"num_hidden_layers": 3, "mlp_only_layers": [0], "decoder_sparse_step": 2, "norm_topk_prob": True},
    ),
    "qwen3_moe-8x2-norm": ("qwen3_moe", {}),
    "qwen3_moe-top3-no-norm": ("qwen3_moe", {"num_experts_per_tok": 3, "norm_topk_prob": False}),
    "deepseek_v3-dense1-groups": ("deepseek_v3", {}),
    "deepseek_v3-dense2-noqlora-halves": (
        "deepseek_v3",
        {
            "num_hidden_layers": 3,
            "first_k_dense_replace": 2,
            "q_lora_rank": None,
            "rope_interleave": False,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": False,
            "n_shared_experts": 2,
        },
    ),
    "deepseek_v3-yarn-mscale": (
        "deepseek_v3",
        {"rope_parameters": dict(YARN, mscale=1.0, mscale_all_dim=1.0)},
    ),
    "qwen3-yarn": ("qwen3", {"rope_parameters": dict(YARN)}),
    "deepseek_v3-8groups-top3": (
        "deepseek_v3",
        {"n_routed_experts": 16, "n_group": 8, "topk_group": 3, "num_experts_per_tok": 3, "kv_lora_rank": 24},
    ),
}


def _checkpoint(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, kwargs = CASES[name]
    return make_checkpoint(tmp_path_factory.mktemp(name), arch, seed=len(name), **kwargs)


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Model, Any]:
    path = _checkpoint(request.param, tmp_path_factory)
    return path, load_model(path), load_reference(path)


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed))


def _reference(ref: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()  # (T, V)


def test_logits_full_chunked_and_mixed(case: tuple[Path, Model, Any]) -> None:
    """A whole prompt; the same prompt in chunks that end mid-block; and one flat batch mixing a
    prefill chunk with decodes of other sequences, all over non-contiguous block tables."""
    _, model, ref = case
    a, b = _prompt(29, 1), _prompt(21, 2)
    want_a, want_b = _reference(ref, a), _reference(ref, b)
    assert model.kv_layout(BLOCK).latent == (model.config.mla is not None)
    kv = model.kv_layout(BLOCK).allocate(16)
    meta = AttentionMetadata.build([29], [29], [[11, 3, 7, 0]], BLOCK)
    got = model.compute_logits(model.forward(a, torch.arange(29), kv, meta))
    torch.testing.assert_close(got, want_a, atol=ATOL, rtol=0)

    kv = model.kv_layout(BLOCK).allocate(16)
    done = 0
    for chunk in (13, 10):
        meta = AttentionMetadata.build([chunk], [done + chunk], [[9, 2, 14, 5]], BLOCK)
        got = model.compute_logits(
            model.forward(a[done : done + chunk], torch.arange(done, done + chunk), kv, meta)
        )
        torch.testing.assert_close(got, want_a[done : done + chunk], atol=ATOL, rtol=0)
        done += chunk
    # b's first 20 tokens, then [a 23..28 (a chunk) | b 20 (a decode)] in one batch
    meta = AttentionMetadata.build([20], [20], [[1, 6, 12]], BLOCK)
    model.forward(b[:20], torch.arange(20), kv, meta)
    meta = AttentionMetadata.build([6, 1], [29, 21], [[9, 2, 14, 5], [1, 6, 12]], BLOCK)
    ids = torch.cat([a[23:], b[20:]])
    got = model.compute_logits(model.forward(ids, torch.tensor([*range(23, 29), 20]), kv, meta))
    torch.testing.assert_close(got[:6], want_a[23:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[6:], want_b[20:], atol=ATOL, rtol=0)


def _expected(ref: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for p in prompts:
            gen = ref.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False)
            out.append(gen[0, len(p) :].tolist())
    return out


# one shape per family through the whole engine (the bare model covers every shape above)
ENGINE_CASES = (
    "qwen3-gqa",
    "mixtral-4x2",
    "qwen2_moe-mlp_only-step2-norm",
    "qwen3_moe-8x2-norm",
    "deepseek_v3-dense1-groups",
)


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_engine_greedy_equals_generate(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The continuous-batching engine: chunked prefill (16-token budget), a shared prefix reused
    from the cache, and 12 blocks of 8 tokens for 5 sequences of up to 37 tokens (preemption)."""
    path = _checkpoint(name, tmp_path_factory)
    ref = load_reference(path)
    rng = random.Random(7)
    shared = [rng.randrange(3, 384) for _ in range(16)]
    prompts = [[rng.randrange(3, 384) for _ in range(n)] for n in (3, 17, 40)]
    prompts += [shared + [rng.randrange(3, 384) for _ in range(n)] for n in (5, 9)]
    want = _expected(ref, prompts, 12)
    engine = LLMEngine(EngineConfig(model=path, block_size=BLOCK, num_blocks=12, max_num_batched_tokens=16))
    got = [o.new_token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=12))]
    assert engine.block_manager.num_used_blocks == 0
    engine.close()
    assert got == want


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mixtral-4x2", "deepseek_v3-dense1-groups"])
def test_cuda_matches_transformers(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """On a GPU: Triton attention, the Triton expert kernels (moe_backend auto), MLA's torch path."""
    path = _checkpoint(name, tmp_path_factory)
    model = load_model(path, attn_backend="triton", device="cuda")
    ids = _prompt(29, 1)
    kv = model.kv_layout(BLOCK).allocate(16, "cuda")
    done, out = 0, []
    for q in (13, 14, 1, 1):  # two prefill chunks, then decodes
        meta = AttentionMetadata.build([q], [done + q], [[9, 2, 14, 5]], BLOCK, device="cuda")
        pos = torch.arange(done, done + q, device="cuda")
        out.append(model.compute_logits(model.forward(ids[done : done + q].cuda(), pos, kv, meta)).cpu())
        done += q
    want = _reference(load_reference(path), ids)
    torch.testing.assert_close(torch.cat(out), want, atol=2e-3, rtol=0)  # TF32 matmuls on the GPU


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_bf16_logits_within_bf16_rounding(arch: str, tmp_path: Path) -> None:
    """bf16 (weights stored bf16): the grouped experts and MLA in the run dtype, DeepSeek's router in
    fp32 and Mixtral's routing weights applied in fp32, as transformers does; atol 0.1 as the dense
    models' bf16 cases (tests/integration/test_model_logits.py; measured max ~0.035)."""
    path = make_checkpoint(tmp_path, arch, seed=3, dtype="bfloat16")
    model = load_model(path, dtype="bfloat16")
    ids = _prompt(29, 1)
    kv = model.kv_layout(BLOCK).allocate(16)
    done, out = 0, []
    for q in (13, 14, 1, 1):
        meta = AttentionMetadata.build([q], [done + q], [[9, 2, 14, 5]], BLOCK)
        out.append(
            model.compute_logits(model.forward(ids[done : done + q], torch.arange(done, done + q), kv, meta))
        )
        done += q
    torch.testing.assert_close(
        torch.cat(out), _reference(load_reference(path, "bfloat16"), ids), atol=0.1, rtol=0
    )


def test_mla_decode_is_batch_and_thread_invariant_and_equals_the_torch_path(tmp_path: Path) -> None:
    """A sequence's decode logits are the same floats alone and beside a longer one, on 1 or 2
    threads (the C latent decode, engine/kernels/cpu_mla.py, where it builds), and agree with the
    torch path (batched matmuls) to rounding."""
    from engine.kernels.cpu_mla import cpu_mla_available

    path = make_checkpoint(tmp_path, "deepseek_v3", seed=3)
    model = load_model(path)
    attn = [b.attn for b in model.blocks]
    c_path = all(a.kernels is not None for a in attn)
    assert c_path == (cpu_mla_available() and model.linear_backend == "cpu")
    a, b = _prompt(20, 1), _prompt(100, 2)
    kv = model.kv_layout(BLOCK).allocate(40)
    ta, tb = [1, 2, 3], list(range(4, 17))
    model.forward(a[:19], torch.arange(19), kv, AttentionMetadata.build([19], [19], [ta], BLOCK))
    model.forward(b[:99], torch.arange(99), kv, AttentionMetadata.build([99], [99], [tb], BLOCK))

    def step(with_b: bool) -> torch.Tensor:
        if not with_b:
            meta = AttentionMetadata.build([1], [20], [ta], BLOCK)
            return model.compute_logits(model.forward(a[19:], torch.tensor([19]), kv, meta))[0]
        meta = AttentionMetadata.build([1, 1], [20, 100], [ta, tb], BLOCK)
        return model.compute_logits(
            model.forward(torch.stack([a[19], b[99]]), torch.tensor([19, 99]), kv, meta)
        )[0]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = step(False)
        torch.set_num_threads(2)
        alone, beside = step(False), step(True)
    finally:
        torch.set_num_threads(threads)
    if c_path:
        assert torch.equal(alone, beside) and torch.equal(alone, one)
    kernels = [x.kernels for x in attn]
    try:
        for x in attn:
            x.kernels = None  # the torch path
        torch.testing.assert_close(step(True), beside, atol=1e-5, rtol=0)
    finally:
        for x, k in zip(attn, kernels, strict=True):
            x.kernels = k
