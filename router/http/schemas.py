"""The OpenAI API's request bodies as pydantic models: the HTTP edge's wire types, as protobuf is gRPC's.

Types only: a field of the wrong type is a 400 naming it (router/http/errors.py turns pydantic's
errors into OpenAI error objects); the values are checked by router/validation.py, the same checks
gRPC requests get, after router/http/openai.py has translated them. Unknown fields are ignored, as
OpenAI-compatible servers do. Fields a client may send that Tandem does not implement (``echo``,
``suffix``, ``logit_bias``, ``tools``, a non-text ``response_format``) are typed here so that
openai.py can refuse them with a 400 naming the field instead of silently ignoring them.

Extensions (vLLM's where it has one): ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids``, ``add_generation_prompt``, ``stream_options.continuous_usage_stats``; Tandem's
own: ``disaggregation`` (auto / always / never, as gRPC's) and ``return_timings`` (where the
router's time went, on each finished choice: what ``tandem bench serve --protocol http`` reads).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage on every chunk (vLLM's extension)


class _Generation(_Body):
    """What completions and chat completions share."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0: off
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # refused when not empty
    disaggregation: Literal["auto", "always", "never"] | None = None
    return_timings: bool = False


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # k: the sampled token's logprob and the k most likely
    echo: bool = False  # refused when true
    suffix: str | None = None  # refused when set


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Body):
    type: str = "text"


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # wins over max_tokens (which OpenAI deprecates for chat)
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None  # refused when not empty
    tool_choice: Any = None  # refused unless "none"
    response_format: ResponseFormat | None = None  # refused unless "text"


class TokenizeRequest(_Body):
    """POST /tokenize: ``prompt`` or ``messages`` (vLLM's shape)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]
