"""The seam between the gRPC front door and whatever generates tokens.

A :class:`Backend` takes a validated, tokenized :class:`BackendRequest` and streams
:class:`Chunk` deltas. The first implementation is :class:`router.engine_backend.EngineBackend` (one
in-process ``LLMEngine`` on a thread); the Ray prefill/decode pools are the next one. The servicer
knows only this Protocol.

Cancellation has no method of its own: closing the async generator returned by ``generate`` (or
cancelling the task iterating it) must release everything the request holds downstream (KV blocks,
queue slots). Pure: no gRPC, no torch.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from pool_runtime.reports import WorkerLoad
from router.validation import ModelLimits


@dataclass(frozen=True, slots=True)
class BackendModelInfo:
    """What a backend serves: the limits validation uses plus what GetModelInfo reports."""

    limits: ModelLimits
    fingerprint: str = ""
    block_size: int = 16
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()


def model_info(
    mc: Any,
    name: str,
    block_size: int,
    dtype: str,
    max_model_len: int | None,
    max_tokens_limit: int | None,
    eos_token_ids: Iterable[int],
    default_max_tokens: int = 64,
) -> BackendModelInfo:
    """What a backend serving ``mc`` (an ``engine.config.ModelConfig``) reports and validates with:
    the context is the checkpoint's, or ``max_model_len`` when shorter, and no request may ask for
    more than ``max_tokens_limit`` (when set) or the context."""
    context = min(max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    limit = min(max_tokens_limit or context, context)
    return BackendModelInfo(
        limits=ModelLimits(
            name=name,
            max_context_length=context,
            max_tokens_limit=limit,
            default_max_tokens=min(default_max_tokens, limit),
            vocab_size=mc.vocab_size,
        ),
        fingerprint=str(mc.fingerprint),
        block_size=block_size,
        dtype=dtype,
        eos_token_ids=tuple(sorted(eos_token_ids)),
    )


@dataclass(slots=True)
class BackendLoad:
    """The backend's liveness and each worker's load (pool_runtime.reports.WorkerLoad, the one load
    type: GetServerInfo reports it, with the node the backend knows the worker runs on)."""

    alive: bool
    workers: list[WorkerLoad] = field(default_factory=list)

    @property
    def running(self) -> int:
        return sum(w.running for w in self.workers)

    @property
    def waiting(self) -> int:
        return sum(w.waiting for w in self.workers)

    @property
    def used_blocks(self) -> int:
        return sum(w.used_blocks for w in self.workers)


@dataclass(slots=True)
class BackendRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    model: str = ""
    disaggregation: str = "never"  # "auto" | "always" | "never", resolved against the server default
    arrival: float = 0.0  # time.monotonic() when the router received it


@dataclass(slots=True)
class ChunkStats:
    """Carried by the last chunk of a request: usage and where the time went."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_time_s: float  # router arrival -> start of prefill
    backend_time_s: float  # the backend's own span: request received -> last token produced
    prefill_worker: str = ""
    decode_worker: str = ""
    kv_bytes_moved: int = 0
    disaggregated: bool = False


@dataclass(slots=True)
class Chunk:
    """New tokens of one request since its previous chunk; ``finish_reason`` set on the last one.

    ``text``: a backend that makes no text (``detokenizer`` gives one) leaves it "" and the front
    door fills it in; ``partial``: what is known of the request's stats so far (the first chunk
    carries it), from which the front door builds the last chunk's when a stop string ends the
    request before the backend does."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    stats: ChunkStats | None = None  # last chunk only
    produced_at: float = 0.0  # time.monotonic() when the backend produced it; 0 = unknown (other process)
    partial: ChunkStats | None = None


@runtime_checkable
class Backend(Protocol):
    """Lifecycle: construct (loads the model) -> ``generate`` many times, concurrently -> ``close``
    (idempotent; aborts what is in flight, so every block is returned)."""

    def model_info(self) -> BackendModelInfo: ...

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt text (``add_special_tokens``: the tokenizer's post-processor, e.g.
        BOS); raises InvalidRequest if the model has no tokenizer."""
        ...

    def tokenize_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template; raises InvalidRequest
        (field ``prompt.chat``) when the model has no tokenizer or template, or the template refuses."""
        ...

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids (raises InvalidRequest, field ``tokens``, without a tokenizer)."""
        ...

    def detokenizer(self, request: BackendRequest) -> IncrementalDetokenizer | None:
        """The request's incremental detokenizer, when the backend streams token ids only and the
        front door is to make the text (and find the stop strings); None: chunks carry their text."""
        ...

    def generate(self, request: BackendRequest) -> AsyncGenerator[Chunk, None]:
        """Stream the request's chunks; raises InvalidRequest (bad input, this request only) or
        BackendUnavailable. Closing the iterator cancels the request downstream."""
        ...

    def load(self) -> BackendLoad: ...

    def close(self) -> None: ...


def finish_reason_name(reason: object | None) -> str | None:
    """An engine FinishReason (enum with a string value) or a string, as a plain string."""
    if reason is None:
        return None
    return str(getattr(reason, "value", reason))


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """``tokenize_chat`` for a backend holding an ``engine.tokenizer.Tokenizer`` (or None)."""
    from engine.chat_template import ChatTemplateError
    from router.errors import InvalidRequest

    if tokenizer is None:
        raise InvalidRequest("prompt.chat", "this model has no tokenizer: send prompt token_ids")
    try:
        return list(tokenizer.encode_chat(messages, add_generation_prompt))
    except ChatTemplateError as e:
        raise InvalidRequest("prompt.chat", str(e)) from None


def decode_ids(tokenizer: Any, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """``detokenize`` for a backend holding an ``engine.tokenizer.Tokenizer`` (or None)."""
    from router.errors import InvalidRequest

    if tokenizer is None:
        raise InvalidRequest("tokens", "this model has no tokenizer")
    return str(tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))


def total_tokens(chunks: Sequence[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def make_detokenizer(tokenizer: Any, request: BackendRequest) -> IncrementalDetokenizer | None:
    """``detokenizer`` for a backend holding an ``engine.tokenizer.Tokenizer`` (or None)."""
    if tokenizer is None:
        return None
    return IncrementalDetokenizer(tokenizer, request.prompt_token_ids, stop=list(request.params.stop))
