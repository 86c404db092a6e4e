"""Tandem on a running Ray cluster: launch, inspect and stop it as named, detached actors.

Everything lives in one Ray namespace (``ray.namespace`` in the YAML, default ``tandem``)::

    prefill-0 .. prefill-{P-1}   TandemPrefillActor, placed by the pool's resources / node labels
    decode-0  .. decode-{D-1}    TandemDecodeActor, likewise
    router                       deploy/router_actor.py's RouterActor on the head node, hosting gRPC

Actors are detached: they outlive the ``tandem launch`` process, and Ray restarts a dead one (its
constructor arguments kept). :func:`launch` is idempotent: every actor carries a digest of what it
was built from; an actor whose digest matches is kept, one that differs is replaced, replicas beyond
the YAML's count are removed, and the router is replaced only when its config or its workers changed.
:func:`stop` drains the router (in-flight streams get ``grace`` seconds, then are cancelled) and
kills every actor of the namespace. :func:`status` asks each worker for its node and load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from decode_pool.handoff import WorkerConfig
from decode_pool.pool import DecodeActor
from decode_pool.ray_util import MAX_CONCURRENCY
from deploy.config import PoolConfig, TandemConfig
from deploy.router_actor import RouterActor
from prefill_pool.pool import PrefillActor
from router.pools_backend import worker_telemetry
from router.telemetry import TelemetryConfig

ROUTER = "router"
WORKER_NAME = re.compile(r"^(prefill|decode)-(\d+)$")
# The head node's built-in resource: the router sits beside the GCS, which a cluster cannot lose anyway.
HEAD_RESOURCE = "node:__internal_head__"
CALL_TIMEOUT_S = 60.0
START_TIMEOUT_S = 600.0


def _node_name() -> str:
    """The node's ``tandem/node`` label (the topology's key), else its IP address."""
    labels = ray.get_runtime_context().get_node_labels() or {}
    return str(labels.get("tandem/node") or ray.util.get_node_ip_address())


class _Reporting:
    """What ``tandem launch`` and ``tandem status`` ask a launched worker, beyond its pool methods."""

    engine: Any
    _digest: str

    def digest(self) -> str:
        return self._digest

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def node_name(self) -> str:
        return _node_name()

    def tiers(self) -> list[int]:
        """[G2 used blocks, G2 capacity blocks, G3 used bytes, G3 capacity bytes]; zeros: no tiers."""
        store = self.engine.tier_store
        if store is None:
            return [0, 0, 0, 0]
        m = store.metrics()
        return [m.g2_used_blocks, m.g2_capacity_blocks, m.g3_used_bytes, m.g3_capacity_bytes]


class TandemPrefillActor(_Reporting, PrefillActor):
    """A prefill worker that reports where it runs, its tiers and what it was built from."""

    def __init__(self, config: WorkerConfig, digest: str, telemetry: TelemetryConfig | None = None) -> None:
        super().__init__(config, telemetry)
        self._digest = digest


class TandemDecodeActor(_Reporting, DecodeActor):
    """A decode worker that reports where it runs, its tiers and what it was built from."""

    def __init__(self, config: WorkerConfig, digest: str, telemetry: TelemetryConfig | None = None) -> None:
        super().__init__(config, telemetry)
        self._digest = digest


@dataclass(slots=True)
class LaunchResult:
    router_address: str
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def connect(address: str | None, namespace: str) -> None:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``, else ``auto``); a no-op when this
    process is connected already (tests)."""
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS") or "auto"
        ray.init(address=addr, namespace=namespace, log_to_driver=False)


def worker_config(cfg: TandemConfig, pool: PoolConfig, worker_id: str) -> WorkerConfig:
    from engine.model_source import resolve_model
    from router.pools_backend import worker_config as from_tandem

    model = resolve_model(cfg.model)
    return from_tandem(cfg, model, worker_id=worker_id, device=pool.device)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _get(name: str, namespace: str) -> Any:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _kill(name: str, namespace: str) -> None:
    """Kill a named actor and wait until its name is free (a new actor may take it at once)."""
    actor = _get(name, namespace)
    if actor is None:
        return
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while _get(name, namespace) is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def named_actors(namespace: str) -> list[str]:
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace
    )


def _worker_options(pool: PoolConfig, name: str, namespace: str) -> dict[str, Any]:
    opts: dict[str, Any] = dict(
        name=name,
        namespace=namespace,
        lifetime="detached",
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        max_restarts=-1,  # Ray brings a dead worker back; calls in flight fail as WorkerDied
        max_task_retries=0,
        max_concurrency=MAX_CONCURRENCY,
    )
    if pool.resources:
        opts["resources"] = dict(pool.resources)
    if pool.node_labels:
        opts["label_selector"] = dict(pool.node_labels)
    return opts


def launch(
    cfg: TandemConfig,
    *,
    address: str | None = None,
    port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> LaunchResult:
    """Start (or update) the pools and the router described by ``cfg`` on the cluster; returns once
    the router serves. ``port`` overrides ``router.port``; ``timeout_s`` bounds the wait for new
    workers (an autoscaler may have to bring their nodes up first)."""
    if port is not None:
        data = cfg.model_dump()
        data["router"]["port"] = port
        cfg = TandemConfig.model_validate(data)
    ns = cfg.ray.namespace
    connect(address or cfg.ray.address, ns)
    result = LaunchResult("")
    wanted: dict[str, list[str]] = {}
    starting: list[Any] = []
    for role, pool, cls in (
        ("prefill", cfg.pools.prefill, TandemPrefillActor),
        ("decode", cfg.pools.decode, TandemDecodeActor),
    ):
        names = wanted[role] = [f"{role}-{i}" for i in range(pool.replicas)]
        for name in names:
            wcfg = worker_config(cfg, pool, name)
            tcfg = worker_telemetry(cfg)
            # the tracing exporter is part of what a worker was built from: changing it replaces it
            digest = _digest(dataclasses.asdict(wcfg), pool.model_dump(mode="json"), dataclasses.asdict(tcfg))
            actor = _get(name, ns)
            if actor is not None:
                try:
                    same = ray.get(actor.digest.remote(), timeout=CALL_TIMEOUT_S) == digest
                except Exception:  # dead for good, or still starting after a crash: replace it
                    same = False
                if same:
                    result.kept.append(name)
                    continue
                _kill(name, ns)
            actor_cls: Any = ray.remote(cls)
            actor = actor_cls.options(**_worker_options(pool, name, ns)).remote(wcfg, digest, tcfg)
            starting.append(actor.ready.remote())
            result.created.append(name)
    for name in named_actors(ns):
        m = WORKER_NAME.match(name)
        if m and name not in wanted[m.group(1)]:
            _kill(name, ns)
            result.removed.append(name)
    ray.get(starting, timeout=timeout_s)  # every new worker has loaded its model

    actor_ids = [ray.get_actor(n, namespace=ns)._actor_id.hex() for n in wanted["prefill"] + wanted["decode"]]
    cfg_json = cfg.model_dump_json()
    digest = _digest(cfg_json, actor_ids)
    router = _get(ROUTER, ns)
    if router is not None:
        try:
            same = ray.get(router.digest.remote(), timeout=CALL_TIMEOUT_S) == digest
        except Exception:
            same = False
        if same:
            result.kept.append(ROUTER)
        else:
            stop_router(ns, grace=5.0)
            router = None
    if router is None:
        router = (
            ray.remote(RouterActor)
            .options(
                name=ROUTER,
                namespace=ns,
                lifetime="detached",
                num_cpus=0,
                resources={HEAD_RESOURCE: 0.001},
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=8,  # info / drain answer while the server runs
            )
            .remote(cfg_json, wanted["prefill"], wanted["decode"], ns, digest)
        )
        result.created.append(ROUTER)
    result.router_address = ray.get(router.address.remote(), timeout=timeout_s)
    return result


def stop_router(namespace: str, grace: float) -> bool:
    """Drain the router (in-flight streams get ``grace`` s, then are cancelled) and kill it."""
    router = _get(ROUTER, namespace)
    if router is None:
        return False
    # A dead or wedged router fails the drain: killing it ends its streams with UNAVAILABLE.
    with contextlib.suppress(Exception):
        ray.get(router.drain.remote(grace), timeout=grace + CALL_TIMEOUT_S)
    _kill(ROUTER, namespace)
    return True


def stop(*, address: str | None = None, namespace: str = "tandem", grace: float = 5.0) -> list[str]:
    """Drain the router, then kill it and every worker of the namespace; the names stopped."""
    connect(address, namespace)
    stopped = [ROUTER] if stop_router(namespace, grace) else []
    for name in named_actors(namespace):
        _kill(name, namespace)
        stopped.append(name)
    return stopped
