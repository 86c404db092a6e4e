"""Streaming ids -> text for one request: UTF-8-safe deltas and stop strings cut at the exact character.

Two problems, solved in two stages per ``step``:

1. A byte-level BPE token may hold part of a multi-byte character ("日" is 3 bytes, "🚀" 4), so a
   token on its own may not decode. Following vLLM, only a small window of recent ids is decoded
   (O(new tokens) per step, never the whole output)::

       ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                    \\____ prefix_text ____/
                    \\______________ new_text _________________/

   ``new_text[len(prefix_text):]`` is the delta; it is released only when ``new_text`` does not end
   in U+FFFD (an incomplete character), and then both offsets move forward. Because every
   ``read_offset`` sits on a character boundary, the window's first characters decode the same
   way in both texts.

2. Stop strings: the released text is scanned for the earliest stop match; the match and everything
   after it are never emitted. Without a match, the longest tail that is still a prefix of some stop
   string is held back, since the next token may complete it.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

# How many prompt tokens the first window reaches back (vLLM uses 5): enough context for the first
# output token to decode as it would in place.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Lifecycle: ``step`` once per generated id, then ``flush`` once at the end of the stream.

    After ``stopped`` becomes True, ``step`` and ``flush`` return "" (the request is over).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _PROMPT_CONTEXT, 0)
        self._stops = tuple(s for s in stop if s)
        self._held = ""  # released by the decoder but held back as a possible stop-string start
        self.stopped = False
        self._pieces: list[str] = []  # emitted deltas; joined lazily so a step stays O(delta)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def num_output_tokens(self) -> int:
        return len(self._ids) - self._num_prompt

    def step(self, token_id: int) -> str:
        """Add one generated id; return the newly emitted text (possibly "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character still incomplete: wait for more bytes
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._emit(new_text[len(prefix_text) :], final=False)

    def flush(self) -> str:
        """End of stream: release whatever is held (incomplete bytes decode as U+FFFD)."""
        if self.stopped:
            return ""
        prefix_text, new_text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(new_text[len(prefix_text) :], final=True)

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        prefix = window[: self._read_offset - self._prefix_offset]
        decode = self._tok.decode
        return decode(prefix, skip_special_tokens=self._skip), decode(window, skip_special_tokens=self._skip)

    def _emit(self, delta: str, final: bool) -> str:
        if not self._stops:
            if delta:
                self._pieces.append(delta)
            return delta
        buf = self._held + delta
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._held, self.stopped = buf[:cut], "", True
        elif final:
            out, self._held = buf, ""
        else:
            keep = self._stop_prefix_len(buf)
            out, self._held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if out:
            self._pieces.append(out)
        return out

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = max(len(s) for s in self._stops) - 1
        for k in range(min(longest, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
