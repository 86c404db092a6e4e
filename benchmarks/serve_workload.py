"""The workload of ``tandem bench serve``: arrival times, prompt/output lengths, prompts (pure).

A length distribution is written ``fixed:N``, ``uniform:LO:HI`` (inclusive) or ``normal:MEAN:STD``
(rounded, clipped to >= 1). Arrivals are ``fixed`` (every 1/rate s) or ``poisson`` (exponential gaps
with mean 1/rate); rate ``inf`` sends everything at t = 0. The shared-prefix workload gives every
request one of ``num_prefixes`` common prefixes of ``prefix_len`` tokens followed by its own tokens,
so a prefix cache (or a cache-aware router) has something to find. Prompts are token ids drawn from
the vocabulary minus the EOS ids, so their lengths are exact. Everything is seeded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LengthDist:
    kind: str  # "fixed" | "uniform" | "normal"
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))


def parse_length(spec: str) -> LengthDist:
    """``fixed:N`` | ``uniform:LO:HI`` | ``normal:MEAN:STD`` (a bare ``N`` means ``fixed:N``)."""
    parts = spec.split(":")
    try:
        if len(parts) == 1:
            parts = ["fixed", parts[0]]
        kind, nums = parts[0], [float(x) for x in parts[1:]]
    except ValueError:
        raise ValueError(f"bad length distribution {spec!r}") from None
    if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
        return LengthDist("fixed", nums[0])
    if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        return LengthDist("uniform", nums[0], nums[1])
    if kind == "normal" and len(nums) == 2 and nums[0] >= 1 and nums[1] >= 0:
        return LengthDist("normal", nums[0], nums[1])
    raise ValueError(
        f"bad length distribution {spec!r}: use fixed:N, uniform:LO:HI or normal:MEAN:STD (>= 1)"
    )


def arrival_times(n: int, rate: float, process: str, rng: random.Random) -> list[float]:
    """Send offsets in seconds from the start, non-decreasing; ``rate`` in requests per second."""
    if process not in ("fixed", "poisson"):
        raise ValueError(f"arrival process must be 'fixed' or 'poisson', got {process!r}")
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += 1.0 / rate if process == "fixed" else rng.expovariate(rate)
    return times


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    send_at: float  # seconds after the start
    prompt_token_ids: list[int]
    max_tokens: int
    prefix_id: int | None = None  # which shared prefix it starts with


def make_workload(
    n: int,
    *,
    vocab_size: int,
    prompt_len: LengthDist,
    output_len: LengthDist,
    rate: float = math.inf,
    arrival: str = "poisson",
    shared_prefix_len: int = 0,
    num_prefixes: int = 1,
    exclude_ids: Sequence[int] = (),
    seed: int = 0,
) -> list[BenchRequest]:
    rng = random.Random(seed)
    banned = set(exclude_ids)
    alphabet = [t for t in range(vocab_size) if t not in banned]
    draw = lambda k: [rng.choice(alphabet) for _ in range(k)]  # noqa: E731
    prefixes = [draw(shared_prefix_len) for _ in range(num_prefixes)] if shared_prefix_len > 0 else []
    times = arrival_times(n, rate, arrival, rng)
    out = []
    for i, t in enumerate(times):
        prefix_id = i % len(prefixes) if prefixes else None
        prefix = prefixes[prefix_id] if prefix_id is not None else []
        out.append(
            BenchRequest(i, t, prefix + draw(prompt_len.sample(rng)), output_len.sample(rng), prefix_id)
        )
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
