"""The prefill pool as Ray actors: PrefillWorker replicas with their loop running, and async handles.

``build_prefill_pool(config, spec)`` starts ``spec.replicas`` actors (worker ids ``prefill-0``, ...)
and returns one :class:`RayPrefillHandle` per replica, which is what ``decode_pool.coordinator.Pools``
takes. ``shutdown(handles)`` kills them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray

from decode_pool.handoff import FirstToken, KVGrant, WorkerConfig, WorkerLoad, WorkRequest
from decode_pool.ray_util import ActorIdentity, PoolSpec, actor_class, call
from prefill_pool.worker import PrefillWorker

CANCEL_WAIT_S = 30.0


class PrefillActor(ActorIdentity, PrefillWorker):
    """A PrefillWorker whose loop thread runs from construction (Ray calls its methods on threads)."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.start_loop()

    def cancel_and_wait(self, request_id: str) -> None:
        """``cancel``, returning once the loop has released the request (so the caller may free
        the decode side)."""
        self.cancel(request_id).wait(CANCEL_WAIT_S)


class RayPrefillHandle:
    def __init__(self, actor: Any, worker_id: str) -> None:
        self.actor = actor
        self.worker_id = worker_id

    async def prefill(self, req: WorkRequest, grant: KVGrant) -> FirstToken:
        return await call(self.actor.prefill.remote(req, grant), self.worker_id)

    async def cancel(self, request_id: str) -> None:
        await call(self.actor.cancel_and_wait.remote(request_id), self.worker_id)

    async def load(self) -> WorkerLoad:
        return await call(self.actor.load.remote(), self.worker_id)

    async def take_evictions(self) -> list[bytes]:
        return await call(self.actor.take_evictions.remote(), self.worker_id)


def build_prefill_pool(
    config: WorkerConfig, spec: PoolSpec, prefix: str = "prefill"
) -> list[RayPrefillHandle]:
    """Start the replicas and wait until each has loaded its model."""
    cls = actor_class(PrefillActor, spec)
    handles = []
    for i in range(spec.replicas):
        wid = f"{prefix}-{i}"
        handles.append(RayPrefillHandle(cls.remote(dataclasses.replace(config, worker_id=wid)), wid))
    ray.get([h.actor.ready.remote() for h in handles])
    return handles
