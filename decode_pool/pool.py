"""The decode pool as Ray actors: DecodeWorker replicas with their loop running, and async handles.

``build_decode_pool(config, spec)`` starts ``spec.replicas`` actors (worker ids ``decode-0``, ...)
and returns one :class:`RayDecodeHandle` per replica for ``decode_pool.coordinator.Pools``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ray

from decode_pool.handoff import FirstToken, KVGrant, TokenChunk, WorkerConfig, WorkerLoad, WorkRequest
from decode_pool.ray_util import ActorIdentity, PoolSpec, actor_class, call
from decode_pool.worker import DecodeWorker


class DecodeActor(ActorIdentity, DecodeWorker):
    """A DecodeWorker whose loop thread runs from construction."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self.start_loop()


class RayDecodeHandle:
    def __init__(self, actor: Any, worker_id: str) -> None:
        self.actor = actor
        self.worker_id = worker_id

    async def reserve(self, req: WorkRequest) -> KVGrant:
        return await call(self.actor.reserve.remote(req), self.worker_id)

    async def start(self, request_id: str, first: FirstToken) -> None:
        await call(self.actor.start.remote(request_id, first), self.worker_id)

    async def submit_local(self, req: WorkRequest) -> None:
        await call(self.actor.submit_local.remote(req), self.worker_id)

    async def take(self, request_id: str, timeout_s: float) -> list[TokenChunk]:
        return await call(self.actor.take.remote(request_id, timeout_s), self.worker_id)

    async def cancel(self, request_id: str) -> bool:
        return await call(self.actor.cancel.remote(request_id), self.worker_id)

    async def load(self) -> WorkerLoad:
        return await call(self.actor.load.remote(), self.worker_id)

    async def take_evictions(self) -> list[bytes]:
        return await call(self.actor.take_evictions.remote(), self.worker_id)


def build_decode_pool(config: WorkerConfig, spec: PoolSpec, prefix: str = "decode") -> list[RayDecodeHandle]:
    """Start the replicas and wait until each has loaded its model and registered its KV pool."""
    cls = actor_class(DecodeActor, spec)
    handles = []
    for i in range(spec.replicas):
        wid = f"{prefix}-{i}"
        handles.append(RayDecodeHandle(cls.remote(dataclasses.replace(config, worker_id=wid)), wid))
    ray.get([h.actor.ready.remote() for h in handles])
    return handles


def shutdown(handles: Sequence[Any]) -> None:
    """Kill the actors behind prefill or decode handles (no restart)."""
    for h in handles:
        ray.kill(h.actor, no_restart=True)
