"""WorkerConfig: what one prefill or decode worker runs, one object per level.

::

    WorkerConfig                      this worker: its id, KV transport, handoff timeouts
      ├─ engine: EngineConfig         the engine it runs (engine/llm_engine.py)
      └─ tiers: TierConfig | None     G2 / G3 below its G1 (memory_tiers/tier_store.py)

Each level is the object its own package takes, held here, not copied field by field; a
deployment derives all of them once from its TandemConfig (deploy/derive.py). The one per-worker
change is G3's directory: each worker writes its files under ``<tiers.disk_dir>/<worker_id>``
(pool_runtime/build.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.llm_engine import EngineConfig
from memory_tiers.tier_store import TierConfig


@dataclass(slots=True)
class WorkerConfig:
    engine: EngineConfig
    worker_id: str = "worker-0"
    tiers: TierConfig | None = None  # None: G1 only
    kv_backend: str = "nixl"  # nixl | ucxx | inprocess (kv_transfer.factory.BACKENDS)
    kv_transport: str = "auto"  # auto | shm | tcp | cuda_ipc | rc
    lease_s: float = 60.0  # how long a decode reservation waits for its KV
    ack_timeout_s: float = 30.0  # how long a prefill worker waits for the decode worker's commit
    torch_threads: int = 0  # > 0: torch.set_num_threads (one core per worker in the benchmark)
    # Decode: host inbox blocks for KV landing in G2 when G1 is full (0: one longest prompt, at most
    # the G2 size). Transfers to G2 in flight are bounded by it (decode_pool/g2_landing.py).
    host_landing_blocks: int = 0
    # Tensor / expert parallel: the worker is max(tp, ep) processes, one per device
    # (pool_runtime/rank_group.py; engine/tp_layout.Parallelism says what they split); each rank asks
    # Ray for ``rank_resources`` (its CPUs, GPUs, custom resources) in the worker's placement group.
    # G2/G3 (``tiers``) are not offered with more than one rank.
    tensor_parallel_size: int = 1
    rank_resources: dict[str, float] = field(default_factory=dict)
    expert_parallel_size: int = 1

    @property
    def ranks(self) -> int:
        """The worker's processes."""
        return max(self.tensor_parallel_size, self.expert_parallel_size)
