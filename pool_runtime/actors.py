"""Turning worker classes into Ray actors, and Ray's failures into the pools' errors.

Shared by prefill_pool/pool.py, decode_pool/pool.py and deploy/pools.py: the worker classes carry no
Ray decorator; ``ray.remote`` is applied here, with the pool's resources, node labels and a restart
policy (Ray restarts a dead actor; calls in flight when it died fail with WorkerDied and are not
retried blindly — the coordinator decides).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from pool_runtime.handoff import WorkerDied

# Concurrent calls per actor: every in-flight request may hold one (a blocking prefill or a take
# long-poll), so this bounds the requests a worker serves without queueing calls.
MAX_CONCURRENCY = 256
# The Ray node label that names a node (``ray start --labels tandem/node=h100-0``).
NODE_LABEL = "tandem/node"


@dataclass(slots=True)
class PoolSpec:
    """One pool's Ray placement (a deployment derives it from its PoolConfig: deploy/derive.py)."""

    replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)
    max_restarts: int = -1  # -1: Ray restarts a dead worker forever


def actor_options(spec: PoolSpec) -> dict[str, Any]:
    """The Ray actor options of one worker of the pool: resources, node labels, restart policy."""
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
    return opts


def actor_class(cls: type, spec: PoolSpec, **extra: Any) -> Any:
    """``cls`` as a Ray actor class with the pool's options; ``extra`` adds more (a name, a
    namespace, ``lifetime="detached"``: deploy/cluster.py)."""
    return ray.remote(cls).options(**actor_options(spec), **extra)


async def call(ref: Any, worker_id: str) -> Any:
    """Await an actor call; a dead (or restarting) actor becomes WorkerDied. An exception raised
    by the worker keeps its class (Ray's RayTaskError is an instance of the cause's class)."""
    try:
        return await ref
    except RayActorError as e:
        raise WorkerDied(f"worker {worker_id} died: {type(e).__name__}") from e


def node_name() -> str:
    """The name of the Ray node this process runs on: its ``tandem/node`` label, else its IP.

    The one topology rule: a deployment's ``topology.nodes`` is keyed by this name, and every router
    (``tandem serve`` and the launched one, deploy/pools.py) places a worker by what its actor
    answers here."""
    labels = ray.get_runtime_context().get_node_labels() or {}
    return str(labels.get(NODE_LABEL) or ray.util.get_node_ip_address())


class ActorIdentity:
    """What every worker actor answers about itself: readiness, pid, node, and what it was built
    from. Mixed into the actor classes of both pools (the workers themselves stay Ray-free)."""

    worker_id: str
    built_from: str = ""  # a digest of the worker's configuration (deploy/cluster.py keeps or replaces)

    def ready(self) -> str:
        return self.worker_id

    def pid(self) -> int:
        return os.getpid()

    def digest(self) -> str:
        return self.built_from

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def node_name(self) -> str:
        """This worker's node, as the topology names it (:func:`node_name`)."""
        return node_name()


def shutdown(handles: Sequence[Any], remove_placements: bool = True) -> None:
    """Kill the actors behind prefill or decode handles (no restart), and remove the placement
    group of a tensor-parallel one (its follower ranks die with it). ``remove_placements=False``
    when the Ray cluster goes next anyway (a GCS already stopped would make the removal wait)."""
    from ray.util.placement_group import remove_placement_group

    for h in handles:
        ray.kill(h.actor, no_restart=True)
        pg = getattr(h, "placement", None)
        if pg is not None and remove_placements:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)
