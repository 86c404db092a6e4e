"""ModelConfig: parsing config.json of each family, rope variants, EOS merging, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import ModelConfig
from engine.kv_layout import KVLayout

pytestmark = pytest.mark.unit


def llama(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


def write(path: Path, raw: dict[str, Any], gen: dict[str, Any] | None = None) -> Path:
    (path / "config.json").write_text(json.dumps(raw))
    if gen is not None:
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def test_llama_gqa_fields(tmp_path: Path) -> None:
    c = ModelConfig.from_pretrained(write(tmp_path, llama()), dtype="bfloat16")
    assert c == ModelConfig(
        architecture="llama",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=None,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        dtype="bfloat16",
    )
    assert c.kv_layout(16) == KVLayout(
        num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="bfloat16"
    )


def test_mha_when_kv_heads_missing_and_explicit_head_dim() -> None:
    c = ModelConfig.from_dict(llama(num_key_value_heads=None, head_dim=32))
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 4, 32)


def test_qwen2_has_qkv_bias_and_ignores_its_disabled_window() -> None:
    raw = llama(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=28,
        tie_word_embeddings=True,
        eos_token_id=151643,
        bos_token_id=None,
    )
    c = ModelConfig.from_dict(raw)
    assert (c.architecture, c.attention_bias, c.tie_word_embeddings) == ("qwen2", True, True)
    assert (c.bos_token_id, c.eos_token_ids) == (None, (151643,))


def test_mistral_without_window_and_model_type_only() -> None:
    c = ModelConfig.from_dict(llama(architectures=None, model_type="mistral", sliding_window=None))
    assert c.architecture == "mistral"
    # a window no sequence can outgrow does not apply
    c = ModelConfig.from_dict(llama(model_type="mistral", architectures=None, sliding_window=256))
    assert c.architecture == "mistral"


def test_rope_parameters_form_of_transformers_5() -> None:
    raw = llama(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    c = ModelConfig.from_dict(raw)
    assert (c.rope_theta, c.rope_scaling) == (1234.0, None)


def test_rope_scaling_llama3_old_form_and_new_form() -> None:
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    old = llama(rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 64, **scaling})
    new = llama(
        rope_theta=None,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "original_max_position_embeddings": 64,
        }
        | scaling,
    )
    want = {"rope_type": "llama3", "original_max_position_embeddings": 64, **scaling}
    assert ModelConfig.from_dict(old).rope_scaling == want
    assert ModelConfig.from_dict(new).rope_scaling == want
    assert ModelConfig.from_dict(new).rope_theta == 500000.0


def test_rope_scaling_linear_with_legacy_type_key() -> None:
    c = ModelConfig.from_dict(llama(rope_scaling={"type": "linear", "factor": 2.0}))
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_eos_ids_merged_from_generation_config(tmp_path: Path) -> None:
    raw = llama(eos_token_id=[2, 7])
    c = ModelConfig.from_pretrained(write(tmp_path, raw, {"eos_token_id": [7, 9], "bos_token_id": 1}))
    assert c.eos_token_ids == (2, 7, 9)
    c = ModelConfig.from_dict(
        llama(eos_token_id=None, bos_token_id=None), generation_config={"eos_token_id": 5}
    )
    assert (c.eos_token_ids, c.bos_token_id) == ((5,), None)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"architectures": ["Gemma2ForCausalLM"]}, "architectures"),  # (Mixtral, once here, is supported)
        ({"architectures": None, "model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_local_experts": 8}, "num_local_experts"),
        ({"num_experts": 4}, "num_experts"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"sliding_window": 128}, "sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_scaling"),  # (yarn: supported now)
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),  # no original length
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"quantization_config": {"quant_method": "fp8"}}, r"quantization_config\.weight_block_size"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 0]}},
            r"quantization_config\.weight_block_size",
        ),
        (
            {
                "quantization_config": {
                    "quant_method": "fp8",
                    "weight_block_size": [128, 128],
                    "activation_scheme": "static",
                }
            },
            r"quantization_config\.activation_scheme",
        ),
    ],
)
def test_refusals_name_the_field(overrides: dict[str, Any], field: str) -> None:
    raw = llama()
    for k, v in overrides.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(raw)


def test_bad_dtype_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.from_dict(llama(), dtype="int8")


def test_fingerprint_stable_and_sensitive() -> None:
    a = ModelConfig.from_dict(llama())
    assert a.fingerprint == ModelConfig.from_dict(llama()).fingerprint
    assert a.fingerprint.startswith("llama-float32-")
    # EOS ids do not change KV; dtype, shapes and weights do
    assert a.fingerprint == ModelConfig.from_dict(llama(eos_token_id=[2, 3])).fingerprint
    others = [
        ModelConfig.from_dict(llama(), dtype="bfloat16"),
        ModelConfig.from_dict(llama(rope_theta=10000.0)),
        ModelConfig.from_dict(llama(), weights_id="abc"),
    ]
    assert len({a.fingerprint, *(o.fingerprint for o in others)}) == 4
    assert hash(a) == hash(ModelConfig.from_dict(llama()))


def test_weights_id_follows_the_safetensors_bytes(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    write(tmp_path, llama())
    save_file({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    first = ModelConfig.from_pretrained(tmp_path)
    save_file({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    second = ModelConfig.from_pretrained(tmp_path)
    assert first.weights_id != "" and first.fingerprint != second.fingerprint


def test_weights_id_ignores_how_tensors_are_sharded(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6.0), "b": torch.ones(3, 2)}
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        write(d, llama())
    save_file(tensors, one / "model.safetensors")
    save_file({"a": tensors["a"]}, two / "model-00001-of-00002.safetensors")
    save_file({"b": tensors["b"]}, two / "model-00002-of-00002.safetensors")
    assert ModelConfig.from_pretrained(one).weights_id == ModelConfig.from_pretrained(two).weights_id
