"""A rank other than 0 of a tensor-parallel worker: its shard, its heads' KV pool, its transport, and
the loop that executes rank 0's messages (pool_runtime/rank_group.py) one by one.

Prefill ranks run each Step's forward and, after every layer, send their own heads of that layer
to the decode ranks that own them (pool_runtime/tp_handoff.py); decode ranks hold leases on their
receiver for the blocks rank 0 reserved, and a poll thread drives that receiver (NIXL needs a
receiver polled continuously) and verifies each arriving piece's digest. A follower holds no
request state beyond those: blocks, scheduling and sampling are rank 0's.

Any error inside a Step leaves the group out of step, so the process ends (rank 0 sees it and ends
too, and Ray restarts the worker as a whole). Thread model: the message loop thread owns the
engine and the sender; the receiver is shared with the poll thread under a lock. Lifecycle:
construct (joins the group, loads the shard) -> ``start`` -> messages until Stop or rank 0 is gone
-> ``close``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from engine.llm_engine import EngineConfig
from engine.parallel import RankChannel, RankGroupBroken, TPGroup, default_threads
from engine.rank_engine import RankEngine
from kv_transfer.base import BaseSender, idle
from kv_transfer.protocol import KVTransferError
from pool_runtime.build import build_transport
from pool_runtime.config import WorkerConfig
from pool_runtime.handoff import KVGrant
from pool_runtime.rank_group import (
    Abandon,
    Answer,
    Commit,
    Crash,
    Finish,
    Release,
    Reserve,
    Step,
    Stop,
    rank_request_id,
)
from pool_runtime.tp_handoff import ShardSender, worker_layout

log = logging.getLogger(__name__)


class RankFollower:
    def __init__(
        self,
        config: WorkerConfig,
        role: str,
        rank: int,
        init_method: str,
        channel_address: tuple[str, int],
        authkey: bytes,
    ) -> None:
        import torch

        self.config, self.role, self.rank = config, role, rank
        size = config.ranks
        ec: EngineConfig = config.engine
        if config.torch_threads > 0 or ec.device == "cpu":
            torch.set_num_threads(config.torch_threads or default_threads(size))
        self.channel = RankChannel.connect(channel_address, authkey, rank)
        self.tp = TPGroup.init(rank, size, init_method, ec.device)
        self.engine = RankEngine(ec, self.tp)
        transport = build_transport(config)
        self.shard: ShardSender | None = None
        self.receiver: Any = None
        if role == "prefill":
            sender: BaseSender = transport.sender(self.engine.kv_cache)  # type: ignore[assignment]
            self.shard = ShardSender(
                sender,
                worker_layout(
                    self.engine.model.config, ec.block_size, self.engine.model.parallel, ec.kv_cache_dtype
                ),
                rank,
            )
        else:
            self.receiver = transport.receiver(self.engine.kv_cache)
        self._grants: dict[str, KVGrant] = {}
        self._errors: dict[str, str] = {}  # request -> the first send error
        self._sent: dict[str, int] = {}  # request -> bytes this rank sent
        self._crash: dict[str, int] = {}
        self._lock = threading.Lock()  # the receiver: message loop vs poll thread
        self._stop = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        loop = threading.Thread(target=self._serve, name=f"rank-{self.rank}", daemon=True)
        self._threads.append(loop)
        if self.receiver is not None:
            self._threads.append(
                threading.Thread(target=self._poll, name=f"rank-{self.rank}-poll", daemon=True)
            )
        for t in self._threads:
            t.start()

    def usage(self) -> dict[str, int]:
        """What this rank holds now: receiver leases (blocks), sender requests in flight."""
        with self._lock:
            reserved = self.receiver.num_reserved_blocks if self.receiver is not None else 0
        in_flight = self.shard.num_in_flight if self.shard is not None else 0
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "reserved_blocks": reserved,
            "sends_in_flight": in_flight,
        }

    # -- the message loop
    def _serve(self) -> None:
        orphaned = False
        while not self._stop:
            try:
                msg = self.channel.recv()
            except RankGroupBroken:
                orphaned = True  # rank 0 is gone: so is this worker
                break
            if isinstance(msg, Stop):
                break
            if isinstance(msg, Step):
                try:
                    self._step(msg)
                except Exception:  # out of step with the group: end this process
                    log.exception("tensor-parallel rank %d failed a step", self.rank)
                    os._exit(1)
                continue
            try:
                answer = Answer(self._handle(msg))
            except Exception as e:
                answer = Answer(error=f"rank {self.rank}: {e}")
            try:
                self.channel.send(answer)
            except RankGroupBroken:
                orphaned = True
                break
        self._stop = True
        self.close()
        if orphaned:  # free this rank's bundle for the followers of rank 0's restart at once
            os._exit(0)

    def _step(self, msg: Step) -> None:
        self._grants.update(msg.grants)
        hook = None
        if msg.sends and self.shard is not None:
            sends = msg.sends

            def hook(layer: int) -> None:
                for s in sends:
                    self._send_layer(s.request_id, layer, s.src_block_ids, s.block_offset)

        self.engine.run(msg.inputs, hook)

    def _send_layer(self, rid: str, layer: int, blocks: list[int], offset: int) -> None:
        assert self.shard is not None
        if rid in self._errors:
            return
        try:
            self._sent[rid] = self._sent.get(rid, 0) + self.shard.send_layer(
                self._grants[rid], layer, blocks, offset
            )
        except (KVTransferError, ValueError, KeyError) as e:
            self._errors[rid] = str(e)
        if self._crash.get(rid) == layer:
            os.kill(os.getpid(), signal.SIGKILL)

    def _handle(self, msg: Any) -> Any:
        if isinstance(msg, Finish):
            out = {}
            for rid in msg.request_ids:
                grant, error = self._grants.pop(rid, None), self._errors.pop(rid, "")
                if grant is not None and not error and self.shard is not None:
                    try:
                        self.shard.finish(grant, msg.timeout_s)
                    except KVTransferError as e:
                        error = str(e)
                elif grant is not None and self.shard is not None:
                    self.shard.abandon(grant, 0.0)
                out[rid] = (error, self._sent.pop(rid, 0))
            return out
        if isinstance(msg, Abandon):
            grant = self._grants.pop(msg.request_id, None)
            self._errors.pop(msg.request_id, None), self._sent.pop(msg.request_id, None)
            if grant is not None and self.shard is not None:
                self.shard.abandon(grant, msg.flush_timeout_s)
            return None
        if isinstance(msg, Crash):
            if msg.rank == self.rank:
                self._crash[msg.request_id] = msg.layer
            return None
        wire = rank_request_id(msg.request_id, self.rank)
        with self._lock:
            if isinstance(msg, Reserve):
                parts = msg.parts[self.rank]
                return self.receiver.reserve(wire, msg.block_ids, msg.num_layers, msg.lease_s, parts)
            if isinstance(msg, Commit):
                self.receiver.poll()  # the last piece may have landed since the poll thread looked
                r = self.receiver.book.get(wire)
                ok = r is not None and r.committed
                self.receiver.release(wire)
                return ok
            if isinstance(msg, Release):
                self.receiver.release(wire)
                return None
        raise ValueError(f"unknown message {type(msg).__name__}")

    def _poll(self) -> None:
        spins = 0
        while not self._stop:
            with self._lock:
                if self._stop:
                    return
                busy = self.receiver.num_reserved_blocks > 0
                if busy:
                    self.receiver.poll()
            if busy:
                spins += 1
                idle(spins)
            else:
                spins = 0
                time.sleep(0.005)

    def close(self) -> None:
        self._stop = True
        with self._lock:
            if self.receiver is not None:
                self.receiver.close()
            if self.shard is not None:
                self.shard.sender.close()
        self.channel.close()
        self.tp.close()
