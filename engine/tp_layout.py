"""How a worker splits a model across its ranks: which heads, KV heads, MLP columns, vocabulary rows
(tensor parallelism) and routed experts (expert parallelism) each rank owns (pure integers, no torch).

A worker of ``tp`` ranks splits the query heads evenly; KV heads follow the query heads they serve::

    num_heads = 8, num_kv_heads = 4, tp = 2          num_heads = 8, num_kv_heads = 2, tp = 4
    rank 0: q heads 0-3, kv heads 0-1                 rank 0: q 0-1, kv 0    rank 1: q 2-3, kv 0
    rank 1: q heads 4-7, kv heads 2-3                 rank 2: q 4-5, kv 1    rank 3: q 6-7, kv 1
                                                      (fewer KV heads than ranks: each is replicated
                                                       on tp / num_kv_heads ranks)

A query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)`` (GQA), so a rank's query heads
always find their KV heads on the same rank. The MLP's intermediate columns split evenly; the LM
head's vocabulary rows split in ``ceil(vocab / tp)`` pieces (the last one shorter).
"""

from __future__ import annotations

from dataclasses import dataclass


def check_tensor_parallel(
    tp: int, num_heads: int, num_kv_heads: int, intermediate_size: int | None = None
) -> None:
    """Raise ValueError (saying which number does not divide which) unless ``tp`` ranks can split
    this model: tp divides the query heads (and the MLP width), and the KV heads are either divided
    (tp divides them) or replicated (they divide tp)."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size {tp} and the model's {num_kv_heads} KV heads: one must divide the "
            "other (KV heads are split across ranks, or replicated when there are fewer than ranks)"
        )
    if intermediate_size is not None and intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} does not divide the model's intermediate_size {intermediate_size}"
        )


def q_heads(num_heads: int, tp: int, rank: int) -> range:
    """The query heads of ``rank``."""
    n = num_heads // tp
    return range(rank * n, (rank + 1) * n)


def kv_heads(num_kv_heads: int, tp: int, rank: int) -> range:
    """The KV heads of ``rank`` (a single replicated one when there are fewer KV heads than ranks)."""
    if num_kv_heads >= tp:
        n = num_kv_heads // tp
        return range(rank * n, (rank + 1) * n)
    head = rank * num_kv_heads // tp
    return range(head, head + 1)


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads in each rank's KV pool."""
    return max(1, num_kv_heads // tp)


def columns(size: int, tp: int, rank: int) -> range:
    """An evenly split dimension (the MLP's intermediate columns)."""
    n = size // tp
    return range(rank * n, (rank + 1) * n)


def vocab_rows(vocab_size: int, tp: int, rank: int) -> range:
    """The LM head rows of ``rank``: ``ceil(vocab / tp)`` each, the last rank's piece shorter (or
    empty); every rank pads its logits to ``vocab_shard(vocab_size, tp)`` columns for the gather."""
    n = vocab_shard(vocab_size, tp)
    return range(min(rank * n, vocab_size), min((rank + 1) * n, vocab_size))


def vocab_shard(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp)


# -- expert parallelism ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Parallelism:
    """How a worker of ``world`` ranks splits its model: attention, dense MLPs and the LM head over
    ``tp`` ranks, the routed experts of each MoE layer over ``ep`` ranks. Each is 1 (replicated on
    every rank) or ``world``::

        world 2, tp 2, ep 1   heads split; every expert on both ranks, its columns split (TP)
        world 2, tp 1, ep 2   attention replicated; experts 0..E/2-1 on rank 0, the rest on rank 1
        world 2, tp 2, ep 2   heads split, experts split
    """

    world: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name, value in (("tensor_parallel_size", self.tp), ("expert_parallel_size", self.ep)):
            if value not in (1, self.world):
                raise ValueError(f"{name} {value}: must be 1 or the worker's {self.world} ranks")
        if max(self.tp, self.ep) != self.world:
            raise ValueError(
                f"a worker of {self.world} ranks splits nothing over them (tp {self.tp}, ep {self.ep})"
            )

    @classmethod
    def of(cls, tp: int = 1, ep: int = 1) -> Parallelism:
        """A worker of ``max(tp, ep)`` ranks."""
        if tp < 1 or ep < 1:
            raise ValueError(f"tensor_parallel_size ({tp}) and expert_parallel_size ({ep}) must be >= 1")
        return cls(max(tp, ep), tp, ep)


def check_expert_parallel(ep: int, num_experts: int) -> None:
    """Raise ValueError unless ``ep`` ranks split the experts evenly."""
    if ep < 1 or num_experts % ep:
        raise ValueError(
            f"expert_parallel_size {ep} does not divide the model's {num_experts} routed experts"
        )


def experts_of(num_experts: int, ep: int, rank: int) -> range:
    """The routed experts rank ``rank`` holds (contiguous, so the owner of expert e is e // (E / ep))."""
    n = num_experts // ep
    return range(rank * n, (rank + 1) * n)
