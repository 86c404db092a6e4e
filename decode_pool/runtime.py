"""What both kinds of worker build the same way: the engine (model + KV pool) and the KV transport."""

from __future__ import annotations

import torch

from decode_pool.handoff import WorkerConfig
from engine.llm_engine import EngineConfig, LLMEngine
from kv_transfer.transport import KVTransport, make_transport


def make_engine(cfg: WorkerConfig) -> LLMEngine:
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
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
        )
    )


def make_kv_transport(cfg: WorkerConfig) -> KVTransport:
    return make_transport(cfg.kv_backend, cfg.kv_transport)
