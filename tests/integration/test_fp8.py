"""Block-scaled FP8 checkpoints (``quantization_config.quant_method: fp8``, as ``tandem make-model
--quantize fp8`` writes them) against transformers running the same weights dequantized to fp32:
logits equal bit for bit on the torch reference path; the FP8 bytes multiplied natively by the C
kernel equal the dequantized C path bit for bit; greedy text equals transformers'. Bad
quantization configs are refused by name, by the library and by the command line (exit 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.make_model import make_model
from engine.model import Model, load_model
from engine.quant.fp8 import FP8Weight

pytestmark = pytest.mark.integration

# rows and columns in whole 128-blocks for the C kernel, one partial row block (k_proj: 128 rows)
DIMS = dict(
    hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512
)
IDS = [5, 17, 9, 200, 3, 64, 64, 1, 300, 42, 7]


@pytest.fixture(scope="module")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(
        tmp_path_factory.mktemp("fp8"), "tiny", overrides=DIMS, quantization="fp8", fp8_block=(128, 128)
    )


@pytest.fixture(scope="module")
def dequantized(fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint with every FP8 weight dequantized to fp32 and no quantization_config."""
    from safetensors.torch import save_file

    from engine.weights import read_tensors

    out = tmp_path_factory.mktemp("fp8-dequantized")
    for f in fp8.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((fp8 / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = {n: t.contiguous() for n, t in read_tensors(fp8, torch.float32).items()}  # type: ignore[union-attr]
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _logits(model: Model) -> torch.Tensor:
    kv = model.config.kv_layout(16).allocate(2)
    meta = AttentionMetadata.build([len(IDS)], [len(IDS)], [[0]], 16, "cpu")
    return model.compute_logits(model.forward(torch.tensor(IDS), torch.arange(len(IDS)), kv, meta))


def _reference(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_fp8_logits_equal_transformers_on_the_dequantized_weights(fp8: Path, dequantized: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(fp8 / "model.safetensors"), "pt") as f:  # really FP8 on disk
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_scale_inv").shape == (4, 2)
    with torch.no_grad():
        want = _reference(dequantized)(torch.tensor([IDS])).logits[0]
    exact = load_model(fp8, attn_backend="torch", linear_backend="torch")  # dequantized at load
    assert torch.equal(_logits(exact), want)
    native = load_model(fp8, quantized_weights="native")
    loaded = load_model(fp8, quantized_weights="dequantize")
    assert isinstance(native.weights.layers[0].gate_proj, FP8Weight)
    assert native.layer_kernels[0] is not None  # the C kernel, not the per-call reference
    assert torch.equal(_logits(native), _logits(loaded))
    torch.testing.assert_close(_logits(native), want, atol=1e-4, rtol=1e-5)


def test_fp8_greedy_equals_transformers(fp8: Path, dequantized: Path) -> None:
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    prompts = [IDS, [9, 8, 7, 6, 5]]
    ref = _reference(dequantized)
    with torch.no_grad():
        # an explicit mask: generate would take token 3 (the pad id) in the prompt for padding
        ones = [torch.ones(1, len(p), dtype=torch.long) for p in prompts]
        want = [
            ref.generate(torch.tensor([p]), attention_mask=m, max_new_tokens=12, do_sample=False)[0, len(p) :]
            for p, m in zip(prompts, ones, strict=True)
        ]
    engine = LLMEngine(EngineConfig(model=fp8, quantized_weights="native", max_num_seqs=4))
    try:
        got = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    finally:
        engine.close()
    assert [o.new_token_ids for o in got] == [w.tolist() for w in want]


def test_bad_quantization_config_is_named_and_exits_2(fp8: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config.quant_method 'awq'"):
        load_model(bad)
    cmd = [sys.executable, "-m", "deploy.cli", "generate", "hi", "--model", str(bad), "--max-tokens", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "quantization_config.quant_method" in r.stderr and "Traceback" not in r.stderr
