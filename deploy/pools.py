"""The Ray pools of a deployment, built from its TandemConfig in one place, and the router's backend
over them.

Three paths start or find the same workers and route over them the same way::

    tandem serve      serve_backend(cfg)    joins (or starts) Ray; start_pools: one actor per
                                            worker_plans(cfg) entry, anonymous, gone with the server
    tandem launch     deploy/cluster.py     the same plans, as named detached actors (start_worker)
    launched router   named_pools(...)      finds those actors by name (deploy/router_actor.py)
    serve + router    pools_backend(...)    each worker's node name -> topology(cfg, nodes) ->
                                            router.pools_backend.PoolsBackend over the pools

One topology rule: a worker sits on the node its actor names (``pool_runtime.actors.node_name``:
the node's ``tandem/node`` label, else its IP), and the YAML's ``topology.nodes`` is keyed by that
name, whichever path built the router.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from decode_pool.pool import DecodeActor, RayDecodeHandle
from deploy.config import PoolConfig, TandemConfig
from deploy.derive import (
    check_model,
    model_dir,
    model_name,
    pool_spec,
    redis_options,
    worker_config,
    worker_telemetry,
)
from memory_tiers.metadata import InProcessMetadataStore, MetadataStore
from pool_runtime.actors import PoolSpec, shutdown
from pool_runtime.config import WorkerConfig
from pool_runtime.tp_actors import placed_actor_class
from pool_runtime.tracing import TelemetryConfig
from prefill_pool.pool import PrefillActor, RayPrefillHandle
from router.coordinator import Pools
from router.pools_backend import PoolsBackend
from router.telemetry import Telemetry
from router.topology import Placement, Topology

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode")
_ACTORS: dict[str, type] = {"prefill": PrefillActor, "decode": DecodeActor}
_HANDLES: dict[str, Any] = {"prefill": RayPrefillHandle, "decode": RayDecodeHandle}


def digest_of(*parts: Any) -> str:
    """A short, stable digest of JSON-able parts (what an actor was built from)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """One worker of a deployment: what it runs, where Ray may place it, what it traces with."""

    role: str  # "prefill" | "decode"
    name: str  # "prefill-0", ...: the worker id, and the actor's name when launched
    config: WorkerConfig
    spec: PoolSpec
    telemetry: TelemetryConfig
    pool: PoolConfig

    @property
    def digest(self) -> str:
        """What the worker is built from; the tracing exporter is part of it (changing it replaces
        a launched worker)."""
        config, telemetry = dataclasses.asdict(self.config), dataclasses.asdict(self.telemetry)
        return digest_of(config, self.pool.model_dump(mode="json"), telemetry)


def worker_plans(cfg: TandemConfig, model: Path | None = None) -> list[WorkerPlan]:
    """Every worker ``cfg`` describes, prefill first, named ``<role>-<i>``. Raises ConfigError when
    a pool's tensor_parallel_size cannot split the model."""
    model = model if model is not None else model_dir(cfg)
    check_model(cfg, model)
    telemetry = worker_telemetry(cfg)
    if any(p.ranks > 1 and p.replicas for p in (cfg.pools.prefill, cfg.pools.decode)):
        log.info("workers of several ranks keep their KV in G1 only (tiers.g2 / g3 are for one-rank workers)")
    plans = []
    for role, pool in (("prefill", cfg.pools.prefill), ("decode", cfg.pools.decode)):
        for i in range(pool.replicas):
            name = f"{role}-{i}"
            wcfg = worker_config(cfg, pool, name, model)
            plans.append(WorkerPlan(role, name, wcfg, pool_spec(pool), telemetry, pool))
    return plans


def start_worker(plan: WorkerPlan, **options: Any) -> tuple[Any, Any]:
    """Create the worker's actor (returns at once; ``actor.ready`` answers once its model is
    loaded) and, for a tensor-parallel worker, the placement group its ranks run in (else None).
    ``options`` adds Ray actor options: a name, a namespace, ``lifetime="detached"``."""
    cls, pg, config = placed_actor_class(_ACTORS[plan.role], plan.config, plan.spec, **options)
    return cls.remote(config, plan.telemetry, plan.digest), pg


def handle(role: str, actor: Any, worker_id: str, placement: Any = None) -> Any:
    """The coordinator's handle on a worker actor of ``role`` (``placement``: its ranks' group)."""
    return _HANDLES[role](actor, worker_id, placement)


def start_pools(cfg: TandemConfig, model: Path | None = None) -> tuple[list[Any], list[Any]]:
    """Start every worker of ``cfg`` as an anonymous actor and wait until each has loaded its model;
    (prefill handles, decode handles). A worker that fails to start stops all of them."""
    plans = worker_plans(cfg, model)
    log.info(
        "starting %d prefill and %d decode workers",
        sum(p.role == "prefill" for p in plans),
        sum(p.role == "decode" for p in plans),
    )
    handles = []
    for p in plans:
        actor, placement = start_worker(p)
        handles.append(handle(p.role, actor, p.name, placement))
    try:
        ray.get([h.actor.ready.remote() for h in handles])
    except BaseException:
        shutdown(handles)
        raise
    return _split(plans, handles)


def named_pools(prefill: Sequence[str], decode: Sequence[str], namespace: str) -> tuple[list[Any], list[Any]]:
    """Handles on the named (launched) workers of ``namespace``."""
    return (
        [handle("prefill", ray.get_actor(n, namespace=namespace), n) for n in prefill],
        [handle("decode", ray.get_actor(n, namespace=namespace), n) for n in decode],
    )


def node_names(handles: Sequence[Any]) -> dict[str, str]:
    """worker id -> the name of the node it runs on (the one topology rule: label, else IP)."""
    names = ray.get([h.actor.node_name.remote() for h in handles])
    return {h.worker_id: str(n) for h, n in zip(handles, names, strict=True)}


def topology(cfg: TandemConfig, nodes: Mapping[str, str]) -> Topology:
    """The router's topology: each worker placed on its node (``nodes``: worker id -> node name),
    with the NVLink domain and rack the YAML gives that node name, and the YAML's link figures."""
    t = cfg.topology

    def place(node: str) -> Placement:
        n = t.nodes.get(node)
        return Placement(node=node, nvlink_domain=n.nvlink_domain if n else None, rack=n.rack if n else None)

    return Topology.build(
        {w: place(node) for w, node in nodes.items()},
        link_gbps=dict(t.link_gbps),
        calibration_file=t.calibration_file,
        same_node_link=t.same_node_link,
    )


def describe(t: Topology) -> dict[str, Any]:
    """A topology as plain JSON-able values: each worker's placement, and the link of every ordered
    pair of workers (what the cost model prices a handoff over)."""
    workers = sorted(t.placements)
    return {
        "placements": {w: dataclasses.asdict(t.placements[w]) for w in workers},
        "links": {f"{a}->{b}": str(t.link(a, b)) for a in workers for b in workers if a != b},
        "same_node_link": str(t.same_node_link),
    }


def make_store(url: str, **redis_kwargs: Any) -> MetadataStore:
    """``memory`` -> the in-process store; a redis:// URL -> RedisMetadataStore (``redis_kwargs``:
    deploy/derive.py's ``redis_options``, the password and TLS files)."""
    if url == "memory":
        return InProcessMetadataStore()
    from memory_tiers.redis_metadata import RedisMetadataStore

    return RedisMetadataStore(url, **redis_kwargs)


def pools_backend(
    cfg: TandemConfig,
    prefill: Sequence[Any],
    decode: Sequence[Any],
    *,
    model: Path | None = None,
    telemetry: Telemetry | None = None,
    on_close: Callable[[], None] | None = None,
) -> PoolsBackend:
    """The router's backend over running workers: their topology, the metadata store, the model's
    limits and tokenizer, the YAML's routing policy. Closing it closes the store, then ``on_close``
    (the workers outlive it unless ``on_close`` stops them)."""
    nodes = node_names([*prefill, *decode])
    store = make_store(cfg.metadata.store, **(redis_options(cfg.metadata) if cfg.metadata.is_redis else {}))

    def close() -> None:
        store.close()
        if on_close is not None:
            on_close()

    try:
        return PoolsBackend.over_pools(
            Pools(prefill, decode, disaggregation="auto" if prefill else "never"),
            model if model is not None else model_dir(cfg),
            store,
            name=model_name(cfg),
            dtype=cfg.dtype,
            block_size=cfg.engine.block_size,
            kv_cache_dtype=cfg.pools.prefill.kv_cache_dtype,  # what a handoff moves
            policy=cfg.router.policy,
            topology=topology(cfg, nodes),
            nodes=nodes,
            max_model_len=cfg.engine.max_model_len,
            max_tokens_limit=cfg.router.max_tokens_limit,
            heartbeat_interval_s=cfg.metadata.heartbeat_interval_s,
            heartbeat_ttl_s=cfg.metadata.heartbeat_ttl_s,
            telemetry=telemetry,
            on_close=close,
        )
    except BaseException:
        store.close()
        raise


def init_ray(address: str | None) -> str | None:
    """Join Ray at ``address``, or start a local one in a fresh temp dir (returned: ours to remove).
    Nothing happens when this process is already connected (tests share one cluster)."""
    if ray.is_initialized():
        return None
    if address:
        ray.init(address=address)
        return None
    # One machine: every KV transfer is on loopback (UCX would otherwise also offer eth0), and Ray's
    # own listeners (GCS, raylet, object manager, dashboard agent, workers) bind to 127.0.0.1, not
    # every interface (tests/integration/test_embedded_listeners.py). A node address of 127.0.0.1
    # alone leaves them on *; Ray's local-only mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, MEASURED.md)
    # keeps them on loopback. Ray reads that variable once, when it is imported, so its constant is
    # set to match here. Ray's token auth stays on. Set the variable to 1 to open the embedded cluster.
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    local_only = os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0").lower() in ("0", "false")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = not local_only
    temp_dir = tempfile.mkdtemp(prefix="tandem-ray-")
    # address="local" and a fresh temp dir: never attach to (or hang on) a stale cluster (MEASURED.md)
    ray.init(
        address="local",
        include_dashboard=False,
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1" if local_only else None,
    )
    return temp_dir


def serve_backend(
    cfg: TandemConfig, ray_address: str | None = None, telemetry: Telemetry | None = None
) -> PoolsBackend:
    """``tandem serve``'s backend: join Ray at ``ray_address`` (else start a local one), start the
    pools ``cfg`` describes and route over them; closing it stops the workers (and the Ray it
    started). The workers trace with ``cfg.router.tracing``'s exporter, like the router."""
    model = model_dir(cfg)
    temp_dir = init_ray(ray_address)
    handles: list[Any] = []

    def stop() -> None:
        shutdown(handles, remove_placements=temp_dir is None)  # our own Ray goes next, with them
        if temp_dir is not None:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)

    try:
        prefill, decode = start_pools(cfg, model)
        handles += [*prefill, *decode]
        return pools_backend(cfg, prefill, decode, model=model, telemetry=telemetry, on_close=stop)
    except BaseException:
        stop()
        raise


def _split(plans: Sequence[WorkerPlan], handles: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    prefill = [h for p, h in zip(plans, handles, strict=True) if p.role == "prefill"]
    decode = [h for p, h in zip(plans, handles, strict=True) if p.role == "decode"]
    return prefill, decode
