"""NIXL (UCX backend) transport: one-sided WRITEs straight into the receiver's reserved blocks.

The receiver registers its whole KV pool once; a reservation hands the sender the pool's base
address and the reserved block ids, from which the sender computes remote addresses itself. Per
message the sender posts one WRITE whose descriptors are the (layer, run of consecutive blocks)
pieces — no packing — hashes the same source bytes while the WRITE is in flight, and once the
WRITE is complete sends the header (with the digest) as a NIXL notification. The receiver hashes
the destination regions when the header arrives and commits when every piece has been verified.

No progress thread (it halved throughput on 2 cores, MEASURED.md): both sides poll, the receiver
in ``poll`` and the sender in ``send_layer`` / ``finish``. The first message from a sender to a
receiver is a HELLO notification carrying the sender's agent metadata, so the receiver can ack.
The receiver must be polled continuously (a decode worker's loop): without it, connection setup
and notifications stall and the sender's WRITEs never complete.

Caveat of one-sided writes: when the receiver fails a request (deadline, digest) it frees the
blocks at once, but a stalled (not dead) sender may still WRITE into them later. Headers of such
late messages are dropped, yet the bytes land. A caller that reuses freed blocks at once should
give failed reservations a grace period, or give senders a shorter deadline than the lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kv_transfer import protocol
from kv_transfer.base import BaseReceiver, BaseSender, Outgoing
from kv_transfer.protocol import KIND_ACK, KIND_DATA, KIND_HELLO, Header, KVTransferError
from kv_transfer.transport import KVDestination


def _agent(name: str) -> Any:
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))


class NixlTransport:
    backend = "nixl"

    def __init__(self, transport: str = "auto") -> None:
        self.transport = transport

    def receiver(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> NixlReceiver:
        return NixlReceiver(kv, capacity_blocks, max_requests)

    def sender(self, kv: torch.Tensor) -> NixlSender:
        return NixlSender(kv)


class NixlReceiver(BaseReceiver):
    backend = "nixl"

    def __init__(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> None:
        super().__init__(kv, capacity_blocks, max_requests)
        self.agent = _agent(self.name)
        self._reg = self.agent.register_memory(kv)
        self._md: bytes = self.agent.get_agent_metadata()
        self._senders: set[str] = set()

    def metadata(self) -> bytes:
        return self._md

    def _progress(self) -> None:
        for sender, msgs in self.agent.get_new_notifs().items():
            for msg in msgs:
                try:
                    h, n = Header.decode(msg)
                except KVTransferError:
                    continue  # not ours (another protocol sharing the agent): drop it
                if h.kind == KIND_HELLO:
                    if sender not in self._senders:
                        self.agent.add_remote_agent(bytes(msg[n:]))
                        self._senders.add(sender)
                elif h.kind == KIND_DATA:
                    self._on_data(h, sender, lambda regions, check: self.pool.digest(regions) if check else 0)

    def _send_ack(self, sender: str, request_id: str, status: int, text: str) -> None:
        if sender in self._senders:
            self.agent.send_notif(
                sender, Header(KIND_ACK, request_id, status=status, text=text[:1000]).encode()
            )

    def _shutdown(self) -> None:
        for s in self._senders:
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(s)
        self.agent.deregister_memory(self._reg)


@dataclass(slots=True)
class _Write:
    handle: Any
    header: bytes  # sent as the notification once the WRITE is complete
    receiver: str


class NixlSender(BaseSender):
    backend = "nixl"

    def __init__(self, kv: torch.Tensor) -> None:
        super().__init__(kv)
        self.agent = _agent(self.name)
        self._reg = self.agent.register_memory(kv)
        self._md: bytes = self.agent.get_agent_metadata()
        self._remotes: dict[str, str] = {}  # receiver name -> loaded agent name
        self.corrupt_after_digest = False  # test hook: flip one source byte after hashing it

    def _connect(self, dest: KVDestination) -> None:
        if dest.receiver in self._remotes:
            return
        name = self.agent.add_remote_agent(dest.address)
        name = name.decode() if isinstance(name, bytes) else name
        self._remotes[dest.receiver] = name
        self.agent.send_notif(name, Header(KIND_HELLO, "", text=self.name).encode() + self._md)

    def _post(
        self, out: Outgoing, header: Header, layers: range, src: Sequence[int], dst: Sequence[int]
    ) -> None:
        d, p = out.dest, self.pool
        lbb = p.layer_block_bytes
        pieces = np.array(protocol.paired_runs(src, dst), dtype=np.uint64)  # (k, 3): src, dst, count
        lay = np.array(layers, dtype=np.uint64)[:, None]  # (l, 1)
        src_off = ((lay * p.num_blocks + pieces[:, 0]) * lbb).reshape(-1)  # (l * k,) layer-major
        dst_off = ((lay * d.pool_blocks + pieces[:, 1]) * lbb).reshape(-1)
        length = np.broadcast_to(pieces[:, 2] * lbb, (len(lay), len(pieces))).reshape(-1)
        local = np.stack([src_off + p.base_addr, length, np.full_like(length, p.device_id)], axis=1)
        remote = np.stack([dst_off + d.base_addr, length, np.full_like(length, d.device_id)], axis=1)
        src_regions = list(zip(src_off.tolist(), length.tolist(), strict=True))
        if self.corrupt_after_digest:
            dig = p.digest(src_regions)
            o = src_regions[0][0]
            p.flat[o] ^= 0xFF  # flipped in transit, as far as the receiver can tell
        receiver = self._remotes[d.receiver]
        try:
            handle = self.agent.initialize_xfer(
                "WRITE",
                self.agent.get_xfer_descs(local, p.mem_type),
                self.agent.get_xfer_descs(remote, d.mem_type),
                receiver,
            )
        except Exception as e:  # nixlRemoteDisconnectError and friends
            self._lost(out, f"NIXL WRITE to {d.receiver} could not be created: {e}")
            return
        try:
            state = self.agent.transfer(handle)
        except Exception as e:
            state, err = "ERR", str(e)
        else:
            err = "post failed"
        if state == "ERR":
            self._release(handle)
            self._lost(out, f"NIXL WRITE to {d.receiver}: {err}")
            return
        if not self.corrupt_after_digest:
            dig = p.digest(src_regions) if self.digests else 0
        out.pending.append(_Write(handle, header.with_digest(dig).encode(), receiver))

    def _progress(self) -> None:
        for out in self._out.values():
            while out.pending and not out.error:
                w: _Write = out.pending[0]
                try:
                    state = self.agent.check_xfer_state(w.handle)
                except Exception:
                    state = "ERR"
                if state == "PROC":
                    break
                out.pending.pop(0)
                self._release(w.handle)
                if state == "ERR":
                    self._lost(out, f"NIXL WRITE to {out.dest.receiver} failed (receiver gone?)")
                    break
                try:
                    self.agent.send_notif(w.receiver, w.header)
                except Exception as e:
                    self._lost(out, f"notification to {out.dest.receiver} failed: {e}")
        for msgs in self.agent.get_new_notifs().values():
            for msg in msgs:
                try:
                    h, _ = Header.decode(msg)
                except KVTransferError:
                    continue
                if h.kind == KIND_ACK:
                    self._on_ack(h)

    def _lost(self, out: Outgoing, error: str) -> None:
        """The receiver is unreachable: fail the request and forget the agent, so that a new
        receiver under a new name can be reached later."""
        out.error = error
        name = self._remotes.pop(out.dest.receiver, None)
        if name is not None:
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(name)

    def _release(self, handle: Any) -> None:
        # still active on a dead peer: NIXL reclaims it when the agent goes
        with contextlib.suppress(Exception):
            self.agent.release_xfer_handle(handle)

    def _abandon(self, out: Outgoing) -> None:
        for w in out.pending:
            self._release(w.handle)
        out.pending.clear()

    def _shutdown(self) -> None:
        for name in self._remotes.values():
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(name)
        self.agent.deregister_memory(self._reg)
