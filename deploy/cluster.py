"""Tandem on a running Ray cluster: launch, inspect and stop it as named, detached actors.

Everything lives in one Ray namespace (``ray.namespace`` in the YAML, default ``tandem``)::

    prefill-0 .. prefill-{P-1}   PrefillActor, placed by the pool's resources / node labels
    decode-0  .. decode-{D-1}    DecodeActor, likewise
    router                       deploy/router_actor.py's RouterActor on the head node, hosting gRPC

The workers are the ones ``tandem serve`` starts (deploy/pools.py's ``worker_plans`` and
``start_worker``), made named and detached.

Actors are detached: they outlive the ``tandem launch`` process, and Ray restarts a dead one (its
constructor arguments kept). :func:`launch` is idempotent: every actor carries a digest of what it
was built from; an actor whose digest matches is kept, one that differs is replaced, replicas beyond
the YAML's count are removed, and the router is replaced only when its config or its workers changed.
:func:`stop` drains the router (in-flight streams get ``grace`` seconds, then are cancelled) and
kills every actor of the namespace. :func:`status` asks each worker for its node and load.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from deploy.config import TandemConfig
from deploy.pools import ROLES, digest_of, start_worker, worker_plans
from deploy.router_actor import RouterActor
from pool_runtime.tp_actors import remove_named_placement

ROUTER = "router"
WORKER_NAME = re.compile(r"^(prefill|decode)-(\d+)$")
# The head node's built-in resource: the router sits beside the GCS, which a cluster cannot lose anyway.
HEAD_RESOURCE = "node:__internal_head__"
CALL_TIMEOUT_S = 60.0
START_TIMEOUT_S = 600.0


@dataclass(slots=True)
class LaunchResult:
    router_address: str
    http_url: str = ""  # the OpenAI API's http://HOST:PORT; "" when router.http is disabled
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def connect(address: str | None, namespace: str) -> None:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``, else ``auto``); a no-op when this
    process is connected already (tests)."""
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS") or "auto"
        ray.init(address=addr, namespace=namespace, log_to_driver=False)


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
    remove_named_placement(name)  # a tensor-parallel worker's ranks (their group is named after it)
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while _get(name, namespace) is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def named_actors(namespace: str) -> list[str]:
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace
    )


def launch(
    cfg: TandemConfig,
    *,
    address: str | None = None,
    port: int | None = None,
    http_port: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> LaunchResult:
    """Start (or update) the pools and the router described by ``cfg`` on the cluster; returns once
    the router serves. ``port`` overrides ``router.port``, ``http_port`` ``router.http.port``;
    ``timeout_s`` bounds the wait for new workers (an autoscaler may have to bring their nodes up
    first)."""
    if port is not None or http_port is not None:
        data = cfg.model_dump()
        if port is not None:
            data["router"]["port"] = port
        if http_port is not None:
            data["router"]["http"]["port"] = http_port
        cfg = TandemConfig.model_validate(data)
    ns = cfg.ray.namespace
    connect(address or cfg.ray.address, ns)
    result = LaunchResult("")
    starting: list[Any] = []
    wanted: dict[str, list[str]] = {role: [] for role in ROLES}
    for plan in worker_plans(cfg):
        name = plan.name
        wanted[plan.role].append(name)
        actor = _get(name, ns)
        if actor is not None:
            try:
                same = ray.get(actor.digest.remote(), timeout=CALL_TIMEOUT_S) == plan.digest
            except Exception:  # dead for good, or still starting after a crash: replace it
                same = False
            if same:
                result.kept.append(name)
                continue
            _kill(name, ns)
        actor, _ = start_worker(plan, name=name, namespace=ns, lifetime="detached")
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
    digest = digest_of(cfg_json, actor_ids)
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
    result.http_url = ray.get(router.http_url.remote(), timeout=CALL_TIMEOUT_S)
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
