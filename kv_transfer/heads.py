"""Which rank sends which KV heads to which rank, when a prefill worker of P ranks hands a request's KV
to a decode worker of D ranks (pure integers: the router, the pools and the tests share it).

A worker describes what each of its ranks holds (:class:`KVShardLayout`: the first KV head and the
count per rank, as its engine split them; pool_runtime/tp_handoff.py builds it), so the transport
moves bytes without knowing how a model is split. A receiving rank needs exactly its own heads.
Each of its heads comes from one sending rank that holds it (several hold it when KV heads are
replicated: the receiving rank's index picks one, so the senders share the work), straight into
the receiving rank's pool at that head's offset there — nothing is gathered through one process::

    P = 2 -> D = 1 (4 KV heads)              P = 1 -> D = 2                  P = 2 -> D = 2
    prefill r0 [h0 h1] ──▶ decode r0 [h0 h1   prefill r0 [h0 h1 ──▶ d r0 [h0 h1]   r0 [h0 h1] ──▶ r0
    prefill r1 [h2 h3] ──▶            h2 h3]             h2 h3] ──▶ d r1 [h2 h3]   r1 [h2 h3] ──▶ r1
    2 routes, decode r0's reservation has 2 parts   2 routes                     2 routes

A latent pool (MLA) holds one "head", the same on every rank: each receiving rank gets it once,
from one of the ranks that hold it, never once per sending rank. So does a pool whose attention is
replicated over an expert-parallel worker's ranks (every rank holds every head).

Two workers can exchange KV only if their pools agree on everything but the split
(:meth:`KVShardLayout.mismatch`): the model fingerprint, dtype, block size, layers, KV heads and
head size. That is checked when the decode worker reserves, before any byte moves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVShardLayout:
    """A whole worker's KV pool as a handoff sees it: the model's KV heads, and which of them each of
    the worker's ranks holds (``held``: per rank, its first head and how many; () for one rank
    holding all of them)."""

    fingerprint: str  # the model's (engine.config.ModelConfig.fingerprint): same weights, same dtype
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int  # the model's, over all ranks (a latent pool: 1)
    head_dim: int  # one head's values per token (a latent pool: the latent's width)
    held: tuple[tuple[int, int], ...] = ()  # rank -> (first head, count)
    latent: bool = False  # one plane per block (MLA's latent) instead of two (K and V)

    def __post_init__(self) -> None:
        covered: set[int] = set()
        for rank, (first, count) in enumerate(self.held):
            if first < 0 or count < 1 or first + count > self.num_kv_heads:
                raise ValueError(f"rank {rank} holds KV heads {first}+{count} of {self.num_kv_heads}")
            covered.update(range(first, first + count))
        if self.held and len(covered) != self.num_kv_heads:
            raise ValueError(f"the ranks hold {len(covered)} of the model's {self.num_kv_heads} KV heads")

    @property
    def tp_size(self) -> int:
        """The worker's ranks."""
        return max(1, len(self.held))

    def rank_heads(self, rank: int) -> range:
        """The model's KV heads held by ``rank``."""
        if not self.held:
            return range(self.num_kv_heads)
        first, count = self.held[rank]
        return range(first, first + count)

    def mismatch(self, other: KVShardLayout) -> str:
        """Why KV cannot move between pools of these two layouts ("" when it can)."""
        fields = ("fingerprint", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "latent")
        diffs = [
            f"{f} {getattr(self, f)!r} vs {getattr(other, f)!r}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]
        return "; ".join(diffs)


@dataclass(frozen=True, slots=True)
class HeadRoute:
    """KV heads ``[src_head, src_head + count)`` of sending rank ``src_rank``'s pool go to heads
    ``[dst_head, dst_head + count)`` of receiving rank ``dst_rank``'s pool (offsets local to each)."""

    src_rank: int
    dst_rank: int
    src_head: int
    dst_head: int
    count: int


def plan_routes(src: KVShardLayout, dst: KVShardLayout) -> list[HeadRoute]:
    """Every (sending rank, receiving rank, heads) piece of a handoff from ``src`` to ``dst``, in
    receiving-rank order; consecutive heads between the same two ranks form one route. Raises
    ValueError when the layouts disagree on anything but the split."""
    why = src.mismatch(dst)
    if why:
        raise ValueError(f"KV layouts differ: {why}")
    routes: list[HeadRoute] = []
    for d in range(dst.tp_size):
        mine = dst.rank_heads(d)
        for head in mine:
            holders = [r for r in range(src.tp_size) if head in src.rank_heads(r)]
            s = holders[d % len(holders)]
            s_off, d_off = head - src.rank_heads(s).start, head - mine.start
            last = routes[-1] if routes else None
            if (
                last is not None
                and (last.src_rank, last.dst_rank) == (s, d)
                and (last.src_head + last.count, last.dst_head + last.count) == (s_off, d_off)
            ):
                routes[-1] = HeadRoute(s, d, last.src_head, last.dst_head, last.count + 1)
            else:
                routes.append(HeadRoute(s, d, s_off, d_off, 1))
    return routes


def receiver_parts(
    routes: list[HeadRoute], dst_rank: int, num_local_heads: int
) -> tuple[tuple[int, int], ...]:
    """The head parts receiving rank ``dst_rank`` must get for every block (its reservation's
    ``parts``); () when one route brings all of its heads."""
    parts = tuple(sorted((r.dst_head, r.count) for r in routes if r.dst_rank == dst_rank))
    return () if parts == ((0, num_local_heads),) else parts
