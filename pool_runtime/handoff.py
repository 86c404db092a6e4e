"""The messages of the KV handoff between the pools, and the workers' shared configuration.

Pure data (no torch, no Ray): what crosses a Ray call between the coordinator, a decode worker and a
prefill worker. One request's handoff (ARCHITECTURE.md, "The KV handoff")::

    coordinator                 decode worker                       prefill worker
    WorkRequest ──reserve──────▶ blocks under a lease
                ◀── KVGrant ──── (dest: the blocks still to fill)
    WorkRequest + KVGrant ──────────────────────────────────prefill──▶ chunks; each layer streamed
                                 digests verified, commit, ack ◀─────── over kv_transfer
                ◀──────────────────────────────────── FirstToken ───── (only after the ack)
    start(FirstToken) ─────────▶ joins the running batch
    take() ◀──── TokenChunk* ─── continuous batching
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.sampling_params import SamplingParams
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


# TokenChunk.error_kind: why a stream ended with an error, for a router to pick a status code.
ERROR_KINDS = ("", "cancelled", "deadline", "invalid", "overloaded", "unavailable", "failed")


@dataclass(slots=True)
class WorkerConfig:
    """What one prefill or decode worker runs: the engine settings plus the KV transport."""

    model: str | Path
    worker_id: str = "worker-0"
    dtype: str = "float32"
    device: str = "cpu"  # "cuda" when the pool asks for GPUs
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int = 64 << 20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    kv_backend: str = "nixl"  # nixl | ucxx | inprocess (kv_transfer.factory.BACKENDS)
    kv_transport: str = "auto"  # auto | shm | tcp | cuda_ipc | rc
    lease_s: float = 60.0  # how long a decode reservation waits for its KV
    ack_timeout_s: float = 30.0  # how long a prefill worker waits for the decode worker's commit
    torch_threads: int = 0  # > 0: torch.set_num_threads (one core per worker in the benchmark)
    # Lower KV tiers (memory_tiers/): G2 host bytes (0: none) and G3 under <disk_kv_dir>/<worker_id>
    host_kv_bytes: int = 0
    # Decode: host inbox blocks for KV landing in G2 when G1 is full (0: one longest prompt, at most
    # the G2 size). Transfers to G2 in flight are bounded by it (decode_pool/g2_landing.py).
    host_landing_blocks: int = 0
    disk_kv_dir: str | None = None
    disk_kv_bytes: int = 0


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
    ``[num_cached_blocks, ...)`` to ``dest`` offsets ``[0, ...)``.
    """

    request_id: str
    worker_id: str
    dest: KVDestination
    num_cached_blocks: int = 0


@dataclass(slots=True)
class FirstToken:
    """What a prefill worker returns once the decode worker acked the commit."""

    request_id: str
    token_id: int
    worker_id: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefill worker served from its prefix cache
    kv_bytes: int = 0  # bytes sent to the decode worker
    kv_transfer_start_ns: int = 0  # time.time_ns() when the first layer was posted; 0: nothing sent
    kv_transfer_s: float = 0.0  # first layer posted -> the decode worker's commit ack
    kv_layers: int = 0  # distinct layers sent


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
    # Set by the coordinator: error_kind on an error chunk (one of ERROR_KINDS); on the last chunk
    # of a disaggregated request, the prefill worker, the KV bytes it sent (every attempt) and the
    # prompt tokens it served from its prefix cache.
    error_kind: str = ""
    prefill_worker: str = ""
    kv_bytes: int = 0
    prefill_cached_tokens: int = 0


@dataclass(slots=True)
class WorkerLoad:
    """A worker's load report, for the router: queue, running batch, blocks."""

    worker_id: str
    role: str  # "prefill" | "decode"
    waiting: int = 0  # requests queued (decode: reserved and waiting for their KV, or local prompts)
    queue_tokens: int = 0  # prompt tokens still to compute
    running: int = 0
    used_blocks: int = 0  # G1 blocks in use (ref_count > 0)
    free_blocks: int = 0  # G1 blocks allocatable now (free plus cached-free)
    total_blocks: int = 0
    reserved_blocks: int = 0  # decode: blocks under a KV lease (G1, or the G2 landing inbox)
    cached_blocks: int = 0  # blocks holding a reusable prefix
    # G2 (decode workers with a host tier; all 0 without one)
    g2_used_blocks: int = 0  # G2 slots held for requests (reserved for incoming KV, or pinned)
    g2_free_blocks: int = 0  # G2 blocks a reservation could get now
    g2_total_blocks: int = 0
