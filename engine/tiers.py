"""What the engine needs of the KV tiers below G1 (G2 host, G3 disk), as a seam it is given.

The engine never builds a tier store: whoever builds the engine passes ``tiers``, a factory the
engine calls once its KV pool exists (a tier store copies blocks in and out of that tensor)::

    LLMEngine(config, tiers=factory)
      allocate kv (L, N, 2, H_kv, B, D)
      factory(layout, kv, model_fingerprint) -> LowerTiers | None   (None: no lower tiers)
      BlockManager(on_evict=tiers.on_evict)      offload: an evicted cached block is copied down
      TierOnboarder(block_manager, tiers)        onboard: lookup(prefix hashes), onboard(h, block)

``memory_tiers.engine_tiers.EngineTiers`` is the factory of the real store
(memory_tiers.tier_store.TierStore); tests may give anything with these four methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

import torch

from engine.block_hash import BlockHash
from engine.kv_layout import KVLayout


class LowerTiers(Protocol):
    """G2/G3 as the engine uses them. Thread-safe; ``close`` is idempotent."""

    def on_evict(self, h: BlockHash, g1_block_id: int) -> None:
        """G1 block ``g1_block_id`` (holding ``h``) is about to be repurposed: keep a copy below."""
        ...

    def lookup(self, hashes: Sequence[BlockHash]) -> Sequence[object]:
        """The tier of each block of the longest prefix of ``hashes`` held below G1."""
        ...

    def onboard(self, h: BlockHash, g1_block_id: int) -> Future[bool]:
        """Copy ``h`` into G1 block ``g1_block_id``; the Future says whether it landed."""
        ...

    def close(self) -> None: ...


class TiersFactory(Protocol):
    def __call__(self, layout: KVLayout, kv_cache: torch.Tensor, model_fingerprint: str) -> LowerTiers | None:
        """The lower tiers over the engine's KV pool ``kv_cache`` (L, N, 2, H_kv, B, D); None: none."""
        ...
