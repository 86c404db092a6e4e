"""The messages of the KV handoff between the pools, and the errors a pool call ends with.

Pure data (no torch, no Ray): what crosses a Ray call between the coordinator, a decode worker and a
prefill worker. One request's handoff (ARCHITECTURE.md, "The KV handoff")::

    coordinator                 decode worker                       prefill worker
    WorkRequest ──reserve──────▶ blocks under a lease
                ◀── KVGrant ──── (dest: the blocks still to fill)
    WorkRequest + KVGrant ─────────────────────────────prefill stream──▶ chunks; each layer streamed
                ◀───────────────────────────── FirstToken(committed=False) (sampled: to the client now)
    start(FirstToken) ─────────▶ kept until the KV commits
                                 digests verified, commit, ack ◀─────── over kv_transfer
                                 joins the running batch
                ◀───────────────────────────── FirstToken(committed=True) (after the ack: figures)
    stream() ◀─ TokenBatch* ──── one stream per router: every request's new tokens, per step

Tensor-parallel workers (pool_runtime/rank_group.py): ``reserve`` is told the prefill worker's
:class:`~kv_transfer.heads.KVShardLayout` and refuses one it cannot take (:class:`IncompatibleKV`,
before any block is held); the grant then holds one destination per decode rank and the decode
worker's layout, from which every prefill rank finds the heads it sends where
(kv_transfer/heads.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from kv_transfer.heads import KVShardLayout
from kv_transfer.transport import KVDestination

DISAGGREGATION_MODES = ("always", "never", "auto")
# How a decode worker answers ``take`` for a request it does not hold (cancelled, or lost in a restart).
UNKNOWN_REQUEST = "unknown request"


class WorkerDied(RuntimeError):
    """The worker serving a request is gone (its process died); the request may be retried."""


class PoolError(RuntimeError):
    """A request could not be served by the pools (no room, retries exhausted, bad input)."""


class InvalidWorkRequest(PoolError):
    """A worker refused the request's input (the engine's own checks); retrying cannot help."""


class IncompatibleKV(PoolError):
    """The two workers' KV pools cannot exchange KV (another model, dtype, block size or head
    layout): found when the decode worker reserves, before any block is held."""


# TokenChunk.error_kind: why a stream ended with an error, for a router to pick a status code.
ERROR_KINDS = ("", "cancelled", "deadline", "invalid", "overloaded", "unavailable", "failed")


@dataclass(slots=True)
class WorkRequest:
    """One request as a worker sees it. ``params.seed`` is always set (the coordinator picks it), so
    a request prefilled on one worker and decoded, or resumed, on another draws the same tokens."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams

    @property
    def seed(self) -> int:
        assert self.params.seed is not None, "the coordinator sets the seed"
        return self.params.seed


@dataclass(slots=True)
class KVGrant:
    """A decode worker's answer to ``reserve``: where the prompt's KV goes.

    The decode worker already holds the first ``num_cached_blocks`` blocks of the prompt (a prefix
    hit): ``dest.block_ids`` are the blocks after those, so the prefill worker sends its blocks
    ``[num_cached_blocks, ...)`` to ``dest`` offsets ``[0, ...)``. A tensor-parallel decode worker
    adds its other ranks' destinations (the same block ids, in each rank's own pool) and its layout.
    """

    request_id: str
    worker_id: str
    dest: KVDestination  # rank 0's
    num_cached_blocks: int = 0
    rank_dests: tuple[KVDestination, ...] = ()  # ranks 1 .. D-1 of a tensor-parallel decode worker
    layout: KVShardLayout | None = None  # the decode worker's; None: the sender's own, on one rank

    @property
    def dests(self) -> tuple[KVDestination, ...]:
        """One destination per decode rank, rank order."""
        return (self.dest, *self.rank_dests)


@dataclass(slots=True)
class FirstToken:
    """What a prefill worker returns once the decode worker acked the commit."""

    request_id: str
    token_id: int
    worker_id: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefill worker served from its prefix cache
    kv_bytes: int = 0  # bytes sent to the decode worker (by every prefill rank)
    kv_transfer_start_ns: int = 0  # time.time_ns() when the first layer was posted; 0: nothing sent
    kv_transfer_s: float = 0.0  # first layer posted -> the decode worker's commit ack
    kv_layers: int = 0  # distinct layers sent
    # Why the request ends with this very token (EOS, a stop token id, max_tokens, the context
    # length), judged by the request's own parameters; None: it goes on.
    finish_reason: str | None = None
    # False: sampled, the handoff still completing behind it (the prefill stream's first item);
    # True: the decode worker committed the KV (the transfer figures above are final).
    committed: bool = True


@dataclass(slots=True)
class TokenChunk:
    """New tokens of one request; ``finished`` on the last one. ``error`` explains an abort that the
    caller did not ask for (a failed handoff, a dead worker with retries exhausted)."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    error: str = ""
    worker_id: str = ""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # time.monotonic() when the worker produced it (one clock for every process on a host)
    produced_at: float = 0.0
    # Which attempt of the request (Route.attempt) it belongs to: the router drops a chunk of an
    # earlier attempt (a retried handoff, a resume) still in flight when the next one starts.
    attempt: int = 0
    # Set by the coordinator: error_kind on an error chunk (one of ERROR_KINDS); on the last chunk
    # of a disaggregated request, the prefill worker, the KV bytes it sent (every attempt) and the
    # prompt tokens it served from its prefix cache.
    error_kind: str = ""
    prefill_worker: str = ""
    kv_bytes: int = 0
    prefill_cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request's tokens go on a decode worker: its router's channel (one stream per router)
    and the attempt they belong to (every chunk carries it back)."""

    channel: str = ""
    attempt: int = 0


@dataclass(slots=True)
class TokenBatch:
    """One message of a decode worker's token stream (decode_pool/outbox.py): every chunk its steps
    produced for one router since the previous message, in the order produced. Empty: a heartbeat."""

    worker_id: str
    chunks: list[TokenChunk] = field(default_factory=list)
