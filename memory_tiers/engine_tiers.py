"""EngineTiers: the ``tiers`` an engine is given (engine/tiers.py), building a TierStore over its KV.

The engine calls it once its G1 pool exists; the store it builds is kept here too, for the worker
that built the engine (a decode worker lands handoffs in G2 through the store's full API)::

    tiers = EngineTiers(TierConfig(host_bytes=..., disk_dir=..., disk_bytes=...))
    engine = LLMEngine(engine_config, tiers=tiers)   # calls tiers(layout, kv, fingerprint)
    tiers.store                                      # the TierStore, or None (no G2 room)

``host_bytes`` becomes slots of this model's block size; the model's fingerprint names its G3
files, so a disk cache of another model is never served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from engine.kv_layout import KVLayout
from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.metadata import BlockEvent
from memory_tiers.tier_store import TierConfig, TierStore


class EngineTiers:
    def __init__(
        self,
        config: TierConfig,
        worker_id: str = "local",
        publish: Callable[[list[BlockEvent]], None] | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.publish = publish
        self.store: TierStore | None = None

    def __call__(self, layout: KVLayout, kv_cache: torch.Tensor, model_fingerprint: str) -> TierStore | None:
        if self.store is not None:
            raise RuntimeError("EngineTiers builds the tiers of one engine")
        c = self.config
        host_blocks = c.host_blocks or c.host_bytes // layout.block_bytes
        if host_blocks <= 0:
            return None
        config = dataclasses.replace(
            c, host_blocks=host_blocks, model_fingerprint=c.model_fingerprint or model_fingerprint
        )
        self.store = TierStore(
            layout, TorchDevicePool(kv_cache, layout), config, self.worker_id, self.publish
        )
        return self.store
