"""Continuous batching in tokens: which sequences run in the next forward pass, and how many tokens each.

One token budget per step (vLLM v1 style), no separate prefill and decode phases: every sequence
simply asks for ``num_tokens - num_computed_tokens`` tokens. A decode asks for 1, a new prompt for
all of it; chunked prefill and prefix caching fall out of that.

One step of ``schedule()``:

1. Running sequences, in admission order, each get ``min(wanted, budget left)`` tokens (whole or
   nothing when chunked prefill is off). When the block manager is short, the most recently
   admitted running sequence is preempted (recompute: its blocks are freed, it goes back to the
   FRONT of the waiting queue with ``num_computed_tokens = 0``; its outputs stay and are recomputed
   as if they were prompt), until the blocks fit or the sequence preempted itself.
2. If nothing was preempted, waiting sequences are admitted strictly FCFS (never skipping one that
   does not fit) while budget, ``max_num_seqs`` and blocks allow: prefix hits first
   (``allocate_prompt``), then slots for the chunk (``append_slots``).

Every scheduled token has its KV slot allocated when ``schedule()`` returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # the token budget per step
    enable_chunked_prefill: bool = True  # if False, a prompt is scheduled whole or not at all
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.max_model_len <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be > 0")
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


class Scheduler:
    """Owns the waiting queue and the running list of one engine.

    Engine loop: ``out = schedule()`` → forward pass on ``out.scheduled`` → ``update(out)`` →
    sample for each entry that ``completes`` and append the token → ``finish(seq, reason)`` on stop.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
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

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # 1. Running sequences, oldest first. Preemption pops from the end of the list, i.e. only
        # sequences not yet scheduled this step (or the current one itself).
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._chunk(seq.num_tokens - seq.num_computed_tokens, budget)
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

        # 2. Waiting sequences, strictly FCFS. After a preemption memory is short: admit nothing,
        # so a preempted sequence is never overtaken.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.prefix_hit_tokens(seq)
            num_new = self._chunk(seq.num_tokens - cached, budget)
            if num_new <= 0 or not bm.can_allocate(seq, num_new):
                break
            if not bm.allocate_prompt(seq) or not bm.append_slots(seq, num_new):
                raise RuntimeError(f"{seq.request_id}: block manager refused what can_allocate allowed")
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

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
