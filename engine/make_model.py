"""Random-weight Hugging Face checkpoints with a real byte-level BPE tokenizer.

Tests, the demo and the benchmark need a model without downloading one. This module writes a
complete checkpoint directory::

    out/
      config.json                       architectures + model_type (llama | qwen2 | mistral | qwen3 |
                                        mixtral | qwen2_moe | qwen3_moe | deepseek_v3:
                                        engine/make_model_archs.py)
      generation_config.json            bos / eos ids
      model.safetensors                 or model-0000i-of-0000N.safetensors + model.safetensors.index.json
      tokenizer.json                    byte-level BPE trained on engine/data/corpus.txt
      tokenizer_config.json, special_tokens_map.json   (with a plain-text chat template)

Weights are written with torch + safetensors under the HF parameter names (transformers is only a
test reference). Everything is a pure function of (preset, arch, seed, dtype, overrides): the same
arguments give byte-identical files. ``tandem make-model`` (deploy/make_model.py) is its command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from engine.make_model_archs import EXTRA_ARCHS, arch_config, attention_shapes, mlp_shapes

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")  # ids 0..3, in this order
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 0, 1, 2, 3
ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    **EXTRA_ARCHS,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_STD = 0.02

PRESETS: dict[str, dict[str, Any]] = {
    # For unit tests: loads and runs in milliseconds.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=2048,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=4096,
    ),
    # CPU throughput benchmark: compute dominates Python overhead, still minutes for 64 requests.
    "bench": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=4096,
    ),
}


# ---------------------------------------------------------------------------------------------- tokenizer


# transformers maps model_type qwen2 to its own Qwen2Tokenizer, which rebuilds the pipeline from vocab +
# merges with this split regex and NFC; qwen2 checkpoints are trained with the same pipeline so that
# AutoTokenizer and engine.tokenizer agree. Other archs use the GPT-2 byte-level regex.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(vocab_size: int, arch: str = "llama") -> Tokenizer:
    """Byte-level BPE on the bundled corpus (~0.1 s and deterministic, so it is not cached)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    if arch.startswith("qwen"):  # every Qwen family: transformers' Qwen2Tokenizer pipeline
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"corpus too small for vocab_size={vocab_size}: BPE stopped at {tok.get_vocab_size()}"
        )
    # AutoTokenizer applies the post-processor by default; ours adds <s> the same way, so both
    # tokenizers give identical ids. (engine.tokenizer adds bos itself and ignores this.)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


# A plain-text chat template (the tiny vocabularies have no <|im_start|>), so chat requests run on the
# random checkpoints too; it starts with bos_token as Llama-2's does.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _write_tokenizer(out: Path, vocab_size: int, arch: str, max_len: int) -> None:
    tok = train_tokenizer(vocab_size, arch)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False), encoding="utf-8")
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "special_tokens_map.json", special_map)


# ---------------------------------------------------------------------------------------------- config


def build_config(preset: str, arch: str, dtype: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    p = {**PRESETS[preset], **(overrides or {})}
    rope_theta = float(p.pop("rope_theta", 10000.0))
    cfg: dict[str, Any] = {
        "architectures": [ARCHS[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "head_dim": p["hidden_size"] // p["num_attention_heads"],
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "attention_dropout": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif arch == "qwen2":
        # Qwen2 always has q/k/v biases (no config flag); sliding window is off.
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=p["num_hidden_layers"])
    elif arch == "mistral":
        cfg.update(sliding_window=None)
    else:  # the family's keys, computed from the preset (an explicit override still wins)
        family = arch_config(arch, p)
        cfg.update(family)
        given = overrides or {}
        p = {
            k: v
            for k, v in p.items()
            if (k not in family or k in given) and (k != "num_experts" or k in family)
        }
    cfg.update(p)
    if (
        cfg["hidden_size"] % cfg["num_attention_heads"]
        or cfg["num_attention_heads"] % cfg["num_key_value_heads"]
    ):
        raise ValueError("hidden_size must divide by heads, and heads by kv heads")
    return dict(sorted(cfg.items()))


# ---------------------------------------------------------------------------------------------- weights


def param_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes, in a fixed order (the order random numbers are drawn in)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qkv_bias = cfg["model_type"] in ("qwen2", "qwen2_moe") or cfg.get("attention_bias", False)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes.append((pre + "input_layernorm.weight", (h,)))
        latent = attention_shapes(cfg, pre)
        if latent is not None:
            shapes += latent
        else:
            shapes += [
                (pre + "self_attn.q_proj.weight", (nh * hd, h)),
                (pre + "self_attn.k_proj.weight", (nkv * hd, h)),
                (pre + "self_attn.v_proj.weight", (nkv * hd, h)),
            ]
            if qkv_bias:
                shapes += [
                    (pre + "self_attn.q_proj.bias", (nh * hd,)),
                    (pre + "self_attn.k_proj.bias", (nkv * hd,)),
                    (pre + "self_attn.v_proj.bias", (nkv * hd,)),
                ]
            if cfg["model_type"] in ("qwen3", "qwen3_moe"):
                shapes += [(pre + "self_attn.q_norm.weight", (hd,)), (pre + "self_attn.k_norm.weight", (hd,))]
            shapes.append((pre + "self_attn.o_proj.weight", (h, nh * hd)))
        shapes.append((pre + "post_attention_layernorm.weight", (h,)))
        if cfg["model_type"] in ("llama", "qwen2", "mistral", "qwen3"):
            shapes += [
                (pre + "mlp.gate_proj.weight", (inter, h)),
                (pre + "mlp.up_proj.weight", (inter, h)),
                (pre + "mlp.down_proj.weight", (h, inter)),
            ]
        else:
            shapes += mlp_shapes(cfg, pre, i)
    shapes.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def random_weights(cfg: dict[str, Any], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(cfg):
        if name.endswith("norm.weight"):
            # RMSNorm gains near 1, with some noise so a wrong gain/weight pairing shows in outputs.
            t = 1.0 + INIT_STD * torch.randn(shape, generator=gen)
        else:
            t = INIT_STD * torch.randn(shape, generator=gen)
        weights[name] = t.to(dtype).contiguous()
    return weights


def _shard(names: list[str], weights: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    """Split names, in order, into num_shards consecutive groups of roughly equal bytes."""
    sizes = [weights[n].numel() * weights[n].element_size() for n in names]
    total, acc = sum(sizes), 0
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    for name, size in zip(names, sizes, strict=True):
        idx = min(num_shards - 1, acc * num_shards // total)
        groups[idx].append(name)
        acc += size
    if any(not g for g in groups):
        raise ValueError(f"num_shards={num_shards} exceeds the number of tensors that can be split")
    return groups


def _fp8(weights: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Each projection's weight as FP8 and its scales, in the checkpoint's tensor order."""
    from engine.quant.fp8 import quantize_fp8

    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name.endswith("_proj.weight"):
            w = quantize_fp8(t, block)
            out[name], out[name + "_scale_inv"] = w.q, w.scale_inv
        else:
            out[name] = t
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- entry


def make_model(
    out: str | Path,
    preset: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    num_shards: int = 1,
    overrides: dict[str, Any] | None = None,
    quantization: str | None = None,
    fp8_block: tuple[int, int] = (128, 128),
) -> Path:
    """Write a random-weight checkpoint to ``out`` (created if missing) and return its path.
    ``quantization="fp8"``: every projection stored as block-scaled FP8 (``weight`` in
    float8_e4m3fn + ``weight_scale_inv``, blocks ``fp8_block``) with its ``quantization_config``,
    as DeepSeek-V3's and transformers' fine-grained FP8 checkpoints are; the embedding, the norms
    and an untied LM head stay in ``dtype``."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization must be 'fp8' or None, got {quantization!r}")
    cfg = build_config(preset, arch, dtype, overrides)
    if quantization == "fp8":
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(fp8_block),
            "modules_to_not_convert": ["lm_head"],
        }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False},
    )
    _write_tokenizer(out, cfg["vocab_size"], arch, cfg["max_position_embeddings"])

    weights = random_weights(cfg, seed, DTYPES[dtype])
    if quantization == "fp8":
        weights = _fp8(weights, fp8_block)
    meta = {"format": "pt"}
    if num_shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata=meta)
        return out
    names = list(weights)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(_shard(names, weights, num_shards)):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: weights[n] for n in group}, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(group, fname))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    return out
