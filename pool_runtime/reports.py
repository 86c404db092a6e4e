"""What a worker reports about itself to the router: its load, and the occupancy of its tiers.

Plain data over Ray calls (no torch, no Ray). :class:`WorkerLoad` is the one load type of the
system: a worker's ``load()`` returns it, the router's routing glue reads it (router/routing.py
turns it into the cost model's view), and GetServerInfo reports it (``node`` filled in by the
backend, which knows where each worker runs). :class:`TierUsage` feeds the router's tier gauges.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TierUsage:
    """One tier of one worker, as the tier gauges report it."""

    worker_id: str
    role: str
    tier: str  # "G1" | "G2" | "G3"
    used_blocks: int
    occupancy: float  # 0..1 of the tier's capacity (G3: bytes)


@dataclass(slots=True)
class WorkerLoad:
    """A worker's load report, for the router: queue, running batch, blocks."""

    worker_id: str
    role: str  # "prefill" | "decode" | "both" (one in-process engine does both)
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
    # Where it runs: the node's name as the topology keys it (deploy/pools.py); "local" in-process
    node: str = "local"
    tensor_parallel_size: int = 1  # ranks (processes, devices) its model is split over
    # Measured speed (engine/step_cost.py), 0 until measured: a step with no prefill chunk, and the
    # prefill tokens per second of steps that carried chunks (moving averages).
    decode_step_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
