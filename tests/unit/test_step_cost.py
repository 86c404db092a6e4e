"""The step cost model (engine/step_cost.py) and the time-bounded schedule it drives (engine/scheduler.py).

The "machine" here is a known linear cost, so the fit, its predictions and the scheduler's chunk
sizes can be checked exactly (to rounding), not by timing anything."""

from __future__ import annotations

import random

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import FinishReason, Sequence
from engine.step_cost import EMPTY, StepCostModel, StepShape

pytestmark = pytest.mark.unit

# a machine: 20 ms fixed, 0.5 ms per token, 1 us per attended position, 2 ms per sampled row
TRUE = (0.020, 0.0005, 0.000001, 0.002)


def cost(shape: StepShape) -> float:
    return sum(c * f for c, f in zip(TRUE, shape.features(), strict=True))


def trained(steps: int = 200, seed: int = 0) -> StepCostModel:
    rng = random.Random(seed)
    model = StepCostModel()
    for _ in range(steps):
        shape = EMPTY
        for _ in range(rng.randrange(1, 16)):  # decodes at assorted contexts
            shape = shape.plus_prefill(rng.randrange(1, 2000), 1, True)
        prefill = 0
        if rng.random() < 0.5:
            prefill = rng.randrange(2, 300)
            shape = shape.plus_prefill(rng.randrange(0, 500), prefill, rng.random() < 0.5)
        model.record(shape, cost(shape), prefill)
    return model


def test_shape_counts_tokens_attention_and_sampled_rows() -> None:
    s = EMPTY.plus_prefill(10, 1, True)  # a decode at position 10 attends to 11 positions
    assert (s.tokens, s.attention, s.sampled) == (1, 11, 1)
    s = s.plus_prefill(0, 4, False)  # a chunk of 4 from position 0: 1 + 2 + 3 + 4
    assert (s.tokens, s.attention, s.sampled) == (5, 21, 1)


def test_the_fit_recovers_a_linear_machine() -> None:
    model = trained()
    assert model.ready
    for got, want in zip(model.coefficients, TRUE, strict=True):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-9)
    probe = EMPTY.plus_prefill(100, 1, True).plus_prefill(50, 64, True)
    assert model.predict(probe) == pytest.approx(cost(probe), rel=1e-3)


def test_not_ready_until_it_has_seen_prefill_steps() -> None:
    model = StepCostModel(min_steps=4, min_prefill_steps=2)
    decode = EMPTY.plus_prefill(10, 1, True)
    for _ in range(10):
        model.record(decode, cost(decode))
    assert not model.ready  # it has never priced a prompt token
    for n in (32, 64):
        shape = decode.plus_prefill(0, n, True)
        model.record(shape, cost(shape), n)
    assert model.decode_step_s() == pytest.approx(cost(decode))
    assert model.prefill_tokens_per_s() is not None


def test_prefill_tokens_within_is_the_largest_chunk_that_fits() -> None:
    model = trained()
    base = EMPTY
    for pos in range(16):
        base = base.plus_prefill(200 + pos, 1, True)
    budget = cost(base) + 0.030
    n = model.prefill_tokens_within(base, 40, 500, budget)
    assert cost(base.plus_prefill(40, n, False)) <= budget * (1 + 1e-3)
    assert cost(base.plus_prefill(40, n + 1, False)) > budget * (1 - 1e-3)
    assert model.prefill_tokens_within(base, 40, 500, cost(base) - 0.001) == 0  # decodes alone are over
    assert model.prefill_tokens_within(base, 40, 5, 10.0) == 5  # all it wants


def _sched(model: StepCostModel | None, limit: float | None, **kw: int) -> Scheduler:
    bm = BlockManager(512, 16, "fp")
    cfg = SchedulerConfig(
        max_num_seqs=64, max_num_batched_tokens=512, max_model_len=2048, max_step_time_s=limit, **kw
    )
    return Scheduler(cfg, bm, model)


def _step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    s.update(out)
    for e in out.scheduled:
        if e.completes:
            e.seq.output_token_ids.append(7)
            if len(e.seq.output_token_ids) >= e.seq.params.max_tokens:
                s.finish(e.seq, FinishReason.LENGTH)
    return out


def _decoding(s: Scheduler, n: int) -> None:
    """``n`` running decodes (short prompts, long outputs)."""
    for i in range(n):
        s.add(Sequence(f"d{i}", list(range(8)), SamplingParams(max_tokens=10_000)))
    while any(q.num_computed_tokens < 8 for q in s.running) or s.waiting:
        _step(s)


def test_a_long_prompt_is_sliced_to_the_time_budget() -> None:
    model = trained()
    s = _sched(model, limit=0.080)
    _decoding(s, 16)
    s.add(Sequence("long", list(range(1000)), SamplingParams(max_tokens=1)))
    chunks = []
    while s.get("long") is not None:
        out = _step(s)
        assert sum(1 for e in out.scheduled if e.num_new_tokens == 1) >= 16  # every decode, every step
        mine = [e.num_new_tokens for e in out.scheduled if e.seq.request_id == "long"]
        # within the budget, unless the chunk is the floor that keeps a prompt moving
        assert cost(out.shape) <= 0.080 * (1 + 1e-3) or (len(mine) == 1 and mine[0] <= 16)
        chunks += mine
    assert sum(chunks) == 1000 and max(chunks) < 512  # sliced below the token budget


def test_without_a_target_the_token_budget_alone_applies() -> None:
    s = _sched(trained(), limit=None)
    _decoding(s, 16)
    s.add(Sequence("long", list(range(1000)), SamplingParams(max_tokens=1)))
    out = _step(s)
    assert [e.num_new_tokens for e in out.scheduled if e.seq.request_id == "long"] == [512 - 16]


def test_prompts_progress_when_the_decodes_alone_fill_the_budget() -> None:
    s = _sched(trained(), limit=0.001, min_prefill_tokens=24)  # below even a decode-only step
    _decoding(s, 4)
    s.add(Sequence("p", list(range(100)), SamplingParams(max_tokens=1)))
    out = _step(s)
    assert [e.num_new_tokens for e in out.scheduled if e.seq.request_id == "p"] == [24]


def test_an_untrained_model_leaves_the_token_budget_alone() -> None:
    s = _sched(StepCostModel(), limit=0.001)
    s.add(Sequence("p", list(range(100)), SamplingParams(max_tokens=1)))
    assert [e.num_new_tokens for e in _step(s).scheduled] == [100]


def test_server_like_steps_fit_and_stay_bounded() -> None:
    """A server's steps: every decode samples a row, so the fixed and per-row costs are collinear.
    After thousands of such steps the fit still predicts them, is ready, and has not wound up."""
    rng = random.Random(3)
    model = StepCostModel()
    for _ in range(5000):
        n = rng.randrange(12, 17)
        shape = EMPTY
        for _ in range(n):
            shape = shape.plus_prefill(rng.randrange(200, 600), 1, True)
        prefill = rng.choice([0, 0, 16, 24, 32])
        if prefill:
            shape = shape.plus_prefill(rng.randrange(0, 256), prefill, False)
        model.record(shape, cost(shape), prefill)
    assert model.ready and all(abs(c) < 10 for c in model.coefficients)
    probe = EMPTY
    for _ in range(16):
        probe = probe.plus_prefill(400, 1, True)
    probe = probe.plus_prefill(100, 24, False)
    assert model.predict(probe) == pytest.approx(cost(probe), rel=1e-3)
