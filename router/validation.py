"""Validation of a Generate request against the served models' limits (pure; no gRPC, no torch).

The servicer converts the wire message into a :class:`GenerateInput`, calls :func:`check_request`
before tokenizing and :func:`check_prompt_length` after, and maps :class:`ValidationError` to
``INVALID_ARGUMENT`` with ``str(error)`` as the details. Every message starts with the offending
field's name, so a client can tell which field to fix without parsing prose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams

DISAGGREGATION_MODES = ("auto", "always", "never")


class ValidationError(ValueError):
    """A request field is invalid; ``field`` names it (dotted for nested fields, e.g. ``sampling.top_p``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class ModelLimits:
    name: str
    max_context_length: int  # prompt + generated tokens
    max_tokens_limit: int  # the most tokens one request may generate
    default_max_tokens: int = 64
    vocab_size: int | None = None  # when known, prompt token ids are range-checked


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The server's bounds on one request, whatever the model allows (deploy/config.py's
    ``router.limits``); a request over one is refused naming the field and the limit."""

    max_prompt_tokens: int | None = None  # None: the model's context length bounds it
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters in one stop string
    max_stop_token_ids: int = 64
    max_logprobs: int = 20  # top-k logprobs per token
    max_n: int = 32  # choices per request (the HTTP API's n; gRPC asks one at a time)
    max_chat_messages: int = 1024


@dataclass(slots=True)
class GenerateInput:
    """A Generate request as plain values; ``None`` means the client left the field unset."""

    model: str = ""
    prompt_text: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    prompt_chat: list[dict[str, str]] | None = None  # [{"role": ..., "content": ...}, ...]
    add_generation_prompt: bool = True
    max_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float | None = None
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    request_id: str = ""
    disaggregation: str | None = None  # "auto" | "always" | "never"; None = the server's default
    n: int = 1  # choices asked for (the HTTP API's n)


def resolve_model(name: str, models: Mapping[str, ModelLimits]) -> ModelLimits:
    """The model a request names; an empty name means the server's only model."""
    if not models:
        raise ValidationError("model", "this server serves no model")
    if not name:
        if len(models) == 1:
            return next(iter(models.values()))
        raise ValidationError("model", f"required when a server serves several models ({sorted(models)})")
    if name not in models:
        raise ValidationError("model", f"unknown model {name!r}; served: {sorted(models)}")
    return models[name]


def check_request(
    req: GenerateInput, models: Mapping[str, ModelLimits], bounds: RequestLimits = RequestLimits()
) -> ModelLimits:
    """Everything checkable before tokenizing; returns the resolved model's limits."""
    limits = resolve_model(req.model, models)
    check_bounds(req, bounds)
    _check_prompt(req, limits)
    _check_sampling(req, limits)
    if req.disaggregation is not None and req.disaggregation not in DISAGGREGATION_MODES:
        raise ValidationError(
            "disaggregation", f"must be one of {DISAGGREGATION_MODES}, got {req.disaggregation!r}"
        )
    return limits


def check_prompt_length(
    num_prompt_tokens: int, max_tokens: int, limits: ModelLimits, bounds: RequestLimits = RequestLimits()
) -> None:
    """After tokenizing: the prompt, and the prompt plus the tokens to generate, fit the context
    (and the prompt the server's ``max_prompt_tokens``)."""
    if num_prompt_tokens == 0:
        raise ValidationError("prompt", "is empty after tokenization")
    if bounds.max_prompt_tokens is not None and num_prompt_tokens > bounds.max_prompt_tokens:
        raise ValidationError(
            "prompt",
            f"has {num_prompt_tokens} tokens, over this server's limit max_prompt_tokens "
            f"{bounds.max_prompt_tokens}",
        )
    if num_prompt_tokens > limits.max_context_length:
        raise ValidationError(
            "prompt",
            f"has {num_prompt_tokens} tokens, over the context length {limits.max_context_length} "
            f"of model {limits.name!r}",
        )
    if num_prompt_tokens + max_tokens > limits.max_context_length:
        room = limits.max_context_length - num_prompt_tokens
        raise ValidationError(
            "sampling.max_tokens",
            f"{max_tokens} plus the prompt's {num_prompt_tokens} tokens exceed the context length "
            f"{limits.max_context_length}; at most {room} fit",
        )


def effective_max_tokens(req: GenerateInput, limits: ModelLimits) -> int:
    return limits.default_max_tokens if req.max_tokens is None else req.max_tokens


def to_sampling_params(req: GenerateInput, limits: ModelLimits) -> SamplingParams:
    """The engine's sampling parameters for a request that passed :func:`check_request`."""
    return SamplingParams(
        max_tokens=min(effective_max_tokens(req, limits), limits.max_tokens_limit),
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p,
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids),
        stop=list(req.stop),
        ignore_eos=req.ignore_eos,
        logprobs=req.logprobs,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
    )


def check_bounds(req: GenerateInput, b: RequestLimits) -> None:
    """The server's limits on sizes and counts (router.limits), each refusal naming its limit
    (part of :func:`check_request`; the HTTP API also calls it while translating a body)."""
    if not 1 <= req.n <= b.max_n:
        raise ValidationError("n", f"must be in [1, {b.max_n}] (max_n), got {req.n}")
    if len(req.stop) > b.max_stop_strings:
        raise ValidationError(
            "sampling.stop",
            f"{len(req.stop)} stop strings, over the limit max_stop_strings {b.max_stop_strings}",
        )
    longest = max((len(s) for s in req.stop), default=0)
    if longest > b.max_stop_length:
        raise ValidationError(
            "sampling.stop",
            f"a stop string of {longest} characters, over the limit max_stop_length {b.max_stop_length}",
        )
    if len(req.stop_token_ids) > b.max_stop_token_ids:
        raise ValidationError(
            "sampling.stop_token_ids",
            f"{len(req.stop_token_ids)} ids, over the limit max_stop_token_ids {b.max_stop_token_ids}",
        )
    if req.logprobs is not None and req.logprobs > b.max_logprobs:
        raise ValidationError(
            "sampling.logprobs", f"must be in [0, {b.max_logprobs}] (max_logprobs), got {req.logprobs}"
        )
    if req.prompt_chat is not None and len(req.prompt_chat) > b.max_chat_messages:
        raise ValidationError(
            "prompt.chat.messages",
            f"{len(req.prompt_chat)} messages, over the limit max_chat_messages {b.max_chat_messages}",
        )
    if (
        b.max_prompt_tokens is not None
        and req.prompt_token_ids is not None
        and len(req.prompt_token_ids) > b.max_prompt_tokens
    ):
        raise ValidationError(
            "prompt.token_ids",
            f"has {len(req.prompt_token_ids)} tokens, over this server's limit max_prompt_tokens "
            f"{b.max_prompt_tokens}",
        )


def _check_prompt(req: GenerateInput, limits: ModelLimits) -> None:
    given = [req.prompt_text is not None, req.prompt_token_ids is not None, req.prompt_chat is not None]
    if sum(given) > 1:
        raise ValidationError("prompt", "give one of text, token_ids or chat, not several")
    if req.prompt_chat is not None:
        _check_chat(req.prompt_chat)
        return
    if req.prompt_token_ids is not None:
        ids = req.prompt_token_ids
        if len(ids) == 0:
            raise ValidationError("prompt.token_ids", "is empty")
        if len(ids) > limits.max_context_length:
            raise ValidationError(
                "prompt.token_ids",
                f"has {len(ids)} tokens, over the context length {limits.max_context_length} "
                f"of model {limits.name!r}",
            )
        vocab = limits.vocab_size
        bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise ValidationError(
                "prompt.token_ids", f"token id {bad} is outside the vocabulary [0, {vocab})"
            )
        return
    if not req.prompt_text:
        raise ValidationError("prompt", "is empty")


def _check_chat(messages: Sequence[Mapping[str, str]]) -> None:
    if not messages:
        raise ValidationError("prompt.chat.messages", "is empty")
    for i, m in enumerate(messages):
        if not m.get("role"):
            raise ValidationError(f"prompt.chat.messages[{i}].role", "is empty")


def _check_sampling(req: GenerateInput, limits: ModelLimits) -> None:
    max_tokens = effective_max_tokens(req, limits)
    if max_tokens <= 0:
        raise ValidationError("sampling.max_tokens", f"must be > 0, got {max_tokens}")
    if max_tokens > limits.max_tokens_limit:
        raise ValidationError(
            "sampling.max_tokens", f"{max_tokens} is over this server's limit {limits.max_tokens_limit}"
        )
    _check_finite("sampling.temperature", req.temperature)
    if req.temperature < 0:
        raise ValidationError("sampling.temperature", f"must be >= 0, got {req.temperature}")
    if req.top_p is not None:
        _check_finite("sampling.top_p", req.top_p)
        if not 0.0 < req.top_p <= 1.0:
            raise ValidationError("sampling.top_p", f"must be in (0, 1], got {req.top_p}")
    if req.top_k < 0:
        raise ValidationError("sampling.top_k", f"must be >= 0 (0 = off), got {req.top_k}")
    _check_finite("sampling.min_p", req.min_p)
    if not 0.0 <= req.min_p <= 1.0:
        raise ValidationError("sampling.min_p", f"must be in [0, 1], got {req.min_p}")
    if req.logprobs is not None and req.logprobs < 0:
        raise ValidationError("sampling.logprobs", f"must be >= 0, got {req.logprobs}")
    if req.repetition_penalty is not None:
        _check_finite("sampling.repetition_penalty", req.repetition_penalty)
        if req.repetition_penalty <= 0:
            raise ValidationError(
                "sampling.repetition_penalty", f"must be > 0 (1 = off), got {req.repetition_penalty}"
            )
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        _check_finite(f"sampling.{name}", value)
        if not -2.0 <= value <= 2.0:
            raise ValidationError(f"sampling.{name}", f"must be in [-2, 2] (0 = off), got {value}")
    if any(t < 0 for t in req.stop_token_ids):
        raise ValidationError("sampling.stop_token_ids", "token ids must be >= 0")
    if any(s == "" for s in req.stop):
        raise ValidationError("sampling.stop", "stop strings must not be empty")


def _check_finite(name: str, value: float) -> None:
    # NaN compares false with everything, so it would slip through every range check below.
    if not math.isfinite(value):
        raise ValidationError(name, f"must be a finite number, got {value}")
