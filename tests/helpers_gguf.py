"""Small GGUF files for tests, written with the ``gguf`` package the way llama.cpp's converter writes
them: llama.* metadata, a tokenizer (byte-level BPE with merges, or sentencepiece-style scores only),
a chat template, and the weights of a tiny random transformers checkpoint with attn_q / attn_k rows
permuted as llama.cpp permutes them, stored in one GGML type.

F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 are quantized from the weights by ``gguf.quants.quantize``.
The gguf package cannot quantize K-quants, so Q4_K / Q5_K / Q6_K tensors are random but valid blocks
(small fp16 scales): the weights are then not the checkpoint's, which does not matter, since the
reference is transformers loading the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# K-quants need rows that are a multiple of 256 values
GGUF_DIMS: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.05,
)
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",  # a MoE layer's router
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{i}.{_LAYER[module]}.{suffix}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (halves -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _random_k_blocks(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    nblocks = cols // 256
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    b = rng.integers(0, 256, size=(rows, nblocks, size), dtype=np.uint8)
    # keep |values| around the checkpoint's (~0.05): 6-bit scales times 4- / 6-bit quants
    unit = {"Q4_K": 1e-4, "Q5_K": 5e-5, "Q6_K": 1e-5}[qtype]
    scale = (rng.uniform(0.5, 1.5, size=(rows, nblocks)) * unit).astype(np.float16).view(np.uint8)
    if qtype in ("Q4_K", "Q5_K"):  # d, dmin: the first two fp16 of a block
        b[..., 0:2] = scale.reshape(rows, nblocks, 2)
        dmin = (rng.uniform(0.5, 1.5, size=(rows, nblocks)) * unit).astype(np.float16).view(np.uint8)
        b[..., 2:4] = dmin.reshape(rows, nblocks, 2)
    else:  # Q6_K: d is the last fp16 of a block
        b[..., 208:210] = scale.reshape(rows, nblocks, 2)
    return b.reshape(rows, nblocks * size)


def _encode(arr: np.ndarray, qtype: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    t = T[qtype]
    if arr.ndim == 1 or qtype == "F32":
        return arr.astype(np.float32), T.F32
    if qtype == "F16":
        return arr.astype(np.float16), T.F16
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return _random_k_blocks(arr.shape[0], arr.shape[1], qtype, rng), t
    return quants.quantize(arr.astype(np.float32), t), t


def _byte_level_tokenizer(vocab_size: int, specials: list[str]) -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from engine.make_model import CORPUS

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train(
        [str(CORPUS)],
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def write_tokenizer(w: Any, kind: str, vocab_size: int) -> None:
    """A gpt2 (byte-level, merges, Llama-3 split) or llama (sentencepiece-style, scores) tokenizer."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    if kind == "gpt2":
        tokens, merges = _byte_level_tokenizer(vocab_size, specials)
        types = [3 if t in specials else 1 for t in tokens]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(3)
        w.add_add_bos_token(True)
    else:
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        words = ["▁the", "▁a", "▁of", "▁and", "th", "he", "▁t", "in", "er", "an", "▁w", "on", "re", "▁c"]
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁", "e"]
        tokens = ["<unk>", "<s>", "</s>", *byte_tokens]
        for t in [*letters, *words]:
            if t not in tokens:
                tokens.append(t)
        tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
        types = [2, 3, 3, *([6] * 256), *([1] * (vocab_size - 259))]
        w.add_tokenizer_model("llama")
        w.add_token_scores([0.0, 0.0, 0.0, *([0.0] * 256), *[-float(i) for i in range(vocab_size - 259)]])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    assert len(tokens) == vocab_size, (len(tokens), vocab_size)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_chat_template(CHAT_TEMPLATE)


def write_gguf(
    path: Path,
    checkpoint: Path,
    qtype: str,
    tokenizer: str = "gpt2",
    seed: int = 0,
    types: dict[str, str] | None = None,
    arch: str = "llama",
) -> Path:
    """The transformers checkpoint at ``checkpoint`` (Llama, or Qwen3 with ``arch="qwen3"``: no Q/K
    permutation, its head size written, its q/k norms kept in F32 as llama.cpp keeps 1-d tensors;
    Qwen3-MoE with ``arch="qwen3moe"``: each layer's experts stacked per projection, as llama.cpp
    stores them) as one GGUF file at ``path``; ``types`` gives some tensors another type, by their
    GGUF name's part (``{"attn_k": "Q6_K"}``), as llama.cpp's mixed files (Q4_K_M: some of attn_v /
    ffn_down in Q6_K) do."""
    import json

    from gguf import GGUFWriter
    from safetensors.torch import load_file

    cfg = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = GGUFWriter(str(path), arch=arch)
    w.add_name(f"tiny-test-{arch}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "qwen3moe"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "qwen3moe":
        n = cfg.get("num_experts") or cfg["num_local_experts"]
        w.add_expert_count(n)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        tensors = _stack_experts(tensors, cfg["num_hidden_layers"], n)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    write_tokenizer(w, tokenizer, cfg["vocab_size"])
    rng = np.random.default_rng(seed)
    for name, t in tensors.items():
        arr = t.to(torch.float32).numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            arr = permute(arr, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            arr = permute(arr, kv_heads)
        gname = name if name.startswith("blk.") else gguf_name(name)
        data, ggml_type = _encode(arr, (types or {}).get(gname.split(".")[-2], qtype), rng)
        w.add_tensor(gname, data, raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _stack_experts(tensors: dict[str, torch.Tensor], layers: int, n: int) -> dict[str, torch.Tensor]:
    """Per-expert Hugging Face tensors -> llama.cpp's blk.{i}.ffn_{gate,up,down}_exps (E, rows, cols)."""
    out = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for i in range(layers):
        for proj in ("gate", "up", "down"):
            names = [f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight" for e in range(n)]
            out[f"blk.{i}.ffn_{proj}_exps.weight"] = torch.stack([tensors[k] for k in names])
    return out
