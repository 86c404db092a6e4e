"""The tier store's counters and the plain snapshot it hands out (OpenTelemetry wiring lives elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TierCounters:
    """Mutable counters, updated under the tier store's lock."""

    hits: dict[str, int] = field(default_factory=lambda: {"g2": 0, "g3": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"g2": 0, "g3": 0})
    bytes_offloaded: int = 0  # G1 -> G2
    bytes_spilled: int = 0  # G2 -> G3
    bytes_onboarded: dict[str, int] = field(default_factory=lambda: {"g2": 0, "g3": 0})  # -> G1
    dropped: int = 0  # blocks leaving G2 without a G3 copy
    onboard_failures: int = 0  # G3 reads that found a missing or corrupt file


@dataclass(frozen=True, slots=True)
class TierMetrics:
    """One snapshot. Occupancy in blocks (G2) and bytes (G3)."""

    g2_used_blocks: int
    g2_capacity_blocks: int
    g2_reserved_blocks: int
    g3_blocks: int
    g3_used_bytes: int
    g3_capacity_bytes: int
    hits: dict[str, int]
    misses: dict[str, int]
    bytes_offloaded: int
    bytes_spilled: int
    bytes_onboarded: dict[str, int]
    dropped: int
    onboard_failures: int
    g3_corrupt_dropped: int

    @property
    def g2_occupancy(self) -> float:
        return self.g2_used_blocks / self.g2_capacity_blocks if self.g2_capacity_blocks else 0.0

    @property
    def g3_occupancy(self) -> float:
        return self.g3_used_bytes / self.g3_capacity_bytes if self.g3_capacity_bytes else 0.0
