"""What a worker reports about itself to the router, beyond the handoff: its tier occupancy.

Plain data over Ray calls (no torch, no Ray): the router's tier gauges read these.
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
