"""What both kinds of worker build the same way: the engine (model + KV pool), the KV transport,
and the log of prefix blocks their engine evicted (which the router drains to fix its block index)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from engine.llm_engine import EngineConfig, LLMEngine
from kv_transfer.factory import make_transport
from kv_transfer.transport import KVTransport
from memory_tiers.engine_tiers import EngineTiers
from memory_tiers.tier_store import TierConfig
from pool_runtime.handoff import WorkerConfig


def make_engine(cfg: WorkerConfig) -> LLMEngine:
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    tiers = None
    if cfg.host_kv_bytes > 0:
        disk_dir = str(Path(cfg.disk_kv_dir) / cfg.worker_id) if cfg.disk_kv_dir else None
        tiers = EngineTiers(
            TierConfig(host_bytes=cfg.host_kv_bytes, disk_dir=disk_dir, disk_bytes=cfg.disk_kv_bytes)
        )
    return LLMEngine(
        EngineConfig(
            model=cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            block_size=cfg.block_size,
            num_blocks=cfg.num_blocks,
            kv_cache_bytes=cfg.kv_cache_bytes,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            enable_prefix_caching=cfg.enable_prefix_caching,
        ),
        tiers=tiers,
    )


def make_kv_transport(cfg: WorkerConfig) -> KVTransport:
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
