"""OpenAI's wire shapes to Tandem's and back: request bodies -> a :class:`Plan` of GenerateInputs,
backend chunks -> the JSON of completions, chat completions and their stream chunks (pure).

A request becomes one GenerateInput per prompt (a completions ``prompt`` may be a list), each run as
``n`` choices; choice ``i`` of prompt ``p`` has index ``p * n + i``. Choice ``i`` of a seeded request
samples with ``seed + i``, so the choices differ and the whole response is reproducible (the
sampler's draws depend only on (seed, position)). Defaults are OpenAI's: temperature 1, top_p 1,
16 tokens for a completion, as many as the context leaves for a chat.

Field names: router/validation.py names gRPC's fields (``sampling.top_p``, ``prompt.chat...``);
:meth:`Plan.field` gives the HTTP name of the same field (``top_p``, ``messages[0].role``), so a 400
names what the client sent.

Logprobs are the model's raw ones (before temperature and penalties, as vLLM's by default), -inf
clamped to -9999.0 (JSON has no infinity). A token's text is the tokenizer's decoding of that token
alone, special tokens included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.backend import ChunkStats
from router.front_door import RequestTiming
from router.http.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, StreamOptions
from router.validation import GenerateInput, RequestLimits, ValidationError, check_bounds

COMPLETION_DEFAULT_MAX_TOKENS = 16
LOGPROB_FLOOR = -9999.0
FINISH_REASONS = ("stop", "length")

TokenText = Callable[[int], str]


@dataclass(slots=True)
class Plan:
    """One OpenAI request, translated."""

    kind: str  # "completion" | "chat"
    inputs: list[GenerateInput]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    logprobs: int | None = None  # top-k per token (completions' logprobs, chat's top_logprobs)
    fill_context: bool = False  # an unset max_tokens means as many as the context leaves
    return_timings: bool = False
    max_tokens_field: str = "max_tokens"

    @property
    def prompt_field(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def field(self, name: str) -> str:
        """The HTTP name of a router/validation.py field name."""
        if name == "sampling.max_tokens":
            return self.max_tokens_field
        if name == "sampling.logprobs":
            return "top_logprobs" if self.kind == "chat" else "logprobs"
        if name.startswith("sampling."):
            return name.removeprefix("sampling.")
        if name.startswith("prompt.chat.messages"):
            return "messages" + name.removeprefix("prompt.chat.messages")
        if name.startswith("prompt"):
            return self.prompt_field
        return name

    def translate(self, e: Exception) -> ValidationError:
        """A validation or backend refusal with the field renamed for HTTP."""
        name = self.field(getattr(e, "field", "request"))
        message = getattr(e, "message", None) or str(e).split(": ", 1)[-1]
        return ValidationError(name, message)


def _refuse(name: str, message: str) -> ValidationError:
    return ValidationError(name, message)


def _common(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> dict[str, Any]:
    """The GenerateInput fields completions and chat share; raises ValidationError naming the field."""
    # n's and logprobs' upper bounds are the server's (router.limits), checked by router/validation.py
    if body.best_of is not None and body.best_of != body.n:
        raise _refuse("best_of", f"only best_of = n ({body.n}) is supported (no ranking), got {body.best_of}")
    if body.logit_bias:
        raise _refuse("logit_bias", "is not supported")
    if body.stream_options is not None and not body.stream:
        raise _refuse("stream_options", "is only allowed when stream is true")
    top_k = body.top_k if body.top_k is not None else 0
    if top_k == -1:
        top_k = 0  # vLLM's "off"
    elif top_k < 0:
        raise _refuse("top_k", f"must be >= -1 (-1 or 0: off), got {top_k}")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return dict(
        model=body.model or "",
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=top_k,
        top_p=body.top_p,
        min_p=body.min_p or 0.0,
        seed=body.seed,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        disaggregation=body.disaggregation,
        n=body.n,
    )


def _stream_flags(opts: StreamOptions | None) -> tuple[bool, bool]:
    if opts is None:
        return False, False
    return opts.include_usage, opts.include_usage and opts.continuous_usage_stats


def _bounded(plan: Plan, bounds: RequestLimits) -> Plan:
    """The server's limits (n, logprobs, stop strings, ...) checked now, named as HTTP names them."""
    for inp in plan.inputs:
        try:
            check_bounds(inp, bounds)
        except ValidationError as e:
            raise plan.translate(e) from None
    return plan


def completion_plan(body: CompletionRequest, bounds: RequestLimits = RequestLimits()) -> Plan:
    if body.echo:
        raise _refuse("echo", "is not supported")
    if body.suffix is not None:
        raise _refuse("suffix", "is not supported")
    if body.logprobs is not None and body.logprobs < 0:
        raise _refuse("logprobs", f"must be >= 0, got {body.logprobs}")
    common = _common(body, COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens)
    prompt = body.prompt
    prompts: Sequence[str | list[int]]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise _refuse("prompt", "is empty")
    inputs = []
    for p in prompts:
        if isinstance(p, str):
            inputs.append(GenerateInput(prompt_text=p, logprobs=body.logprobs, **common))
        else:
            inputs.append(GenerateInput(prompt_token_ids=list(p), logprobs=body.logprobs, **common))
    usage, continuous = _stream_flags(body.stream_options)
    return _bounded(
        Plan(
            "completion",
            inputs,
            body.n,
            body.stream,
            usage,
            continuous,
            body.logprobs,
            return_timings=body.return_timings,
        ),
        bounds,
    )


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template reads them: a content given as parts becomes their texts,
    joined with newlines (as vLLM joins them); a null content is empty."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    what = "a text part without text" if part.type == "text" else repr(part.type)
                    raise _refuse(f"messages[{i}].content[{j}]", f"only text parts are supported, got {what}")
                texts.append(part.text)
            content = "\n".join(texts)
        message = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def chat_plan(body: ChatCompletionRequest, bounds: RequestLimits = RequestLimits()) -> Plan:
    if body.tools:
        raise _refuse("tools", "tool calling is not supported")
    if body.tool_choice not in (None, "none"):
        raise _refuse("tool_choice", "tool calling is not supported")
    if body.response_format is not None and body.response_format.type != "text":
        raise _refuse("response_format", f"only type 'text' is supported, got {body.response_format.type!r}")
    top = body.top_logprobs
    if top is not None:
        if not body.logprobs:
            raise _refuse("top_logprobs", "requires logprobs to be true")
        if top < 0:
            raise _refuse("top_logprobs", f"must be >= 0, got {top}")
    k = (top or 0) if body.logprobs else None
    field_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    common = _common(body, max_tokens)
    inp = GenerateInput(
        prompt_chat=chat_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        logprobs=k,
        **common,
    )
    usage, continuous = _stream_flags(body.stream_options)
    return _bounded(
        Plan(
            "chat",
            [inp],
            body.n,
            body.stream,
            usage,
            continuous,
            k,
            fill_context=max_tokens is None,
            return_timings=body.return_timings,
            max_tokens_field=field_name,
        ),
        bounds,
    )


# -- responses ------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def timings(st: ChunkStats, timing: RequestTiming, total_s: float) -> dict[str, Any]:
    """The ``return_timings`` extension: what gRPC's Timings message carries."""
    return {
        "queue_time_s": st.queue_time_s,
        "time_to_first_token_s": timing.ttft_s,
        "total_time_s": total_s,
        "backend_time_s": st.backend_time_s,
        "router_request_time_s": timing.router_request_s,
        "router_token_time_s": timing.router_token_s,
        "prefill_worker": st.prefill_worker,
        "decode_worker": st.decode_worker,
        "kv_bytes_moved": st.kv_bytes_moved,
        "disaggregated": st.disaggregated,
    }


def _lp(value: float | None) -> float:
    return LOGPROB_FLOOR if value is None or math.isnan(value) else max(value, LOGPROB_FLOOR)


@dataclass(slots=True)
class Logprobs:
    """One choice's logprobs so far, rendered per chunk in the shape of its endpoint."""

    kind: str
    token_text: TokenText
    text_offset: int = 0  # completions: where the next token starts in the choice's text

    def render(
        self,
        ids: Sequence[int],
        lps: Sequence[float | None],
        tops: Sequence[list[tuple[int, float]] | None],
    ) -> dict[str, Any]:
        tops = list(tops) + [None] * (len(ids) - len(tops))
        lps = list(lps) + [None] * (len(ids) - len(lps))
        text = self.token_text
        if self.kind == "chat":
            return {
                "content": [
                    self._chat_entry(t, lp, top or []) for t, lp, top in zip(ids, lps, tops, strict=True)
                ]
            }
        tokens, offsets, top_maps = [], [], []
        for t, lp, top in zip(ids, lps, tops, strict=True):
            s = text(t)
            tokens.append(s)
            offsets.append(self.text_offset)
            self.text_offset += len(s)
            # OpenAI: the k most likely tokens, plus the sampled one (so up to k + 1 entries)
            entries = {text(i): _lp(v) for i, v in (top or [])}
            entries.setdefault(s, _lp(lp))
            top_maps.append(entries)
        return {
            "tokens": tokens,
            "token_logprobs": [_lp(lp) for lp in lps],
            "top_logprobs": top_maps,
            "text_offset": offsets,
        }

    def _chat_entry(self, token: int, lp: float | None, top: list[tuple[int, float]]) -> dict[str, Any]:
        s = self.token_text(token)
        return {
            "token": s,
            "logprob": _lp(lp),
            "bytes": list(s.encode("utf-8")),
            "top_logprobs": [
                {"token": (ts := self.token_text(i)), "logprob": _lp(v), "bytes": list(ts.encode("utf-8"))}
                for i, v in top
            ],
        }


@dataclass(slots=True)
class ChoiceText:
    """What a non-streamed choice collects."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stats: ChunkStats | None = None
    timings: dict[str, Any] | None = None


def choice_json(kind: str, c: ChoiceText, logprobs: Logprobs | None) -> dict[str, Any]:
    text = "".join(c.text)
    lp = logprobs.render(c.token_ids, c.logprobs, c.top_logprobs) if logprobs is not None else None
    out: dict[str, Any] = {"index": c.index}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text
    out["logprobs"] = lp
    out["finish_reason"] = c.finish_reason
    if c.timings is not None:
        out["timings"] = c.timings
    return out


def model_card(name: str, root: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "tandem",
        "root": root,
        "parent": None,
        "max_model_len": max_model_len,
    }
