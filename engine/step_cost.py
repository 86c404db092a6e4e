"""What a step costs: a linear model of a forward pass's time, fitted online from measured steps.

The scheduler bounds an iteration by *time*, not only by a token count (engine/scheduler.py): a step
that carries new prompts should cost about what a decode step costs plus a bounded prefill slice,
so that running streams never wait behind a long prompt. That needs a prediction of a step's time
from what it holds, before it runs. On every machine measured so far a step's time is close to
linear in four counts (:class:`StepShape`)::

    t  ≈  c0                     fixed: launches, Python per layer, reading every weight once
        + c1 · tokens            the projections' work per token (compute-bound once a step is big)
        + c2 · attention         context tokens attended, summed over the step's query tokens
        + c3 · sampled rows      LM head and sampler, one row per sequence that completes

:class:`StepCostModel` fits ``c`` by recursive least squares with exponential forgetting (about the
last ``window`` steps count), so it follows the machine as its load changes. Plain Python on
numbers: no torch, no numpy (the control plane imports neither). Until it has seen enough steps of
enough variety, or when the fit is not physical (a negative slope), it says so (``ready`` False) and
the scheduler falls back to its token budget alone.

The same figures are what a worker reports as its measured speed (decode step time, prefill
tokens/s): :meth:`StepCostModel.decode_step_s`, :meth:`StepCostModel.prefill_tokens_per_s`.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_FEATURES = 4
_MAX_TRACE = 1e7  # P's trace past which forgetting pauses (see record)


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one forward pass holds."""

    tokens: int  # query tokens in the batch (prefill chunks + one per decode)
    attention: int  # sum over query tokens of the context each attends to
    sampled: int  # rows whose logits are computed and sampled

    def features(self) -> tuple[float, ...]:
        return (1.0, float(self.tokens), float(self.attention), float(self.sampled))

    def plus_prefill(self, start: int, n: int, completes: bool) -> StepShape:
        """This shape with a prefill chunk of ``n`` tokens at positions ``start .. start + n - 1``."""
        # token i of the chunk attends to start + i + 1 positions (itself included)
        attn = n * start + n * (n + 1) // 2
        return StepShape(self.tokens + n, self.attention + attn, self.sampled + int(completes))


EMPTY = StepShape(0, 0, 0)


class StepCostModel:
    """Online least squares of step time on :meth:`StepShape.features`.

    ``window``: steps of memory (forgetting factor ``1 - 1/window``). ``min_steps``: how many
    measurements before a prediction is trusted, of which at least ``min_prefill_steps`` must have
    carried a prefill chunk (a model fitted on decode steps alone cannot price prompt tokens)."""

    def __init__(self, window: int = 256, min_steps: int = 8, min_prefill_steps: int = 2) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self.forget = 1.0 - 1.0 / window
        self.min_steps = min_steps
        self.min_prefill_steps = min_prefill_steps
        self.num_steps = 0
        self.num_prefill_steps = 0
        # P: the inverse of the (forgetting) information matrix, started large (weak prior at 0)
        self._p = [[1e6 if i == j else 0.0 for j in range(NUM_FEATURES)] for i in range(NUM_FEATURES)]
        self._c = [0.0] * NUM_FEATURES
        self._decode_ewma: float | None = None  # seconds, steps with no prefill chunk
        self._prefill_rate: float | None = None  # prefill tokens/s, steps with a chunk

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(self._c)

    @property
    def ready(self) -> bool:
        """Enough measured steps, and a physical fit where the scheduler uses it: a token and an
        attended position cost time, never save it. (The fixed cost and the per-sampled-row cost are
        nearly collinear in a server's steps — every decode samples a row — so only their sum over
        the steps seen is pinned down; their split may be anything, and is not checked.)"""
        return (
            self.num_steps >= self.min_steps
            and self.num_prefill_steps >= self.min_prefill_steps
            and self._c[1] > 0.0
            and self._c[2] >= 0.0
        )

    def record(self, shape: StepShape, seconds: float, prefill_tokens: int = 0) -> None:
        """One measured step (``prefill_tokens``: the tokens of its chunks with more than one)."""
        if seconds <= 0.0 or shape.tokens <= 0:
            return
        x = shape.features()
        p, c, lam = self._p, self._c, self.forget
        px = [sum(p[i][j] * x[j] for j in range(NUM_FEATURES)) for i in range(NUM_FEATURES)]
        denom = lam + sum(x[i] * px[i] for i in range(NUM_FEATURES))
        gain = [v / denom for v in px]
        err = seconds - sum(c[i] * x[i] for i in range(NUM_FEATURES))
        for i in range(NUM_FEATURES):
            c[i] += gain[i] * err
        xp = [sum(x[i] * p[i][j] for i in range(NUM_FEATURES)) for j in range(NUM_FEATURES)]
        # forget only while P is bounded: in a direction the steps never vary (collinear features),
        # dividing by lam every step would grow P without end (RLS "windup") and the fit would jump
        forget = lam if sum(p[i][i] for i in range(NUM_FEATURES)) < _MAX_TRACE else 1.0
        for i in range(NUM_FEATURES):
            for j in range(NUM_FEATURES):
                p[i][j] = (p[i][j] - gain[i] * xp[j]) / forget
        self.num_steps += 1
        if prefill_tokens:
            self.num_prefill_steps += 1
            rate = prefill_tokens / seconds
            self._prefill_rate = rate if self._prefill_rate is None else 0.9 * self._prefill_rate + 0.1 * rate
        else:
            d = self._decode_ewma
            self._decode_ewma = seconds if d is None else 0.9 * d + 0.1 * seconds

    def predict(self, shape: StepShape) -> float:
        """Predicted seconds for a step of this shape (meaningful only when ``ready``)."""
        return sum(c * f for c, f in zip(self._c, shape.features(), strict=True))

    def prefill_tokens_within(self, base: StepShape, start: int, wanted: int, budget_s: float) -> int:
        """The most tokens (<= ``wanted``) of a chunk starting at position ``start`` that can join a
        step already holding ``base`` while the step's predicted time stays within ``budget_s``."""
        if wanted <= 0 or self.predict(base.plus_prefill(start, 1, wanted == 1)) > budget_s:
            return 0
        lo, hi = 1, wanted  # the prediction grows with n: binary search the largest that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(base.plus_prefill(start, mid, mid == wanted)) <= budget_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def decode_step_s(self) -> float | None:
        """Measured time of a step with no prefill chunk (moving average); None before one."""
        return self._decode_ewma

    def prefill_tokens_per_s(self) -> float | None:
        """Measured prefill throughput of steps that carried chunks (moving average); None before one."""
        return self._prefill_rate
