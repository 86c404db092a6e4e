"""IncrementalDetokenizer: deltas add up to decode(ids), never split a character, cut stop strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.make_model import make_model
from engine.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

TEXT = (
    "The café served a naïve crème brûlée. 日本語 is written 日本語; 🚀 launches, 👍 agrees, "
    "🇯🇵 is a flag. Москва and Ελλάδα too. The END of the ENVELOPE is near.\n"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    # The tiny vocab (512) leaves most non-ASCII characters split across several byte tokens.
    path: Path = make_model(tmp_path_factory.mktemp("tiny"), "tiny")
    return Tokenizer.from_pretrained(path)


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None, **kw) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt or [], **kw)
    deltas = [detok.step(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas, detok.text


def test_text_splits_characters_across_tokens(tok: Tokenizer) -> None:
    # Precondition for the tests below: some token alone is half a character.
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == TEXT


def test_deltas_never_split_a_character(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    deltas, text = _stream(tok, ids)
    assert text == TEXT
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left to flush: every character completed in a step


def test_prompt_context_and_special_tokens(tok: Tokenizer) -> None:
    prompt = tok.encode("Bonjour, ça va? ")
    ids = tok.encode(TEXT, add_special_tokens=False) + [tok.eos_token_ids[0]]
    _, text = _stream(tok, ids, prompt)
    assert text == TEXT
    _, text = _stream(tok, ids, prompt, skip_special_tokens=False)
    assert text == TEXT + "</s>"


@pytest.mark.parametrize("seed", range(30))
def test_random_token_streams_match_full_decode(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    # Mix arbitrary ids (lone UTF-8 continuation bytes, specials) with well-formed multi-byte text.
    pieces = tok.encode(
        rng.choice(TEXT.split(" ")) + " " + TEXT[rng.randrange(len(TEXT)) :], add_special_tokens=False
    )
    ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(0, 40))]
    ids[rng.randrange(len(ids) + 1) : 0] = pieces
    deltas, text = _stream(tok, ids)
    full = tok.decode(ids)
    assert text == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_is_released_by_flush(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🚀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    out = "".join(detok.step(i) for i in ids[:-1])
    assert out == "ok" or out == "ok "  # the emoji's first bytes are held
    tail = detok.flush()
    assert out + tail == tok.decode(ids[:-1])
    assert tail.endswith("\ufffd")


def _spans_tokens(tok: Tokenizer, text: str, stop: str) -> bool:
    """True when `stop` starts inside one token of `text` and ends inside a later one."""
    ids = tok.encode(text, add_special_tokens=False)
    start = text.index(stop)
    end = start + len(stop)
    pos, first, last = 0, None, None
    for i, _ in enumerate(ids):
        piece_end = len(tok.decode(ids[: i + 1]))
        if first is None and piece_end > start:
            first = i
        if last is None and piece_end >= end:
            last = i
        pos = piece_end
    return first is not None and last is not None and last > first and pos == len(text)


@pytest.mark.parametrize("stop", ["END of", "語 is writ", "本語 is", "🚀 la", "aïv", "\n"])
def test_stop_string_across_tokens_is_cut_exactly(tok: Tokenizer, stop: str) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    if stop != "\n":
        assert _spans_tokens(tok, TEXT, stop)
    detok = IncrementalDetokenizer(tok, [], stop=[stop])
    out = []
    for i in ids:
        out.append(detok.step(i))
        # Emitted text never runs into the stop string, even partially.
        assert TEXT.startswith(detok.text) and len(detok.text) <= TEXT.index(stop)
        if detok.stopped:
            break
    assert detok.stopped
    assert detok.text == "".join(out) == TEXT[: TEXT.index(stop)]
    assert detok.step(ids[-1]) == "" and detok.flush() == ""


def test_held_prefix_is_released_when_the_stop_does_not_complete(tok: Tokenizer) -> None:
    text = "The ENVELOPE. Then END"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["ENDING", "zzz"])
    emitted = "".join(detok.step(i) for i in ids)
    assert not detok.stopped
    assert emitted == "The ENVELOPE. Then "  # "END" may still become "ENDING": held
    assert detok.flush() == "END"
    assert detok.text == text


def test_earliest_of_several_stops_wins(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    _, text = _stream(tok, ids, stop=["ENVELOPE", "crème", "🚀"])
    assert text == TEXT[: TEXT.index("crème")]
    _, text = _stream(tok, ids, stop=["The café"])
    assert text == ""


@pytest.mark.parametrize("seed", range(20))
def test_random_stops_match_find(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(1000 + seed)
    start = rng.randrange(len(TEXT) - 4)
    stop = TEXT[start : start + rng.randrange(1, 5)]
    _, text = _stream(tok, tok.encode(TEXT, add_special_tokens=False), stop=[stop, "never appears"])
    assert text == TEXT[: TEXT.index(stop)]
