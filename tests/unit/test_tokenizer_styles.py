"""engine.tokenizer equals ``AutoTokenizer.from_pretrained(dir)(text).input_ids`` for every style of
checkpoint tokenizer, each built on the fly (byte-level or sentencepiece-style BPE trained on the
bundled corpus) and saved with the tokenizer_config.json such checkpoints ship:

    llama3      post-processor adds <|begin_of_text|>            (BOS from tokenizer.json)
    llama2      post-processor adds <s>, add_bos_token: true     (Llama-2 / Mistral)
    qwen2       no BOS at all
    gpt2        BOS named (<|endoftext|>), never added           (GPT-2)
    smollm2     BOS named (<|im_start|>), no post-processor      (SmolLM2: the reported bug)

and for the corner cases where a tokenizer_config.json flag disagrees with tokenizer.json (transformers
5 follows tokenizer.json there, and so do we).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from engine.make_model import CORPUS
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

TEXTS = [
    "Hello world",
    "The capital of France is",
    " leading space,  two spaces\nand a newline\n\n",
    "numbers 2024 and 3.14159",
    "<s> special </s> tokens <|im_start|>inline<|im_end|> <|begin_of_text|>",
    "café naïve 日本語 🚀",
    "",
]


def _byte_level(specials: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    return tok


def _sentencepiece(specials: list[str]) -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train([str(CORPUS)], trainer)
    return tok


def _prepend(token: str) -> Callable[[HFTokenizer], Any]:
    return lambda tok: processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A $B", special_tokens=[(token, tok.token_to_id(token))]
    )


_BYTE_LEVEL_POST = lambda tok: processors.ByteLevel(trim_offsets=False)  # noqa: E731
_NONE = lambda tok: None  # noqa: E731

# name -> (builder, special tokens, post-processor, tokenizer_config.json)
STYLES: dict[str, tuple[Callable, list[str], Callable, dict[str, Any]]] = {
    "llama3": (
        _byte_level,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        _prepend("<|begin_of_text|>"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
        },
    ),
    "llama2": (
        _sentencepiece,
        ["<unk>", "<s>", "</s>"],
        _prepend("<s>"),
        {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
        },
    ),
    "qwen2": (
        _byte_level,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        _BYTE_LEVEL_POST,
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
        },
    ),
    "gpt2": (
        _byte_level,
        ["<|endoftext|>"],
        _BYTE_LEVEL_POST,
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    ),
    "smollm2": (
        _byte_level,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        _NONE,
        {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|im_end|>",
        },
    ),
    # tokenizer_config.json says add_bos_token but tokenizer.json adds nothing: transformers 5 follows
    # tokenizer.json (the flags are dropped whenever a tokenizer.json exists).
    "add-bos-flag-without-post-processor": (
        _sentencepiece,
        ["<unk>", "<s>", "</s>"],
        _NONE,
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
    ),
    "add-eos-flag": (
        _byte_level,
        ["<s>", "</s>"],
        _prepend("<s>"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_eos_token": True,
        },
    ),
}


def _write(root: Path, name: str) -> Path:
    build, specials, post, cfg = STYLES[name]
    tok = build(specials)
    tok.post_processor = post(tok)
    out = root / name
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def style_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {name: _write(root, name) for name in STYLES}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_ids_equal_auto_tokenizer(style: str, style_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    path = style_dirs[style]
    hf = AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, (style, text)
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize(
    ("style", "first"),
    [("llama3", "<|begin_of_text|>"), ("llama2", "<s>"), ("qwen2", None), ("gpt2", None), ("smollm2", None)],
)
def test_bos_only_where_the_tokenizer_adds_it(
    style: str, first: str | None, style_dirs: dict[str, Path]
) -> None:
    tok = Tokenizer.from_pretrained(style_dirs[style])
    ids = tok.encode("Hello world")
    plain = tok.encode("Hello world", add_special_tokens=False)
    if first is None:
        assert ids == plain  # the reported bug: a named BOS (gpt2, smollm2) was prepended anyway
    else:
        assert ids == [tok._tok.token_to_id(first), *plain]
        assert tok.bos_token_id == ids[0]


def test_smollm2_style_names_a_bos_it_never_adds(style_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_pretrained(style_dirs["smollm2"])
    assert tok.bos_token_id is not None
    assert tok.bos_token_id not in tok.encode("Hello world")
    assert tok.special_tokens["bos_token"] == "<|im_start|>"
