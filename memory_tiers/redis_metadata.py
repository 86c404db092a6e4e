"""The metadata store on Redis: shared by several routers, surviving a router restart.

Keys (``ns`` defaults to "tandem")::

    {ns}:blk:{hash hex}   HASH   field "{worker}|{tier}" -> 1     who holds a block, in which tier
    {ns}:wblk:{worker}    SET    "{hash hex}|{tier}"              a worker's blocks (to drop them all)
    {ns}:worker:{id}      STRING WorkerInfo as JSON, PX = TTL     expires unless heartbeats extend it
    {ns}:workers          SET    worker ids (pruned when their key has expired)
    {ns}:loads            HASH   worker id -> load report JSON

Each ``publish`` / ``find_blocks`` is one pipelined round trip, whatever the number of hashes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import redis

from engine.block_hash import BlockHash
from memory_tiers.metadata import BlockEvent, EventKind, Tier, WorkerInfo


def _s(x: Any) -> str:
    return x if isinstance(x, str) else x.decode()


class RedisMetadataStore:
    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", ns: str = "tandem", **redis_kwargs: Any
    ) -> None:
        # redis_kwargs: redis-py's password=, ssl_ca_certs=, ssl_certfile=, ssl_keyfile= (a rediss:// URL)
        self._r = redis.Redis.from_url(url, decode_responses=True, **redis_kwargs)
        self._ns = ns
        self._closed = False

    def _k(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    # -- block index -------------------------------------------------------------------------------
    def publish(self, events: Sequence[BlockEvent]) -> None:
        if not events:
            return
        pipe = self._r.pipeline(transaction=False)
        for ev in events:
            hx = ev.block_hash.hex()
            field = f"{ev.worker_id}|{int(ev.tier)}"
            if ev.kind is EventKind.STORED:
                pipe.hset(self._k("blk", hx), field, 1)
                pipe.sadd(self._k("wblk", ev.worker_id), f"{hx}|{int(ev.tier)}")
            else:
                pipe.hdel(self._k("blk", hx), field)
                pipe.srem(self._k("wblk", ev.worker_id), f"{hx}|{int(ev.tier)}")
        pipe.execute()

    def find_blocks(self, hashes: Sequence[BlockHash]) -> list[dict[str, Tier]]:
        pipe = self._r.pipeline(transaction=False)
        for h in hashes:
            pipe.hkeys(self._k("blk", h.hex()))
        out: list[dict[str, Tier]] = []
        for fields in pipe.execute():
            holders: dict[str, Tier] = {}
            for f in fields:
                worker, _, tier = _s(f).rpartition("|")
                t = Tier(int(tier))
                if worker not in holders or t < holders[worker]:
                    holders[worker] = t
            out.append(holders)
        return out

    def drop_worker_blocks(self, worker_id: str) -> None:
        key = self._k("wblk", worker_id)
        members = self._r.smembers(key)
        pipe = self._r.pipeline(transaction=False)
        for m in members:
            hx, _, tier = _s(m).rpartition("|")
            pipe.hdel(self._k("blk", hx), f"{worker_id}|{tier}")
        pipe.delete(key)
        pipe.execute()

    # -- worker registry ---------------------------------------------------------------------------
    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        body = json.dumps(
            {"worker_id": info.worker_id, "role": info.role, "address": info.address, "attrs": info.attrs}
        )
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self._k("worker", info.worker_id), body, px=max(1, int(ttl_s * 1000)))
        pipe.sadd(self._k("workers"), info.worker_id)
        pipe.execute()

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        return bool(self._r.pexpire(self._k("worker", worker_id), max(1, int(ttl_s * 1000))))

    def deregister_worker(self, worker_id: str) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self._k("worker", worker_id))
        pipe.srem(self._k("workers"), worker_id)
        pipe.execute()

    def live_workers(self) -> list[WorkerInfo]:
        ids = sorted(_s(w) for w in self._r.smembers(self._k("workers")))
        if not ids:
            return []
        bodies = self._r.mget([self._k("worker", w) for w in ids])
        gone = [w for w, b in zip(ids, bodies, strict=True) if b is None]
        if gone:
            self._r.srem(self._k("workers"), *gone)
        out = []
        for b in bodies:
            if b is not None:
                d = json.loads(b)
                out.append(WorkerInfo(d["worker_id"], d["role"], d["address"], d["attrs"]))
        return out

    # -- load reports ------------------------------------------------------------------------------
    def put_load(self, worker_id: str, load: dict[str, Any]) -> None:
        self._r.hset(self._k("loads"), worker_id, json.dumps(load))

    def get_loads(self) -> dict[str, dict[str, Any]]:
        return {_s(w): json.loads(v) for w, v in self._r.hgetall(self._k("loads")).items()}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._r.close()
