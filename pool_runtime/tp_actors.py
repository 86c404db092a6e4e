"""The Ray side of a tensor-parallel worker: its placement group, its follower actors, its RankGroup.

A worker of TP = N asks Ray for one placement group of N bundles (each one rank's CPUs, GPUs and
custom resources, with the pool's node labels), ``STRICT_PACK``: every rank on one node, so the
collectives and the step channel stay on the node. Rank 0 is the pool's actor, in bundle 0; when it
starts (and every time Ray restarts it) it creates its N - 1 followers in bundles 1..N-1
(pool_runtime/rank_follower.py). They are owned by rank 0, so they die with it, and a follower
that dies takes rank 0 down with it (RankGroup: the group is broken): the worker restarts whole.

::

    placement group (STRICT_PACK, one node)
    ┌ bundle 0 ───────────┐ ┌ bundle 1 ─────────┐     ┌ bundle N-1 ───────┐
    │ PrefillActor rank 0 │ │ FollowerActor r1  │ ... │ FollowerActor rN-1│
    │ scheduler, blocks   │─┼─ RankChannel ─────┼─────┼─▶ steps, answers  │
    │ shard 0, KV heads 0 │ │ shard 1, KV heads │     │                   │
    └─────────────────────┘ └───────────────────┘     └───────────────────┘
             └──────────── torch.distributed (gloo / NCCL): the all-reduces ────────┘
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from engine.parallel import RankChannel, TPGroup, free_port
from pool_runtime.actors import PoolSpec, actor_class, actor_options
from pool_runtime.config import WorkerConfig
from pool_runtime.rank_follower import RankFollower
from pool_runtime.rank_group import RankGroup

START_TIMEOUT_S = 600.0  # loading a shard of a big model takes a while
T = TypeVar("T")
_MIN_CPU = 0.001  # a bundle must ask for something: a rank that asks for nothing gets this


def rank_resources(spec: PoolSpec) -> dict[str, float]:
    """One rank's Ray resources (a bundle of the worker's placement group)."""
    out = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
    out = {k: float(v) for k, v in out.items() if v > 0}
    return out or {"CPU": _MIN_CPU}


def tp_placement_group(spec: PoolSpec, tp: int, **options: Any) -> PlacementGroup:
    """The worker's placement group (not waited for: its actors start once Ray has placed it, and
    the caller waits for them); ``options``: a name, ``lifetime="detached"``."""
    labels = [dict(spec.node_labels)] * tp if spec.node_labels else None
    bundles = [rank_resources(spec)] * tp
    return placement_group(bundles, strategy="STRICT_PACK", bundle_label_selector=labels, **options)


def worker_options(spec: PoolSpec, pg: PlacementGroup | None) -> dict[str, Any]:
    """Rank 0's actor options: the pool's, placed in bundle 0 of ``pg`` (its node labels are the
    placement group's then)."""
    opts = actor_options(spec)
    if pg is not None:
        opts.pop("label_selector", None)
        opts["num_cpus"] = rank_resources(spec).get("CPU", 0.0)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    return opts


def placement_name(worker_name: str) -> str:
    """The name of a launched (named) worker's placement group."""
    return f"{worker_name}-ranks"


def placed_actor_class(
    cls: type, config: WorkerConfig, spec: PoolSpec, **extra: Any
) -> tuple[Any, PlacementGroup | None, WorkerConfig]:
    """``cls`` as the Ray actor class of one worker, the placement group made for it (None for
    TP = 1: placed like any actor) and the config to construct it with (each rank's resources
    filled in). ``extra``: a name, namespace, ``lifetime="detached"`` (the group gets the same)."""
    tp = config.ranks
    if tp == 1:
        return actor_class(cls, spec, **extra), None, config
    pg_options: dict[str, Any] = {}
    if "name" in extra:
        pg_options["name"] = placement_name(extra["name"])
    if "lifetime" in extra:
        pg_options["lifetime"] = extra["lifetime"]
    pg = tp_placement_group(spec, tp, **pg_options)
    opts = {**worker_options(spec, pg), **extra}
    return (
        ray.remote(cls).options(**opts),
        pg,
        dataclasses.replace(config, rank_resources=rank_resources(spec)),
    )


def remove_placement(pg: PlacementGroup | None) -> None:
    if pg is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(pg)


def remove_named_placement(worker_name: str) -> None:
    """Remove a launched worker's placement group, if it has one (TP > 1)."""
    try:
        pg = ray.util.get_placement_group(placement_name(worker_name))
    except ValueError:
        return
    remove_placement(pg)


class FollowerActor(RankFollower):
    """A follower rank as a Ray actor: its message loop runs from construction."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.start()

    def ready(self) -> int:
        return self.rank

    def pid(self) -> int:
        import os

        return os.getpid()


def start_rank_group(config: WorkerConfig, role: str) -> RankGroup | None:
    """Called by rank 0's actor as it starts: create the followers (in this actor's placement
    group, else pinned to this node), join the group with them and return it (None for TP = 1).
    Once a rank is gone the actor's process exits, so Ray restarts the worker whole."""
    n = config.ranks
    if n == 1:
        return None
    host = "127.0.0.1"  # every rank is on this node (STRICT_PACK, or pinned to it)
    channel = RankChannel.listen(host)
    init_method = f"tcp://{host}:{free_port(host)}"
    res = dict(config.rank_resources) or {"CPU": _MIN_CPU}
    pg = ray.util.get_current_placement_group()
    followers = []
    for r in range(1, n):
        strategy: Any = (
            PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
            if pg is not None
            else NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        )
        opts: dict[str, Any] = dict(
            num_cpus=res.get("CPU", 0.0),
            num_gpus=res.get("GPU", 0.0),
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=4,
            scheduling_strategy=strategy,
        )
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        if custom:
            opts["resources"] = custom
        cls = ray.remote(FollowerActor).options(**opts)
        followers.append(cls.remote(config, role, r, init_method, channel.address, channel.authkey))

    def stop() -> None:
        for f in followers:
            with contextlib.suppress(Exception):
                ray.kill(f, no_restart=True)  # type: ignore[arg-type]

    ready = [f.ready.remote() for f in followers]  # type: ignore[attr-defined]  # answers once a follower has joined and loaded
    try:
        _unless_one_dies(lambda: channel.accept(n - 1), ready)  # a follower connects, then joins
        tp = _unless_one_dies(lambda: TPGroup.init(0, n, init_method, config.engine.device), ready)
        ray.get(ready)
    except BaseException:
        stop()
        channel.close()
        raise
    group = RankGroup(tp, channel, followers, on_close=stop)
    group.on_broken = lambda e: os._exit(1)
    return group


def _unless_one_dies(fn: Callable[[], T], ready: list[Any]) -> T:
    """Run ``fn`` (which waits for the followers) in a thread; raise at once if a follower's
    construction fails instead of waiting for it forever."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    waited = 0.0
    while t.is_alive():
        done, _ = ray.wait(ready, num_returns=len(ready), timeout=0.5)
        for ref in done:
            ray.get(ref)  # raises the follower's error (a finished one returns: it joined already)
        waited += 0.5
        if waited > START_TIMEOUT_S:
            raise TimeoutError(f"the followers did not join within {START_TIMEOUT_S:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def rank_usage(ranks: RankGroup | None) -> list[dict[str, int]]:
    """What each follower rank holds now (FollowerActor.usage), rank order; [] for TP = 1."""
    if ranks is None:
        return []
    return list(ray.get([f.usage.remote() for f in ranks.followers], timeout=60))
