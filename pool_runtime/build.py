"""What both kinds of worker build the same way from their WorkerConfig: the engine (model + KV
pool) with the tiers below its G1, the KV transport, and the log of prefix blocks their engine
evicted (which the router drains to fix its block index)."""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path

import torch

from engine.llm_engine import LLMEngine
from engine.parallel import TPGroup, default_threads
from kv_transfer.factory import make_transport
from kv_transfer.transport import KVTransport
from memory_tiers.engine_tiers import EngineTiers
from memory_tiers.tier_store import TierStore
from pool_runtime.config import WorkerConfig


def build_engine(cfg: WorkerConfig, tp: TPGroup | None = None) -> tuple[LLMEngine, TierStore | None]:
    """The worker's engine (rank 0's, over ``tp``, for a tensor-parallel worker) and, when its config
    has G2 room, the tier store below the engine's G1 (G3 files under ``<tiers.disk_dir>/<worker_id>``,
    so workers sharing a disk never share files). A tensor-parallel worker has no G2/G3: each rank
    would have to offload and onboard its heads in lockstep, which is not built."""
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    elif tp is not None and tp.size > 1 and cfg.engine.device == "cpu":
        torch.set_num_threads(default_threads(tp.size))  # the ranks share the machine's cores
    tiers = None
    if cfg.tiers is not None and (tp is None or tp.size == 1):
        t = cfg.tiers
        disk_dir = str(Path(t.disk_dir) / cfg.worker_id) if t.disk_dir else None
        tiers = EngineTiers(dataclasses.replace(t, disk_dir=disk_dir), cfg.worker_id)
    # token ids only: the router's front door makes the text, once per request
    engine = LLMEngine(dataclasses.replace(cfg.engine, detokenize=False), tiers=tiers, tp=tp)
    return engine, tiers.store if tiers is not None else None


def build_transport(cfg: WorkerConfig) -> KVTransport:
    return make_transport(cfg.kv_backend, cfg.kv_transport)


class EvictionLog:
    """Hashes of the prefix blocks an engine evicted from G1, oldest first, until someone takes them.

    With lower tiers on, an evicted block may live on in G2/G3 (the router drops only its G1
    entry). Bounded: with nobody draining it, the oldest entries are dropped (a router that misses
    one keeps a stale index entry, which costs it one mispriced request). Thread-safe (a deque):
    the engine's thread appends, a Ray call takes."""

    def __init__(self, engine: LLMEngine, maxlen: int = 1 << 16) -> None:
        self._hashes: deque[bytes] = deque(maxlen=maxlen)
        bm = engine.block_manager
        self._chained = bm.on_evict  # the engine's tier store offloads through the same hook
        bm.on_evict = self._on_evict

    def _on_evict(self, block_hash: bytes, block_id: int) -> None:
        if self._chained is not None:
            self._chained(block_hash, block_id)  # first: it copies the block's KV while still intact
        self._hashes.append(block_hash)

    def take(self) -> list[bytes]:
        out = []
        while self._hashes:
            out.append(self._hashes.popleft())
        return out
