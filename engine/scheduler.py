"""Continuous batching in tokens: which sequences run in the next forward pass, and how many tokens each.

One token budget per step (vLLM v1 style), no separate prefill and decode phases: every sequence
simply asks for ``num_tokens - num_computed_tokens`` tokens. A decode asks for 1, a new prompt for
all of it; chunked prefill and prefix caching fall out of that.

One step of ``schedule()``:

1. Running sequences, in admission order, each get ``min(wanted, budget left)`` tokens (whole or
   nothing when chunked prefill is off); a prefill chunk also no more than the time budget allows
   (below). When the block manager is short, the most recently
   admitted running sequence is preempted (recompute: its blocks are freed, it goes back to the
   FRONT of the waiting queue with ``num_computed_tokens = 0``; its outputs stay and are recomputed
   as if they were prompt), until the blocks fit or the sequence preempted itself.
2. If nothing was preempted, waiting sequences are admitted strictly FCFS (never skipping one that
   does not fit) while budget, ``max_num_seqs`` and blocks allow: prefix hits first
   (``allocate_prompt``), then slots for the chunk (``append_slots``).

Every scheduled token has its KV slot allocated when ``schedule()`` returns.

A bounded iteration (``max_step_time_s``): besides the token budget, a step is filled up to a
*time* budget predicted from measured steps (engine/step_cost.py). Every running decode is priced
into the step first; each prefill chunk then gets only the tokens that keep the step's predicted
time within ``max_step_time_s`` — but the first chunk of a step always gets at least
``min_prefill_tokens``, so prompts progress even when the decodes alone fill the budget. Until the
cost model has measured enough steps (or with no target) only the token budget applies::

    step time ▲
    target ---+--------------------------------------------------
              |            ░░░░░ prefill slice: what still fits
              |  ▓▓▓▓▓▓▓▓▓▓▓▓▓▓▓ the running decodes (priced first)
              +------------------------------------------------▶
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import FinishReason, Sequence, SequenceStatus
from engine.step_cost import EMPTY, StepCostModel, StepShape


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # the token budget per step
    enable_chunked_prefill: bool = True  # if False, a prompt is scheduled whole or not at all
    max_model_len: int = 4096
    # A step's predicted time stays within this (None: the token budget alone); see the docstring.
    max_step_time_s: float | None = None
    min_prefill_tokens: int = 16  # a step's first prefill chunk gets at least this many tokens

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.max_model_len <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be > 0")
        if self.max_step_time_s is not None and not self.max_step_time_s > 0:
            raise ValueError(f"max_step_time_s must be > 0, got {self.max_step_time_s}")
        if self.min_prefill_tokens <= 0:
            raise ValueError(f"min_prefill_tokens must be > 0, got {self.min_prefill_tokens}")
        # Without chunking a whole (possibly preempted, so prompt + outputs) sequence must fit in
        # one step, or it would wait forever.
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # Frozen at scheduling time, so ``completes`` stays true after update() advances
    # num_computed_tokens and after the engine appends the sampled token.
    start: int = field(init=False)
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.seq_len = self.seq.num_tokens

    @property
    def completes(self) -> bool:
        """This step computes the sequence's last token, so it yields logits to sample from."""
        return self.start + self.num_new_tokens == self.seq_len


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # entries with num_new_tokens > 1 first, then those with 1
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def shape(self) -> StepShape:
        """What the step holds, as the step cost model prices it."""
        shape = EMPTY
        for e in self.scheduled:
            shape = shape.plus_prefill(e.start, e.num_new_tokens, e.completes)
        return shape

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of the step's prefill chunks (entries computing more than one token)."""
        return sum(e.num_new_tokens for e in self.scheduled if e.num_new_tokens > 1)


class Scheduler:
    """Owns the waiting queue and the running list of one engine.

    Engine loop: ``out = schedule()`` → forward pass on ``out.scheduled`` → ``update(out)`` →
    sample for each entry that ``completes`` and append the token → ``finish(seq, reason)`` on stop.
    """

    def __init__(
        self, config: SchedulerConfig, block_manager: BlockManager, step_costs: StepCostModel | None = None
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.step_costs = step_costs  # prices prefill chunks against max_step_time_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self._seqs: dict[str, Sequence] = {}  # every unfinished sequence by request id

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def max_seq_len(self) -> int:
        """Longest sequence this engine can hold: the engine must stop generating (LENGTH) at it.

        A running sequence that outgrows the whole block pool would preempt everyone, then
        itself, forever.
        """
        bm = self.block_manager
        return min(self.config.max_model_len, bm.num_blocks * bm.block_size)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (FCFS). Raises ValueError if it can never be scheduled."""
        if seq.num_tokens == 0:
            raise ValueError(f"{seq.request_id}: empty prompt")
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"{seq.request_id}: {seq.num_tokens} tokens > max_model_len {self.config.max_model_len}"
            )
        bm = self.block_manager
        if -(-seq.num_tokens // bm.block_size) > bm.num_blocks:
            raise ValueError(f"{seq.request_id}: {seq.num_tokens} tokens exceed the {bm.num_blocks} blocks")
        if seq.request_id in self._seqs:
            raise ValueError(f"duplicate request id {seq.request_id}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._seqs[seq.request_id] = seq

    def add_running(self, seq: Sequence) -> None:
        """Adopt a sequence whose blocks and computed tokens are already set up by the caller
        (e.g. a decode worker that received its prompt's KV from a prefill worker). It joins the
        end of the running list, so it is the first to be preempted (and then recomputed here)."""
        bm = self.block_manager
        if seq.request_id in self._seqs:
            raise ValueError(f"duplicate request id {seq.request_id}")
        if len(seq.block_table) * bm.block_size < seq.num_computed_tokens:
            raise ValueError(f"{seq.request_id}: blocks do not cover its computed tokens")
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self._seqs[seq.request_id] = seq

    def abort(self, request_id: str) -> Sequence | None:
        """Free a waiting or running sequence's blocks and finish it with ABORT; None if unknown."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Free the sequence's blocks and drop it from the queues."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return  # already finished: finishing twice is a no-op
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.request_id]

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _chunk(self, wanted: int, budget: int) -> int:
        """Tokens to schedule out of ``wanted`` with ``budget`` left; 0 means not this step."""
        if self.config.enable_chunked_prefill:
            return min(wanted, budget)
        return wanted if wanted <= budget else 0

    def _timed(self, start: int, wanted: int, budget: int, step: _TimeBudget | None) -> int:
        """``_chunk`` for a prefill chunk from position ``start``, also within the time budget."""
        n = self._chunk(wanted, budget)
        if n <= 1 or step is None:
            return n
        fits = step.costs.prefill_tokens_within(step.shape, start, n, step.limit_s)
        if not step.has_prefill:  # the step's first chunk always makes progress
            fits = max(fits, min(n, self.config.min_prefill_tokens))
        if not self.config.enable_chunked_prefill and fits < n:
            return 0
        return fits

    def _time_budget(self) -> _TimeBudget | None:
        """The step's time budget with every running decode priced in, or None (token budget only)."""
        costs, limit = self.step_costs, self.config.max_step_time_s
        if costs is None or limit is None or not costs.ready:
            return None
        shape = EMPTY
        for seq in self.running:
            if seq.num_tokens - seq.num_computed_tokens == 1:
                shape = shape.plus_prefill(seq.num_computed_tokens, 1, True)
        return _TimeBudget(costs, limit, shape)

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        timed = self._time_budget()

        # 1. Running sequences, oldest first. Preemption pops from the end of the list, i.e. only
        # sequences not yet scheduled this step (or the current one itself).
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._timed(
                seq.num_computed_tokens, seq.num_tokens - seq.num_computed_tokens, budget, timed
            )
            if num_new <= 0:
                i += 1
                continue
            while not bm.append_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
                if timed is not None and num_new > 1:
                    timed.add(
                        seq.num_computed_tokens, num_new, num_new == seq.num_tokens - seq.num_computed_tokens
                    )

        # 2. Waiting sequences, strictly FCFS. After a preemption memory is short: admit nothing,
        # so a preempted sequence is never overtaken.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.prefix_hit_tokens(seq)
            num_new = self._timed(cached, seq.num_tokens - cached, budget, timed)
            if num_new <= 0 or not bm.can_allocate(seq, num_new):
                break
            if not bm.allocate_prompt(seq) or not bm.append_slots(seq, num_new):
                raise RuntimeError(f"{seq.request_id}: block manager refused what can_allocate allowed")
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            if timed is not None:
                timed.add(cached, num_new, num_new == seq.num_tokens - cached)

        # Prefill chunks first, then decodes: the model runner packs them in this order.
        ordered = [s for s in scheduled if s.num_new_tokens > 1] + [
            s for s in scheduled if s.num_new_tokens == 1
        ]
        return SchedulerOutput(
            scheduled=ordered,
            preempted=preempted,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
        )

    def update(self, out: SchedulerOutput) -> None:
        """After the forward pass: advance computed tokens and register newly full blocks."""
        for entry in out.scheduled:
            seq = entry.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted between schedule() and update(): its blocks are gone
            seq.num_computed_tokens = entry.start + entry.num_new_tokens
            self.block_manager.mark_computed(seq, seq.num_computed_tokens)


@dataclass(slots=True)
class _TimeBudget:
    """One ``schedule()``'s time budget: the step priced so far against the limit."""

    costs: StepCostModel
    limit_s: float
    shape: StepShape  # the running decodes, then each prefill chunk as it is scheduled
    has_prefill: bool = False

    def add(self, start: int, n: int, completes: bool) -> None:
        if n > 1:
            self.shape = self.shape.plus_prefill(start, n, completes)
            self.has_prefill = True
