"""Scheduler: token budget, chunked prefill, decode priority, output order, preemption, abort.

A fake engine loop drives whole request lifetimes: the "model" samples token 7 for every entry
whose step completes, and the request finishes (LENGTH) after ``max_tokens`` outputs.
"""

from __future__ import annotations

import random

import pytest

from engine.block_hash import BlockHash, hash_blocks
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import FinishReason, Sequence, SequenceStatus

pytestmark = pytest.mark.unit

FP = "test-model"
TOKEN = 7


def make(
    num_blocks: int = 64, block_size: int = 4, **cfg
) -> tuple[Scheduler, BlockManager, list[tuple[BlockHash, int]]]:
    evicted: list[tuple[BlockHash, int]] = []
    bm = BlockManager(num_blocks, block_size, FP, on_evict=lambda h, b: evicted.append((h, b)))
    cfg.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**cfg), bm), bm, evicted


def seq(rid: str, n: int, max_tokens: int = 4, base: int = 0) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens))


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine iteration with a fake model."""
    out = sched.schedule()
    check_invariants(sched, out)
    sched.update(out)
    for entry in out.scheduled:
        if entry.completes:
            entry.seq.output_token_ids.append(TOKEN)
            if len(entry.seq.output_token_ids) >= entry.seq.params.max_tokens:
                sched.finish(entry.seq, FinishReason.LENGTH)
    return out


def run_all(sched: Scheduler, max_steps: int = 1000) -> int:
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg, bs = sched.config, sched.block_manager.block_size
    assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert sched.num_running <= cfg.max_num_seqs
    sizes = [e.num_new_tokens for e in out.scheduled]
    assert sizes == sorted(sizes, key=lambda n: n == 1)  # prefills (> 1) before decodes
    for e in out.scheduled:
        s = e.seq
        assert s.status is SequenceStatus.RUNNING
        assert len(s.block_table) * bs >= s.num_computed_tokens + e.num_new_tokens
        assert s.num_computed_tokens + e.num_new_tokens <= s.num_tokens


def summary(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled]


def test_chunked_prefill_splits_prompt_by_budget() -> None:
    sched, bm, _ = make(max_num_batched_tokens=8)
    a = seq("a", 20, max_tokens=3)
    sched.add(a)
    outs = [step(sched) for _ in range(5)]
    assert [summary(o) for o in outs] == [[("a", 8)], [("a", 8)], [("a", 4)], [("a", 1)], [("a", 1)]]
    assert [o.scheduled[0].completes for o in outs] == [False, False, True, True, True]
    assert a.is_finished and a.finish_reason is FinishReason.LENGTH
    assert a.output_token_ids == [TOKEN] * 3
    assert not sched.has_unfinished() and bm.num_used_blocks == 0


def test_decodes_first_then_prefill_fills_budget_and_output_is_prefill_first() -> None:
    sched, bm, _ = make(max_num_batched_tokens=8)
    a, b = seq("a", 4, max_tokens=5), seq("b", 20, max_tokens=2, base=100)
    sched.add(a)
    assert summary(step(sched)) == [("a", 4)]
    sched.add(b)
    out = step(sched)
    # a's decode is served before b's prefill, which takes what is left of the budget
    assert summary(out) == [("b", 7), ("a", 1)]
    assert [e.completes for e in out.scheduled] == [False, True]
    assert summary(step(sched)) == [("b", 7), ("a", 1)]
    assert summary(step(sched)) == [("b", 6), ("a", 1)]  # b's last chunk completes
    assert summary(step(sched)) == [("a", 1), ("b", 1)]
    run_all(sched)
    assert a.output_token_ids == [TOKEN] * 5 and b.output_token_ids == [TOKEN] * 2
    assert bm.num_used_blocks == 0


def test_without_chunked_prefill_prompt_is_whole_or_waits() -> None:
    sched, _, _ = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    a, b, c = seq("a", 10), seq("b", 10, base=50), seq("c", 3, base=90)
    for s in (a, b, c):
        sched.add(s)
    # b does not fit the 6 tokens left and FCFS keeps c behind it
    assert summary(step(sched)) == [("a", 10)]
    assert summary(step(sched)) == [("b", 10), ("c", 3), ("a", 1)]
    assert summary(step(sched)) == [("a", 1), ("b", 1), ("c", 1)]
    with pytest.raises(ValueError):
        SchedulerConfig(max_num_batched_tokens=8, max_model_len=16, enable_chunked_prefill=False)


def test_max_num_seqs_respected() -> None:
    sched, bm, _ = make(max_num_seqs=2)
    seqs = [seq(f"r{i}", 3, max_tokens=2, base=10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert summary(step(sched)) == [("r0", 3), ("r1", 3)]
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert summary(step(sched)) == [("r0", 1), ("r1", 1)]  # both finish
    assert summary(step(sched)) == [("r2", 3)]
    step(sched)
    assert not sched.has_unfinished() and bm.num_used_blocks == 0


def test_prefix_reused_across_requests() -> None:
    sched, bm, _ = make(max_num_batched_tokens=64)
    a = seq("a", 10, max_tokens=1)
    sched.add(a)
    step(sched)
    assert a.is_finished
    b = Sequence("b", list(range(10)) + [42], SamplingParams(max_tokens=1))
    sched.add(b)
    out = step(sched)
    assert summary(out) == [("b", 3)]  # 8 tokens (2 full blocks) from the cache
    assert b.num_cached_tokens == 8 and out.scheduled[0].completes
    assert bm.num_used_blocks == 0


def test_preemption_when_blocks_run_out() -> None:
    sched, bm, evicted = make(num_blocks=4, block_size=4)
    a, b = seq("a", 7, max_tokens=4, base=100), seq("b", 7, max_tokens=4, base=200)
    sched.add(a)
    sched.add(b)
    assert summary(step(sched)) == [("a", 7), ("b", 7)]
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    assert summary(step(sched)) == [("a", 1), ("b", 1)]  # positions 7: no new block yet

    # a needs a 3rd block for position 8; none is free: b (the newest) is preempted
    out = step(sched)
    assert summary(out) == [("a", 1)]
    assert out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and b.num_preemptions == 1
    assert b.output_token_ids == [TOKEN, TOKEN]  # kept, recomputed as prompt later
    assert list(sched.waiting) == [b] and sched.running == [a]
    hb = hash_blocks(b.all_token_ids, 4, FP)
    assert a.block_table == [0, 1, 3] and evicted == [(hb[1], 3)]  # b's tail block evicted first

    assert summary(step(sched)) == [("a", 1)]  # a finishes; b's turn comes only now
    assert a.is_finished and a.output_token_ids == [TOKEN] * 4
    out = step(sched)
    # b: 9 tokens; block 2 (its first block) is still cached, the rest is recomputed
    assert summary(out) == [("b", 5)] and b.num_cached_tokens == 4
    assert b.block_table == [2, 3, 1]
    run_all(sched)
    assert b.is_finished and b.output_token_ids == [TOKEN] * 4 and b.num_preemptions == 1
    assert bm.num_used_blocks == 0


def test_running_seq_preempts_itself_when_it_is_the_newest() -> None:
    sched, bm, _ = make(num_blocks=3, block_size=2)
    a, b = seq("a", 2, max_tokens=4, base=100), seq("b", 2, max_tokens=4, base=200)
    sched.add(a)
    sched.add(b)
    assert summary(step(sched)) == [("a", 2), ("b", 2)]
    assert a.block_table == [0] and b.block_table == [1]
    out = step(sched)  # a takes the last block; b needs one more and is the newest
    assert summary(out) == [("a", 1)] and out.preempted == [b]
    assert b.num_preemptions == 1 and sched.waiting[0] is b and b.block_table == []
    assert a.block_table == [0, 2]
    run_all(sched)
    assert a.output_token_ids == [TOKEN] * 4 and b.output_token_ids == [TOKEN] * 4
    assert bm.num_used_blocks == 0


def test_max_seq_len_is_the_pool_or_the_model_limit() -> None:
    assert make(num_blocks=4, block_size=4, max_model_len=32)[0].max_seq_len == 16
    assert make(num_blocks=64, block_size=4, max_model_len=32)[0].max_seq_len == 32


def test_abort_waiting_and_running() -> None:
    sched, bm, _ = make(max_num_seqs=1)
    a, b = seq("a", 5, max_tokens=10), seq("b", 5, base=50)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert sched.abort("b") is b
    assert b.is_finished and b.finish_reason is FinishReason.ABORT and sched.num_waiting == 0
    assert sched.abort("nope") is None
    assert bm.num_used_blocks == 2
    out = sched.schedule()
    assert sched.abort("a") is a  # between schedule() and update(): update skips it
    sched.update(out)
    assert a.is_finished and a.finish_reason is FinishReason.ABORT and a.block_table == []
    assert sched.abort("a") is None
    assert not sched.has_unfinished() and bm.num_used_blocks == 0


def test_add_refuses_too_long_and_duplicates() -> None:
    sched, _, _ = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError):
        sched.add(seq("long", 33))
    with pytest.raises(ValueError):
        sched.add(seq("nofit", 17))  # 5 blocks of a 4-block pool
    with pytest.raises(ValueError):
        sched.add(Sequence("empty", []))
    sched.add(seq("a", 3))
    with pytest.raises(ValueError):
        sched.add(seq("a", 3))
    assert sched.num_waiting == 1


def test_many_requests_run_to_completion_under_pressure() -> None:
    rng = random.Random(0)
    sched, bm, _ = make(num_blocks=12, block_size=4, max_num_batched_tokens=16, max_num_seqs=6)
    shared = list(range(1000, 1012))  # a common 3-block system prompt for half of them
    seqs = []
    for i in range(20):
        tail = [rng.randrange(50_000) for _ in range(rng.randrange(1, 20))]
        prompt = (shared if i % 2 else []) + tail
        seqs.append(Sequence(f"r{i}", prompt, SamplingParams(max_tokens=rng.randrange(1, 12))))
    for s in seqs[:10]:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        if steps == 5:
            for s in seqs[10:]:
                sched.add(s)
        assert steps < 1000, "no progress"
    for s in seqs:
        assert s.finish_reason is FinishReason.LENGTH
        assert s.output_token_ids == [TOKEN] * s.params.max_tokens
    assert steps == 53
    assert sum(s.num_preemptions for s in seqs) == 7  # the pool is small enough to force it
    assert bm.num_used_blocks == 0


def test_add_running_adopts_received_kv() -> None:
    sched, bm, _ = make(max_num_batched_tokens=16)
    a = seq("a", 3, max_tokens=2)
    sched.add(a)
    step(sched)
    # A prompt whose KV arrived from elsewhere: blocks reserved and filled, first token sampled.
    r = seq("r", 9, max_tokens=3, base=500)
    assert bm.allocate_prompt(r) and bm.append_slots(r, 9)
    r.num_computed_tokens = 9
    bm.mark_computed(r, 9)
    r.output_token_ids.append(TOKEN)
    sched.add_running(r)
    assert r.block_table == [1, 2, 3] and sched.running == [a, r]
    assert summary(step(sched)) == [("a", 1), ("r", 1)]
    run_all(sched)
    assert r.output_token_ids == [TOKEN] * 3 and bm.num_used_blocks == 0
    with pytest.raises(ValueError):
        sched.add_running(Sequence("bad", [1, 2, 3], num_computed_tokens=3))
