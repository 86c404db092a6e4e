"""What a rank other than 0 of a tensor-parallel worker runs: its model shard, its KV pool, a runner.

Rank 0 is a whole :class:`~engine.llm_engine.LLMEngine` (block manager, scheduler, sampler); every
other rank holds no request state at all. It runs the :class:`~engine.model_runner.StepInputs` rank 0
publishes, step for step, on the same block ids in its own pool (same block count: kv_pool), and
takes part in the step's collectives. Lifecycle: construct (loads the shard; blocks until the group
is complete only inside the first collective) -> ``run`` per step -> ``close``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.llm_engine import EngineConfig, kv_pool, load_engine_model
from engine.model_runner import ModelRunner, StepInputs
from engine.parallel import TPGroup


class RankEngine:
    def __init__(self, config: EngineConfig, tp: TPGroup) -> None:
        self.config = config
        self.tp = tp
        self.model = load_engine_model(config, tp)
        self.kv_layout, num_blocks = kv_pool(config, self.model)
        self.kv_cache = self.kv_layout.allocate(num_blocks, config.device)  # (L, N, 2, H_kv/tp, B, D)
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, config.device)

    def run(self, inputs: StepInputs, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        return self.runner.run(inputs, on_layer)
