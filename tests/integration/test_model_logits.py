"""engine.model against transformers on tiny random checkpoints written by transformers itself.

Tolerances (|logits| stay below ~4 here): fp32 atol 1e-4; fp16 atol 0.02; bf16 atol 0.1 (~6 bf16 ulps
at |logit| ~ 3). A full-prompt forward in fact matches bit for bit in all three dtypes (same op order
as transformers' modules); chunked and mixed batches differ only through attention's split of the
context (measured max |diff|: fp32 ~2e-6, fp16 ~4e-3, bf16 ~3e-2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.model import Model, load_model
from tests.helpers_checkpoints import load_reference, make_checkpoint

pytestmark = pytest.mark.integration

ATOL = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.02}
BLOCK = 8

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# id -> (arch, run dtype, make_checkpoint kwargs)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-gqa-fp32": ("llama", "float32", {}),
    "llama-mha-tied-sharded-fp32": (
        "llama",
        "float32",
        {"num_key_value_heads": 4, "tie_word_embeddings": True, "sharded": True},
    ),
    "llama-head_dim32-obias-fp32": ("llama", "float32", {"head_dim": 32, "attention_bias": True}),
    "qwen2-bias-tied-fp32": ("qwen2", "float32", {"tie_word_embeddings": True}),
    "llama3-rope-bf16-stored-bf16": ("llama", "bfloat16", {"rope_parameters": LLAMA3, "dtype": "bfloat16"}),
    "linear-rope-sharded-fp32": (
        "llama",
        "float32",
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0}, "sharded": True},
    ),
    "mistral-bf16-stored-fp32": ("mistral", "bfloat16", {"num_hidden_layers": 3}),
    "qwen2-fp16": ("qwen2", "float16", {"num_key_value_heads": 1}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Model, Any, str]:
    arch, dtype, kwargs = CASES[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=len(request.param), **kwargs)
    return load_model(path, dtype=dtype), load_reference(path, dtype), dtype


def prompt(n: int, seed: int, vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def reference_logits(ref: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()  # (T, V)


def check(got: torch.Tensor, want: torch.Tensor, dtype: str) -> None:
    torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=0)


def test_full_prompt_logits(case: tuple[Model, Any, str]) -> None:
    model, ref, dtype = case
    ids = prompt(29, seed=1)
    kv = model.config.kv_layout(BLOCK).allocate(16)
    table = [11, 3, 7, 0]  # non-contiguous block ids, 29 tokens need 4 blocks of 8
    meta = AttentionMetadata.build([29], [29], [table], BLOCK)
    hidden = model.forward(ids, torch.arange(29), kv, meta)
    assert hidden.shape == (29, model.config.hidden_size) and hidden.dtype == model.dtype
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    check(logits, reference_logits(ref, ids), dtype)


def test_chunked_prefill_through_paged_cache(case: tuple[Model, Any, str]) -> None:
    model, ref, dtype = case
    ids = prompt(37, seed=2)
    want = reference_logits(ref, ids)
    kv = model.config.kv_layout(BLOCK).allocate(16)
    table = [9, 2, 14, 5, 1]
    done = 0
    for chunk in (13, 16, 8):  # chunk boundaries fall mid-block
        meta = AttentionMetadata.build([chunk], [done + chunk], [table], BLOCK)
        hidden = model.forward(ids[done : done + chunk], torch.arange(done, done + chunk), kv, meta)
        check(model.compute_logits(hidden), want[done : done + chunk], dtype)
        done += chunk


def test_mixed_batch_of_prefill_chunks_and_decodes(case: tuple[Model, Any, str]) -> None:
    model, ref, dtype = case
    # A: first chunk of its prompt; B: second chunk; C, D: one decode token each
    seqs = {
        name: prompt(n, seed=10 + i)
        for i, (name, n) in enumerate({"A": 12, "B": 21, "C": 17, "D": 9}.items())
    }
    tables = {"A": [3, 12], "B": [7, 0, 15], "C": [4, 10, 1], "D": [8, 13]}
    kv = model.config.kv_layout(BLOCK).allocate(16)

    # step 1 (setup): B's first 10 tokens, C and D up to their last token
    prior = {"B": 10, "C": 16, "D": 8}
    meta = AttentionMetadata.build(
        list(prior.values()), list(prior.values()), [tables[s] for s in prior], BLOCK
    )
    ids = torch.cat([seqs[s][:n] for s, n in prior.items()])
    positions = torch.cat([torch.arange(n) for n in prior.values()])
    model.forward(ids, positions, kv, meta)

    # step 2, the one under test: [A 0..11 | B 10..20 | C 16 | D 8] in one flat batch
    spans = {"A": (0, 12), "B": (10, 21), "C": (16, 17), "D": (8, 9)}
    meta = AttentionMetadata.build(
        [e - s for s, e in spans.values()], [e for _, e in spans.values()], [tables[s] for s in spans], BLOCK
    )
    ids = torch.cat([seqs[name][s:e] for name, (s, e) in spans.items()])
    positions = torch.cat([torch.arange(s, e) for s, e in spans.values()])
    logits = model.compute_logits(model.forward(ids, positions, kv, meta))
    row = 0
    for name, (s, e) in spans.items():
        check(logits[row : row + e - s], reference_logits(ref, seqs[name])[s:e], dtype)
        row += e - s


def test_greedy_decode_matches_generate(case: tuple[Model, Any, str]) -> None:
    model, ref, _ = case
    ids = prompt(11, seed=3)
    steps = 8
    kv = model.config.kv_layout(BLOCK).allocate(16)
    table = [6, 2, 9]
    meta = AttentionMetadata.build([11], [11], [table], BLOCK)
    hidden = model.forward(ids, torch.arange(11), kv, meta)
    tokens = [int(model.compute_logits(hidden[-1:]).argmax(-1))]
    for pos in range(11, 11 + steps - 1):
        meta = AttentionMetadata.build([1], [pos + 1], [table], BLOCK)
        hidden = model.forward(torch.tensor(tokens[-1:]), torch.tensor([pos]), kv, meta)
        tokens.append(int(model.compute_logits(hidden).argmax(-1)))

    with torch.no_grad():
        out = ref.generate(
            ids[None],
            attention_mask=torch.ones(1, 11, dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
        )
    expected = out[0, 11:].tolist()  # may stop early at an EOS id
    assert len(expected) >= 1
    assert tokens[: len(expected)] == expected


def _mapped_file_ranges() -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(".safetensors"):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _is_mapped(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in ranges)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_weights_stay_memory_mapped_unless_converted(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, "llama", dtype="bfloat16")
    same = load_model(path, dtype="bfloat16")  # file dtype == run dtype: no copy
    converted = load_model(path, dtype="float32")
    ranges = _mapped_file_ranges()
    layer = same.weights.layers[0]
    assert all(_is_mapped(t, ranges) for t in (layer.q_proj, layer.down_proj, same.weights.embed))
    assert not _is_mapped(converted.weights.layers[0].q_proj, ranges)
    assert converted.weights.layers[0].q_proj.dtype == torch.float32


def _chunked_and_decode(model: Model, ids: torch.Tensor, table: list[int]) -> torch.Tensor:
    """Logits of every position of ``ids``: two prefill chunks, then one decode step per token."""
    n = ids.shape[0]
    kv = model.config.kv_layout(BLOCK).allocate(16, model.device)
    out, done = [], 0
    for q in (n // 2, n - n // 2 - 2, 1, 1):
        meta = AttentionMetadata.build([q], [done + q], [table], BLOCK, device=model.device)
        positions = torch.arange(done, done + q, device=model.device)
        out.append(model.compute_logits(model.forward(ids[done : done + q], positions, kv, meta)).cpu())
        done += q
    return torch.cat(out)  # (n, V)


def test_triton_backend_matches_transformers(tmp_path: Path) -> None:
    pytest.importorskip("engine.kernels.triton_backend")
    path = make_checkpoint(tmp_path, "llama")
    model = load_model(path, attn_backend="triton")
    ids = prompt(19, seed=4)
    check(_chunked_and_decode(model, ids, [5, 1, 6]), reference_logits(load_reference(path), ids), "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_matches_transformers(tmp_path: Path, backend: str) -> None:
    path = make_checkpoint(tmp_path, "qwen2")
    model = load_model(path, dtype="float32", attn_backend=backend, device="cuda")
    ids = prompt(19, seed=5)
    got = _chunked_and_decode(model, ids.cuda(), [5, 1, 6])
    check(got, reference_logits(load_reference(path), ids), "float32")


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path: Path) -> None:
    import json

    path = make_checkpoint(tmp_path, "llama")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | {"intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        load_model(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(path)


def test_fused_cpu_layer_ops_equal_the_torch_ops_bit_for_bit(case: tuple[Model, Any, str]) -> None:
    """fp32 on a CPU runs the residual add + RMSNorm and rope + KV write in fused C: hidden states
    and the KV cache must be the same floats as transformers' torch expressions give."""
    from engine.kernels.cpu_fused import FusedCpuOps, TorchLayerOps
    from tests.host import FUSED_EXPECTED, TORCH_CAPABILITY

    model, _, dtype = case
    if dtype != "float32":
        assert isinstance(model.ops, TorchLayerOps)
        return
    if not FUSED_EXPECTED:
        pytest.skip(f"no fused ops expected here (compiler, {TORCH_CAPABILITY} torch)")
    assert isinstance(model.ops, FusedCpuOps)
    results = []
    for ops in (model.ops, TorchLayerOps(model.rope, model.attn, model.config.head_dim)):
        fused, model.ops = model.ops, ops
        try:
            kv = model.config.kv_layout(BLOCK).allocate(16)
            ids = prompt(40, seed=7)
            # a prefill of 30 tokens, then a batch mixing the last 8 prompt tokens with 2 decodes
            meta = AttentionMetadata.build([30, 1, 1], [30, 5, 9], [[3, 12, 7, 0], [5], [9, 1]], BLOCK)
            h1 = model.forward(torch.cat([ids[:30], ids[30:32]]), torch.tensor([*range(30), 4, 8]), kv, meta)
            meta = AttentionMetadata.build([8, 1], [38, 6], [[3, 12, 7, 0, 2], [5]], BLOCK)
            h2 = model.forward(
                torch.cat([ids[30:38], ids[38:39]]), torch.tensor([*range(30, 38), 5]), kv, meta
            )
            results.append((h1, h2, kv))
        finally:
            model.ops = fused
    for got, want in zip(results[0], results[1], strict=True):
        assert torch.equal(got, want)
