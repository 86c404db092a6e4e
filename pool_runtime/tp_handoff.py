"""One rank's side of a handoff between tensor-parallel workers: the KV heads it sends, where to.

Both kinds of rank use it the same way: rank 0 of a prefill worker (prefill_pool/worker.py) and its
other ranks (pool_runtime/rank_follower.py) each wrap their own KV sender in a :class:`ShardSender`.
For a grant it finds this rank's routes (kv_transfer/heads.py: the heads it holds that each
decode rank owns) and, per layer, posts one head-sliced write per route straight into that decode
rank's pool; ``finish`` waits for every decode rank it wrote to. Between two one-rank workers
there is one route of all heads, which is exactly the untouched whole-block path.
"""

from __future__ import annotations

import contextlib
import dataclasses

from engine.config import ModelConfig
from engine.tp_layout import Parallelism, kv_heads
from kv_transfer.base import BaseSender
from kv_transfer.heads import HeadRoute, KVShardLayout, plan_routes, receiver_parts
from kv_transfer.protocol import KVTransferError
from kv_transfer.transport import HeadSlice, KVDestination
from pool_runtime.handoff import IncompatibleKV, KVGrant


def worker_layout(
    mc: ModelConfig, block_size: int, parallel: Parallelism | int = 1, kv_dtype: str = "auto"
) -> KVShardLayout:
    """A whole worker's KV layout, as its engine splits it (engine/tp_layout.py): the KV heads of
    each of its ranks (``parallel``: how the ranks split the model; an int: that many ranks, all
    tensor parallel). Attention replicated over an expert-parallel worker's ranks: every rank holds
    every head. The transport reads this description; it never applies the split rules itself.
    ``kv_dtype``: the engine's ``kv_cache_dtype`` (auto: the run dtype; fp8_e4m3 / int8 a quantized
    cache, which only a worker with the same cache dtype can take: the reserve names both)."""
    par = parallel if isinstance(parallel, Parallelism) else Parallelism(parallel, parallel, 1)
    kv = mc.kv_layout(block_size)  # MLA: one latent "head" of kv_lora_rank + rope dims
    held: tuple[tuple[int, int], ...] = ()
    if par.world > 1:
        ranks = [kv_heads(kv.num_kv_heads, par.tp, r if par.tp > 1 else 0) for r in range(par.world)]
        held = tuple((h.start, len(h)) for h in ranks)
    return KVShardLayout(
        fingerprint=mc.fingerprint,
        dtype=mc.dtype if kv_dtype == "auto" else kv_dtype,
        block_size=block_size,
        num_layers=mc.num_layers,
        num_kv_heads=kv.num_kv_heads,
        head_dim=kv.head_dim,
        held=held,
        latent=kv.latent,
    )


def one_rank(layout: KVShardLayout) -> KVShardLayout:
    """The same model's KV on a single rank."""
    return dataclasses.replace(layout, held=())


def rank_parts(
    layout: KVShardLayout, source: KVShardLayout | None, who: str
) -> list[tuple[tuple[int, int], ...]]:
    """The head parts each rank of a decode worker of ``layout`` receives from a prefill worker of
    ``source`` (None: this model on one rank), rank order. Raises IncompatibleKV, naming ``who``
    and every difference, when the two cannot exchange KV at all."""
    source = source or one_rank(layout)
    why = layout.mismatch(source)
    if why:
        if layout.dtype != source.dtype:  # the YAML's pools.prefill / pools.decode kv_cache_dtype
            why += " (pools.prefill.kv_cache_dtype and pools.decode.kv_cache_dtype must hold the same KV)"
        raise IncompatibleKV(f"{who} cannot take KV from this prefill worker: {why}")
    routes = plan_routes(source, layout)
    local = len(layout.rank_heads(0))
    return [receiver_parts(routes, r, local) for r in range(layout.tp_size)]


class ShardSender:
    """Sends the heads rank ``rank`` of a worker of ``layout`` holds. Touched by one thread."""

    def __init__(self, sender: BaseSender, layout: KVShardLayout, rank: int) -> None:
        self.sender = sender
        self.layout = layout
        self.rank = rank
        self._routes: dict[str, list[tuple[KVDestination, HeadSlice]]] = {}

    def routes(self, grant: KVGrant) -> list[tuple[KVDestination, HeadSlice]]:
        """(decode rank's destination, heads) of every route from this rank, for ``grant``."""
        mine = self._routes.get(grant.request_id)
        if mine is None:
            dst = grant.layout or one_rank(self.layout)
            routes: list[HeadRoute] = plan_routes(self.layout, dst)
            dests = grant.dests
            if len(dests) != dst.tp_size:
                raise KVTransferError(
                    f"{grant.request_id}: {len(dests)} destinations for {dst.tp_size} ranks"
                )
            mine = [
                (dests[r.dst_rank], HeadSlice(r.src_head, r.dst_head, r.count))
                for r in routes
                if r.src_rank == self.rank
            ]
            self._routes[grant.request_id] = mine
        return mine

    def send_layer(self, grant: KVGrant, layer: int, src_block_ids: list[int], block_offset: int) -> int:
        """Post ``layer`` of the blocks on every route; the bytes posted."""
        pool = self.sender.pool
        nbytes = 0
        for dest, heads in self.routes(grant):
            self.sender.send_layer(dest, layer, src_block_ids, block_offset=block_offset, heads=heads)
            nbytes += len(src_block_ids) * pool.layer_block_bytes * heads.count // pool.num_heads
        return nbytes

    def finish(self, grant: KVGrant, timeout_s: float) -> None:
        """Wait for the commit of every decode rank this rank wrote to; raises the first failure
        (after finishing the others, so nothing is left in flight)."""
        error: KVTransferError | None = None
        for dest in self._dests(grant):
            try:
                self.sender.finish(dest, timeout_s)
            except KVTransferError as e:
                error = error or e
        self._routes.pop(grant.request_id, None)
        if error is not None:
            raise error

    def abandon(self, grant: KVGrant, flush_timeout_s: float) -> None:
        """Cancel: let posted writes land (the decode side frees the blocks next), then drop them."""
        for dest in self._dests(grant):
            with contextlib.suppress(KVTransferError):
                self.sender.flush(dest, flush_timeout_s)
            with contextlib.suppress(KVTransferError):
                self.sender.finish(dest, 0.0)
        self._routes.pop(grant.request_id, None)

    def _dests(self, grant: KVGrant) -> list[KVDestination]:
        seen: dict[str, KVDestination] = {}
        for dest, _ in self._routes.get(grant.request_id, ()):
            seen.setdefault(dest.request_id + "@" + dest.receiver, dest)
        return list(seen.values())

    @property
    def num_in_flight(self) -> int:
        return self.sender.num_in_flight
