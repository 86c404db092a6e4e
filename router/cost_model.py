"""The router's cost model: predicted time to first token of one request on one route (pure).

Owns the inputs a routing policy sees (:class:`Candidate`: a worker as the router prices it, derived
from its load report; :class:`RoutingRequest`), the constants
of the model (:class:`CostParams`) and the price of the two kinds of route (ARCHITECTURE.md)::

    disaggregated (p prefills, d decodes):
      ttft = queue(p) + prefill(uncached at p) + handoff + transfer(kv bytes d lacks, link(p, d))
             - overlap + admission_wait(d)
    colocated (d prefills itself):
      ttft = queue(d) + prefill(uncached at d)

    queue(w)      = w.queue_tokens / rate(w)          rate(w) = w's prefill tokens/s estimate
    prefill(n)    = n / rate(w)
    overlap       = overlap_fraction * min(prefill, transfer)   (layer-wise streaming hides part)
    admission(d)  = d.decode_step_s when d is decoding, else 0  (joins at the next step boundary)

Tensor parallel workers (``tensor_parallel_size``): a worker of TP = N prefills ``tp_speedup(N) =
1 + (N - 1) * tp_scaling`` times as fast as one rank (each extra rank adds ``tp_scaling`` of one:
the rest goes to the two all-reduces per layer) when its rate is not reported; its KV is split
by heads, and every (sending rank, receiving rank) pair writes its own heads over its own link, so
a handoff moves ``kv_bytes / streams(p, d)`` per stream, ``streams = min(kv ranks(p), kv ranks(d))``
(``kv ranks(w) = min(w's TP, num_kv_heads)``: replicated heads are sent once)::

    transfer = handoff_overhead + link_time(kv bytes per rank, link(p, d))

A worker's cached prefix counts whole blocks and never the last prompt token: the first sampled
token needs that token's logits, so at least one token is always computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.topology import Topology

ROLES = ("prefill", "decode", "both")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A worker as a routing policy prices it: its last load report (pool_runtime.reports.WorkerLoad)
    with the router's own estimates folded in (router/routing.py: ``Router.policy_loads``)."""

    worker_id: str
    role: str  # "prefill" | "decode" | "both"
    queue_tokens: int = 0  # prompt tokens waiting to be prefilled there
    running_seqs: int = 0  # sequences decoding there
    free_blocks: Mapping[str, int] = field(default_factory=dict)  # tier name ("G1", "G2", "G3") -> blocks
    prefill_tokens_per_s: float = 0.0  # 0: unknown, default_prefill_tokens_per_s * tp_speedup is used
    decode_step_s: float = 0.0  # one decode iteration at the current batch; 0: unknown
    tensor_parallel_size: int = 1  # processes (devices) the worker's model is split over

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    @property
    def can_prefill(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")

    @classmethod
    def from_report(cls, worker_id: str, role: str, report: Mapping[str, Any]) -> Candidate:
        """From a metadata-store load dict; missing keys read as unknown / empty."""
        return cls(
            worker_id=worker_id,
            role=role,
            queue_tokens=int(report.get("queue_tokens", 0)),
            running_seqs=int(report.get("running_seqs", 0)),
            free_blocks={str(k): int(v) for k, v in dict(report.get("free_blocks", {})).items()},
            prefill_tokens_per_s=float(report.get("prefill_tokens_per_s", 0.0)),
            decode_step_s=float(report.get("decode_step_s", 0.0)),
            tensor_parallel_size=int(report.get("tensor_parallel_size", 1)),
        )


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    num_prompt_tokens: int
    block_hashes: Sequence[bytes] = ()  # the prompt's full-block hash chain
    cached_blocks: Mapping[str, int] = field(default_factory=dict)  # worker -> leading blocks it holds
    disaggregation: str = "auto"  # "auto" | "always" | "never"


@dataclass(frozen=True, slots=True)
class CostParams:
    kv_bytes_per_token: int  # all layers, as the pool stores them (KVLayout.block_bytes / B): K and V,
    # 2 * layers * kv_heads * head_dim * dtype bytes, MLA's latent, layers * (kv_lora_rank +
    # qk_rope_head_dim) * dtype bytes, or a quantized cache's codes and scales
    block_size: int = 16
    default_prefill_tokens_per_s: float = 1000.0
    overlap_fraction: float = 0.0  # of min(prefill, transfer) hidden by layer-wise streaming
    handoff_overhead_s: float = 0.0  # reserve RPC + transfer setup, paid once per disaggregated request
    room_tiers: tuple[str, ...] = ("G1", "G2")  # tiers a reservation may allocate in
    tp_scaling: float = 0.8  # prefill speed each extra tensor-parallel rank adds, in ranks
    num_kv_heads: int = 0  # the model's; 0: unknown (every rank counts as a stream)


@dataclass(frozen=True, slots=True)
class Quote:
    """The price of one route, with its terms kept for the decision's reason and for tests."""

    prefill_worker: str | None  # None: the decode worker prefills itself
    decode_worker: str
    ttft_s: float
    queue_s: float
    prefill_s: float
    transfer_s: float
    overlap_s: float
    admission_s: float
    cached_tokens: int  # reused at the worker that prefills
    kv_bytes: int  # moved between workers
    kv_bytes_per_rank: int = 0  # of those, what one (sending rank, receiving rank) stream carries

    @property
    def disaggregated(self) -> bool:
        return self.prefill_worker is not None


def cached_tokens(req: RoutingRequest, worker_id: str, params: CostParams) -> int:
    """Prompt tokens whose KV ``worker_id`` holds, capped so one token is always computed."""
    blocks = min(req.cached_blocks.get(worker_id, 0), len(req.block_hashes))
    return max(0, min(blocks * params.block_size, req.num_prompt_tokens - 1))


def blocks_needed(req: RoutingRequest, d: Candidate, params: CostParams) -> int:
    """New blocks ``d`` must reserve for the prompt (its own cached prefix is reused)."""
    total = -(-req.num_prompt_tokens // params.block_size)
    held = min(req.cached_blocks.get(d.worker_id, 0), len(req.block_hashes))
    return max(0, total - held)


def has_kv_room(req: RoutingRequest, d: Candidate, params: CostParams) -> bool:
    free = sum(d.free_blocks.get(t, 0) for t in params.room_tiers)
    return free >= blocks_needed(req, d, params)


def tp_speedup(tp: int, params: CostParams) -> float:
    """How many times one rank's prefill speed a worker of ``tp`` ranks has."""
    return 1.0 + (max(1, tp) - 1) * params.tp_scaling


def kv_streams(p: Candidate, d: Candidate, params: CostParams) -> int:
    """Parallel KV streams of a handoff from ``p`` to ``d``: each rank writes its own heads."""

    def kv_ranks(w: Candidate) -> int:
        tp = max(1, w.tensor_parallel_size)
        return min(tp, params.num_kv_heads) if params.num_kv_heads > 0 else tp

    return max(1, min(kv_ranks(p), kv_ranks(d)))


def _rate(w: Candidate, params: CostParams) -> float:
    if w.prefill_tokens_per_s > 0:
        return w.prefill_tokens_per_s
    return params.default_prefill_tokens_per_s * tp_speedup(w.tensor_parallel_size, params)


def price_colocated(req: RoutingRequest, d: Candidate, params: CostParams) -> Quote:
    cached = cached_tokens(req, d.worker_id, params)
    rate = _rate(d, params)
    queue_s = d.queue_tokens / rate
    prefill_s = (req.num_prompt_tokens - cached) / rate
    return Quote(None, d.worker_id, queue_s + prefill_s, queue_s, prefill_s, 0.0, 0.0, 0.0, cached, 0)


def price_disaggregated(
    req: RoutingRequest, p: Candidate, d: Candidate, topology: Topology, params: CostParams
) -> Quote:
    cached = cached_tokens(req, p.worker_id, params)
    rate = _rate(p, params)
    queue_s = p.queue_tokens / rate
    prefill_s = (req.num_prompt_tokens - cached) / rate
    # The decode worker reuses its own cached prefix on reserve, so only what it lacks moves.
    d_cached = min(req.cached_blocks.get(d.worker_id, 0), len(req.block_hashes)) * params.block_size
    kv_bytes = max(0, req.num_prompt_tokens - d_cached) * params.kv_bytes_per_token
    per_rank = -(-kv_bytes // kv_streams(p, d, params))  # the streams move their heads side by side
    transfer_s = params.handoff_overhead_s + topology.transfer_time_s(per_rank, p.worker_id, d.worker_id)
    overlap_s = params.overlap_fraction * min(prefill_s, transfer_s)
    admission_s = d.decode_step_s if d.running_seqs > 0 else 0.0
    ttft = queue_s + prefill_s + transfer_s - overlap_s + admission_s
    return Quote(
        p.worker_id,
        d.worker_id,
        ttft,
        queue_s,
        prefill_s,
        transfer_s,
        overlap_s,
        admission_s,
        cached,
        kv_bytes,
        per_rank,
    )
