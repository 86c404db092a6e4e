"""A GGUF file's tokenizer, rebuilt with ``tokenizers`` the way transformers rebuilds it.

A GGUF has no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special ids
as metadata. transformers (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) turns them into a
``tokenizers`` pipeline; this module builds the same one, so both give the same ids:

    tokenizer.ggml.model   pipeline
    "gpt2"                 byte-level BPE (tokens respelled into GPT-2's byte alphabet), GPT-2
                           regex split, or the split the file's ``tokenizer.ggml.pre`` names
    "llama"                sentencepiece-style BPE with byte fallback and a "▁" metaspace; merges
                           from the file, or derived from the tokens' scores

then: tokens typed CONTROL (3) become special added tokens (for byte-level vocabularies, only those
spelled in the byte alphabet: others are llama.cpp mislabels), USER_DEFINED (4) plain added ones,
the named bos / eos / unk / pad special ones; the post-processor adds BOS / EOS as
``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say (a "llama" vocabulary without the flag adds
BOS, as llama.cpp does). ``tokenizer.chat_template`` is the chat template.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from engine.chat_template import ChatTemplate
from engine.gguf_loader import open_gguf

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# tokenizer.ggml.pre -> the split its merges were learned with (the subset of transformers' table
# that Llama / Qwen2 files use); any other value keeps the GPT-2 byte-level regex.
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_NAMED_SPECIALS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet byte-level vocabularies are spelled in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def _pairs(merges: list[str]) -> list[tuple[str, str]]:
    """``"a b"`` merge strings as (a, b) pairs."""
    out = []
    for m in merges:
        a, _, b = m.partition(" ")
        out.append((a, b))
    return out


def _byte_level(tokens: list[str], merges: list[str]) -> _HFTokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = _pairs(merges)
    tok = _HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], merges: list[str] | None, scores: list[float] | None) -> _HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = _pairs(merges)
    else:
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores or [0.0] * len(tokens), strict=False)))
    tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge, ranked by the merged token's score (best
    first), then by the pieces' lengths: the order transformers derives for score-only files."""
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> Any:
    """transformers' ``update_post_processor``: ``[bos] $A [eos]`` with whichever of them is on."""
    single = f"{bos[0] + ':0 ' if bos else ''}$A:0{' ' + eos[0] + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos[0] + ':1' if bos else ''} $B:1{' ' + eos[0] + ':1' if eos else ''}"
    specials = [t for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_gguf_tokenizer(metadata: dict[str, Any]) -> tuple[_HFTokenizer, dict[str, str]]:
    """The ``tokenizers`` pipeline of a GGUF file's metadata and its named special tokens."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("this GGUF file has no tokenizer (no tokenizer.ggml.tokens)")
    merges = metadata.get("tokenizer.ggml.merges")
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [])
    if kind == "gpt2":
        tok = _byte_level(tokens, list(merges or []))
        split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
        if split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        class_defaults = ["<|endoftext|>"]  # GPT2Tokenizer's default unk / bos / eos
        spelled: set[str] | None = set(bytes_to_unicode().values())
    elif kind == "llama":
        tok = _sentencepiece(tokens, merges, metadata.get("tokenizer.ggml.scores"))
        class_defaults = ["<unk>", "<s>", "</s>"]  # LlamaTokenizer's defaults
        spelled = None
    else:
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")

    control = [
        t
        for t, ty in zip(tokens, types, strict=False)
        if ty == CONTROL and (spelled is None or set(t) <= spelled)
    ]
    added = {t for t in control}
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tok.get_vocab()
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    specials: dict[str, str] = {}
    for name, key in _NAMED_SPECIALS.items():
        token_id = metadata.get(key)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            specials[name] = tokens[int(token_id)]
    # The named specials (and the tokenizer class's own defaults) become special added tokens; one the
    # vocabulary lacks would get a new id past the model's embedding, so it is left out.
    extra = [t for t in [*class_defaults, *specials.values()] if t not in added and t in vocab]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(extra)])

    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    ends: list[tuple[str, int] | None] = []
    for on, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        text = specials.get(name)
        token_id = tok.token_to_id(text) if on and text is not None else None
        ends.append((text, token_id) if text is not None and token_id is not None else None)
    tok.post_processor = _post_processor(ends[0], ends[1])
    return tok, specials


def load_gguf_tokenizer(path: str | Path) -> tuple[Any, ...]:
    """The arguments of ``engine.tokenizer.Tokenizer`` for a GGUF file (``Tokenizer.from_pretrained``
    builds it: importing the class here would make the two modules a circle)."""
    md = open_gguf(path).metadata
    tok, specials = build_gguf_tokenizer(md)
    bos_id = md.get("tokenizer.ggml.bos_token_id")
    eos_id = md.get("tokenizer.ggml.eos_token_id")
    template = md.get("tokenizer.chat_template")
    return (
        tok,
        int(bos_id) if bos_id is not None else None,
        (int(eos_id),) if eos_id is not None else (),
        specials,
        ChatTemplate(template) if isinstance(template, str) and template else None,
    )
