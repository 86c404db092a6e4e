"""GGUF checkpoints against transformers' own GGUF loading (``from_pretrained(dir, gguf_file=...)``):
logits of every supported GGML type equal bit for bit on the torch reference path (same dequantized
weights, Q/K permutation undone) and within fp32 rounding on the default CPU kernels; an F32 file
gives exactly the logits of the checkpoint it was converted from; tokenizers (byte-level with merges,
sentencepiece-style from scores) and chat templates equal transformers'; files we cannot run are
refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.model import Model, load_model
from engine.tokenizer import Tokenizer
from tests.helpers_checkpoints import make_checkpoint
from tests.helpers_gguf import GGUF_DIMS, QUANT_TYPES, write_gguf

pytestmark = pytest.mark.integration

IDS = [5, 17, 9, 200, 3, 64, 64, 1, 300, 42, 7]
TEXTS = [
    "Hello world",
    "the cat and the hat",
    " two  spaces\n\n",
    "<|im_start|>x<s></s>",
    "日本 🚀 café",
    "12345",
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gguf-src"), **GGUF_DIMS)


@pytest.fixture(scope="module")
def files(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    out = {q: write_gguf(root / f"tiny-{q}.gguf", source, q) for q in QUANT_TYPES}
    out["spm"] = write_gguf(root / "tiny-spm.gguf", source, "Q8_0", tokenizer="llama")
    return out


def _logits(model: Model, ids: list[int]) -> torch.Tensor:
    kv = model.config.kv_layout(16).allocate(2)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[0]], 16, "cpu")
    hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), kv, meta)
    return model.compute_logits(hidden)  # (T, V)


def _reference(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_logits_equal_transformers_gguf_loading(qtype: str, files: dict[str, Path]) -> None:
    path = files[qtype]
    with torch.no_grad():
        want = _reference(path)(torch.tensor([IDS])).logits[0]  # (T, V)
    exact = load_model(path, attn_backend="torch", linear_backend="torch")
    assert torch.equal(_logits(exact, IDS), want)  # the same weights, to the bit
    fast = load_model(path)  # the default CPU kernels: fp32, summed in another order
    torch.testing.assert_close(_logits(fast, IDS), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("qtype", [q for q in QUANT_TYPES if q.startswith("Q")])
def test_native_weights_give_the_dequantized_logits_bit_for_bit(qtype: str, files: dict[str, Path]) -> None:
    # The C kernels multiply by the packed blocks; the reference dequantizes every weight at load
    # (gguf.quants) and runs the fp32 C GEMM: the same floats summed in the same order.
    from engine.quant.ggml import GGMLWeight
    from engine.quant.method import cpu_supports

    path = files[qtype]
    native = load_model(path, quantized_weights="native")
    loaded = load_model(path, quantized_weights="dequantize")
    w = native.weights.layers[0].q_proj
    assert isinstance(w, GGMLWeight) and w.qtype == qtype and cpu_supports(w)  # kept packed
    assert isinstance(loaded.weights.layers[0].q_proj, torch.Tensor)
    assert torch.equal(_logits(native, IDS), _logits(loaded, IDS))
    # the per-call torch reference (no kernel: linear backend torch) equals transformers exactly
    with torch.no_grad():
        want = _reference(path)(torch.tensor([IDS])).logits[0]
    ref = load_model(path, attn_backend="torch", linear_backend="torch", quantized_weights="native")
    assert isinstance(ref.weights.embed, GGMLWeight)
    assert torch.equal(_logits(ref, IDS), want)


def test_f32_file_equals_the_checkpoint_it_came_from(source: Path, files: dict[str, Path]) -> None:
    # A wrong (or missing) Q/K un-permutation would still agree with transformers only if both were
    # wrong the same way; the original safetensors checkpoint settles it.
    from_dir = load_model(source, attn_backend="torch", linear_backend="torch")
    from_gguf = load_model(files["F32"], attn_backend="torch", linear_backend="torch")
    assert torch.equal(_logits(from_gguf, IDS), _logits(from_dir, IDS))
    a, b = from_dir.config, from_gguf.config
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (
        b.num_layers,
        b.num_heads,
        b.num_kv_heads,
        b.head_dim,
        b.vocab_size,
    )


def test_bf16_run_dtype(files: dict[str, Path]) -> None:
    path = files["Q4_1"]
    with torch.no_grad():
        want = _reference(path, torch.bfloat16)(torch.tensor([IDS])).logits[0].float()
    got = _logits(load_model(path, dtype="bfloat16", attn_backend="torch", linear_backend="torch"), IDS)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)


def test_fingerprints_differ_per_file(files: dict[str, Path]) -> None:
    from engine.config import ModelConfig

    prints = {q: ModelConfig.from_pretrained(f).fingerprint for q, f in files.items()}
    assert len({prints[q] for q in QUANT_TYPES}) == len(QUANT_TYPES)  # other weights: other KV
    assert prints["spm"] == prints["Q8_0"]  # the same weights with another tokenizer: the same KV per id


@pytest.mark.parametrize("kind", ["Q4_0", "spm"])  # byte-level BPE with merges; sentencepiece scores
def test_tokenizer_and_chat_template_equal_transformers(kind: str, files: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    path = files[kind]
    hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True)
    conv = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    for gen in (True, False):
        assert ours.render_chat(conv, gen) == hf.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=gen
        )
        assert ours.encode_chat(conv, gen) == hf.apply_chat_template(
            conv, add_generation_prompt=gen, return_dict=False
        )
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_ids == (hf.eos_token_id,)


def test_files_we_cannot_run_are_refused(tmp_path: Path, source: Path) -> None:
    from gguf import GGUFWriter

    from engine.config import ModelConfig
    from engine.weights import load_weights

    bad = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(bad), arch="mamba")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' is not supported"):
        ModelConfig.from_pretrained(bad)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"NOPE" * 8)
    with pytest.raises(ValueError, match="not a GGUF file"):
        ModelConfig.from_pretrained(not_gguf)
    # an extra tensor the forward pass has no use for is named
    extra = write_gguf(tmp_path / "extra.gguf", source, "F16")
    cfg = ModelConfig.from_pretrained(extra)
    from engine import gguf_loader

    with pytest.raises(ValueError, match="rope_freqs"):
        gguf_loader.hf_name("rope_freqs.weight")
    load_weights(extra, cfg)  # the plain file loads


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen3_file_equals_transformers_gguf_loading(qtype: str, tmp_path: Path) -> None:
    """A Qwen3 GGUF (llama.cpp's qwen3 tensor names: attn_q_norm / attn_k_norm, no Q/K permutation)."""
    # head_dim 128: what transformers' GGUF loading assumes for qwen3 (it does not read key_length)
    src = make_checkpoint(tmp_path / "src", "qwen3", **{**GGUF_DIMS, "head_dim": 128})
    path = write_gguf(tmp_path / f"qwen3-{qtype}.gguf", src, qtype, arch="qwen3")
    with torch.no_grad():
        want = _reference(path)(torch.tensor([IDS])).logits[0]  # (T, V)
    model = load_model(path, attn_backend="torch", linear_backend="torch")
    assert model.config.architecture == "qwen3" and model.weights.layers[0].q_norm is not None
    assert torch.equal(_logits(model, IDS), want)
    torch.testing.assert_close(_logits(load_model(path), IDS), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_qwen3_moe_file_equals_transformers_gguf_loading(qtype: str, tmp_path: Path) -> None:
    """A Qwen3-MoE GGUF: llama.cpp's stacked expert tensors (ffn_{gate,up,down}_exps) and router
    (ffn_gate_inp), split into the per-expert weights the engine runs (engine/gguf_moe.py)."""
    dims = {**GGUF_DIMS, "head_dim": 128, "num_experts": 4, "num_experts_per_tok": 2}
    # moe_intermediate_size 768: transformers' GGUF loading keeps Qwen3MoeConfig's default (it does not
    # read expert_feed_forward_length); the engine reads it from the file
    src = make_checkpoint(tmp_path / "src", "qwen3_moe", **{**dims, "moe_intermediate_size": 768})
    path = write_gguf(tmp_path / f"qwen3moe-{qtype}.gguf", src, qtype, arch="qwen3moe")
    with torch.no_grad():
        want = _reference(path)(torch.tensor([IDS])).logits[0]  # (T, V)
    model = load_model(path, attn_backend="torch", linear_backend="torch", moe_backend="grouped")
    moe = model.config.moe
    assert moe is not None and (moe.num_experts, moe.top_k, moe.norm_topk_prob) == (4, 2, True)
    torch.testing.assert_close(_logits(model, IDS), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(load_model(path), IDS), want, atol=1e-4, rtol=1e-5)
