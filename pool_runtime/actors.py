"""Turning worker classes into Ray actors, and Ray's failures into the pools' errors.

Shared by prefill_pool/pool.py and decode_pool/pool.py: the worker classes carry no Ray decorator;
``ray.remote`` is applied here, with the pool's resources, node labels and a restart policy (Ray
restarts a dead actor; calls in flight when it died fail with WorkerDied and are not retried
blindly — the coordinator decides).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from pool_runtime.handoff import WorkerDied

# Concurrent calls per actor: every in-flight request may hold one (a blocking prefill or a take
# long-poll), so this bounds the requests a worker serves without queueing calls.
MAX_CONCURRENCY = 256


@dataclass(slots=True)
class PoolSpec:
    """One pool's Ray placement (deploy/config.py's PoolConfig carries the same fields)."""

    replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)
    max_restarts: int = -1  # -1: Ray restarts a dead worker forever


def actor_class(cls: type, spec: PoolSpec) -> Any:
    """``cls`` as a Ray actor class with the pool's resources and restart policy."""
    opts: dict[str, Any] = dict(
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        max_restarts=spec.max_restarts,
        max_task_retries=0,
        max_concurrency=MAX_CONCURRENCY,
    )
    if spec.resources:
        opts["resources"] = dict(spec.resources)
    if spec.node_labels:
        opts["label_selector"] = dict(spec.node_labels)
    return ray.remote(cls).options(**opts)


async def call(ref: Any, worker_id: str) -> Any:
    """Await an actor call; a dead (or restarting) actor becomes WorkerDied. An exception raised
    by the worker keeps its class (Ray's RayTaskError is an instance of the cause's class)."""
    try:
        return await ref
    except RayActorError as e:
        raise WorkerDied(f"worker {worker_id} died: {type(e).__name__}") from e


class ActorIdentity:
    """What every worker actor answers about itself: readiness, pid, node. Mixed into the actor
    classes of both pools (the workers themselves stay Ray-free)."""

    worker_id: str

    def ready(self) -> str:
        return self.worker_id

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        """The IP of the Ray node this worker runs on (the router's topology keys nodes by it)."""
        return str(ray.util.get_node_ip_address())
