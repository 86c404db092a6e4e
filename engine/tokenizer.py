"""The tokenizer wrapper: a checkpoint's tokenizer (via ``tokenizers``), its bos/eos ids and chat template.

Kept deliberately thin: the router tokenizes prompts and renders chat conversations with it, the
detokenizer decodes windows of output ids with it. transformers is never imported; what
``AutoTokenizer.from_pretrained(dir)(text).input_ids`` gives is reproduced from the files:

- a checkpoint directory: ``tokenizer.json`` as the ``tokenizers`` library loads it, *including its
  post-processor* (that is where a Llama-3 ``<|begin_of_text|>`` or a Llama-2 ``<s>`` comes from; a
  GPT-2 / SmolLM2 / Qwen2 tokenizer has none that adds a token). transformers 5 ignores
  ``add_bos_token`` / ``add_eos_token`` in tokenizer_config.json whenever a tokenizer.json exists,
  so we do too; ``tokenizer_config.json`` supplies the special tokens' names and the chat template.
- a GGUF file (``engine.gguf_tokenizer``): the tokenizer is rebuilt from the file's vocabulary as
  transformers rebuilds it, and there ``add_bos_token`` / ``add_eos_token`` (from the file's
  ``tokenizer.ggml.add_*_token``) do set the post-processor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from engine.chat_template import ChatTemplate, load_chat_template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as a string or as an AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def special_tokens_of(tok_cfg: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens a chat template sees (transformers' ``special_tokens_map``):
    ``bos_token``, ``eos_token``, ... and any model-specific ``*_token`` entry, as strings."""
    out: dict[str, str] = {}
    for key, value in tok_cfg.items():
        text = _token_text(value)
        if key.endswith("_token") and text is not None:
            out[key] = text
    return out


class Tokenizer:
    """Encode text to ids and decode ids to text for one checkpoint.

    ``eos_token_ids`` is a tuple because generation_config.json may name several end tokens; the
    decode scheduler stops on any of them. ``chat_template`` is None when the checkpoint has none.
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        special_tokens: Mapping[str, str] | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # Ids the ``skip_special_tokens`` path drops; kept here so callers can ask cheaply.
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint directory (``tokenizer.json``) or of a GGUF file."""
        root = Path(path)
        if root.is_file():
            from engine.gguf_tokenizer import load_gguf_tokenizer

            return cls(*load_gguf_tokenizer(root))
        tok = _HFTokenizer.from_file(str(root / "tokenizer.json"))
        tok_cfg = _read_json(root / "tokenizer_config.json")
        gen_cfg = _read_json(root / "generation_config.json")
        model_cfg = _read_json(root / "config.json")

        bos: int | None = None
        bos_text = _token_text(tok_cfg.get("bos_token"))
        if bos_text is not None:
            bos = tok.token_to_id(bos_text)
        if bos is None:
            ids = _as_ids(gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id")))
            bos = ids[0] if ids else None

        # generation_config.json wins: it is what HF generate() stops on.
        eos = _as_ids(gen_cfg.get("eos_token_id"))
        if not eos:
            eos = _as_ids(model_cfg.get("eos_token_id"))
        if not eos:
            eos_text = _token_text(tok_cfg.get("eos_token"))
            eos_id = tok.token_to_id(eos_text) if eos_text is not None else None
            eos = (eos_id,) if eos_id is not None else ()
        return cls(tok, bos, eos, special_tokens_of(tok_cfg), load_chat_template(root, tok_cfg))

    @classmethod
    def maybe_from_pretrained(cls, path: str | Path) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it has none (a directory without tokenizer.json)."""
        root = Path(path)
        if root.is_file() or (root / "tokenizer.json").is_file():
            return cls.from_pretrained(root)
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (BOS where the
        checkpoint's tokenizer adds one), as transformers' ``tokenizer(text)`` does."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (raises ``ChatTemplateError``)."""
        if self.chat_template is None:
            from engine.chat_template import ChatTemplateError

            raise ChatTemplateError("this model has no chat template")
        return self.chat_template.render(messages, self.special_tokens, add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a rendered conversation, as ``apply_chat_template(..., tokenize=True)``: the
        template writes any BOS itself, so the post-processor is not applied again."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size
