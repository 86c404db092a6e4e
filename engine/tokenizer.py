"""The tokenizer wrapper: a checkpoint's ``tokenizer.json`` (via ``tokenizers``) plus its bos/eos ids.

Kept deliberately thin: the router tokenizes prompts with it, the detokenizer decodes windows of
output ids with it. It reads only the Hugging Face files (tokenizer.json, tokenizer_config.json,
generation_config.json, config.json); transformers is never imported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


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


class Tokenizer:
    """Encode text to ids and decode ids to text for one checkpoint.

    ``eos_token_ids`` is a tuple because generation_config.json may name several end tokens; the
    decode scheduler stops on any of them.
    """

    def __init__(
        self, tokenizer: _HFTokenizer, bos_token_id: int | None, eos_token_ids: tuple[int, ...]
    ) -> None:
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # Ids the ``skip_special_tokens`` path drops; kept here so callers can ask cheaply.
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
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
        return cls(tok, bos, eos)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Special tokens are added here, not by the tokenizer.json post-processor, so the result does
        # not depend on whether a checkpoint's post-processor adds bos.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None:
            return [self.bos_token_id, *ids]
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size
