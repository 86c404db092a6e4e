"""NIXL (UCX backend) transport: one-sided WRITEs straight into the receiver's reserved blocks.

The receiver registers its whole KV pool once; a reservation hands the sender the pool's base
address and the reserved block ids. The sender prepares NIXL descriptor lists once — its own pool,
and each receiver's pool at first contact, one descriptor per (layer, block) — and per message
posts a WRITE by indices into them (NIXL merges consecutive ones into runs) — no packing. It hashes
the same source bytes on a thread while the WRITE copies (over CMA the copy runs inside
``transfer`` with the GIL released; CRC32C releases it too), and once the WRITE is complete and
hashed sends the header (with the digest) as a NIXL notification. A message over CHUNK_BYTES goes
as several WRITEs of whole layers, each with its own header, so the receiver verifies early layers
while later ones are still being copied. The receiver hashes the destination regions when a header
arrives and commits when every piece has been verified.

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
from concurrent.futures import Future, ThreadPoolExecutor
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


# A message bigger than this is posted as several WRITEs of whole layers, each with its own header,
# so the receiver verifies the first layers while later ones are still being copied (one 64 MiB
# whole-request WRITE would otherwise leave the receiver's digest pass entirely after the copy).
CHUNK_BYTES = 4 << 20


@dataclass(slots=True)
class _Write:
    handle: Any
    header: Header  # sent, with the digest, as the notification once the WRITE is complete
    digest: Future[int]  # computed on the hashing thread while the WRITE copies
    receiver: str


@dataclass(slots=True)
class _Remote:
    name: str  # the loaded agent's name
    dlist: Any  # prepped descriptor list of the receiver's pool, one descriptor per (layer, block)
    pool_blocks: int


def _block_descs(base: int, count: int, size: int, device_id: int) -> np.ndarray:
    """(count, 3) descriptors (address, length, device) of ``count`` consecutive ``size``-byte blocks."""
    addr = base + np.arange(count, dtype=np.uint64) * np.uint64(size)
    return np.stack([addr, np.full_like(addr, size), np.full_like(addr, device_id)], axis=1)


def _done(value: int) -> Future[int]:
    f: Future[int] = Future()
    f.set_result(value)
    return f


class NixlSender(BaseSender):
    """Descriptor lists are prepared once (``prep_xfer_dlist``): the local pool at construction and
    each receiver's pool at first contact, one descriptor per (layer, block); a message is then a
    ``make_prepped_xfer`` by indices (NIXL merges the consecutive ones back into runs). The source
    digest runs on a thread: CMA copies inside ``transfer`` with the GIL released, and CRC32C
    releases it too, so both proceed at once."""

    backend = "nixl"

    def __init__(self, kv: torch.Tensor) -> None:
        super().__init__(kv)
        self.agent = _agent(self.name)
        self._reg = self.agent.register_memory(kv)
        self._md: bytes = self.agent.get_agent_metadata()
        self._remotes: dict[str, _Remote] = {}  # receiver name -> its agent and prepped pool
        p = self.pool
        self._local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT",
            _block_descs(p.base_addr, p.num_layers * p.num_blocks, p.layer_block_bytes, p.device_id),
            p.mem_type,
        )
        # CPU pools with a GIL-releasing digest hash on a thread; otherwise inline, after the post
        self._hasher = (
            ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-digest")
            if p.np_flat is not None and protocol.DIGEST_RELEASES_GIL
            else None
        )
        self.corrupt_after_digest = False  # test hook: flip one source byte after hashing it

    def _connect(self, dest: KVDestination) -> None:
        if dest.receiver in self._remotes:
            return
        name = self.agent.add_remote_agent(dest.address)
        name = name.decode() if isinstance(name, bytes) else name
        try:
            n = dest.num_layers * dest.pool_blocks
            dlist = self.agent.prep_xfer_dlist(
                name, _block_descs(dest.base_addr, n, dest.layer_block_bytes, dest.device_id), dest.mem_type
            )
        except Exception:
            with contextlib.suppress(Exception):
                self.agent.remove_remote_agent(name)
            raise
        self._remotes[dest.receiver] = _Remote(name, dlist, dest.pool_blocks)
        self.agent.send_notif(name, Header(KIND_HELLO, "", text=self.name).encode() + self._md)

    def _post(
        self, out: Outgoing, header: Header, layers: range, src: Sequence[int], dst: Sequence[int]
    ) -> None:
        p = self.pool
        remote = self._remotes[out.dest.receiver]
        step = max(1, CHUNK_BYTES // max(1, len(src) * p.layer_block_bytes))  # layers per WRITE
        src_idx = np.asarray(src, dtype=np.int64)[None, :]  # (1, n)
        dst_idx = np.asarray(dst, dtype=np.int64)[None, :]
        for first in range(layers.start, layers.stop, step):
            group = range(first, min(first + step, layers.stop))
            h = header
            if len(group) != len(layers):
                h = Header(
                    KIND_DATA,
                    header.request_id,
                    layer=first,
                    num_layers=len(group),
                    block_start=header.block_start,
                    num_blocks=header.num_blocks,
                    dtype=header.dtype,
                    block_shape=header.block_shape,
                    payload_bytes=len(group) * len(src) * p.layer_block_bytes,
                    status=header.status,
                )
            lay = np.arange(group.start, group.stop, dtype=np.int64)[:, None]  # (l, 1)
            local_idx = (lay * p.num_blocks + src_idx).reshape(-1).astype(np.int32)  # (l * n,) payload order
            remote_idx = (lay * remote.pool_blocks + dst_idx).reshape(-1).astype(np.int32)
            if not self._post_one(out, h, group, src, remote, local_idx, remote_idx):
                return

    def _post_one(
        self,
        out: Outgoing,
        header: Header,
        layers: range,
        src: Sequence[int],
        remote: _Remote,
        local_idx: np.ndarray,
        remote_idx: np.ndarray,
    ) -> bool:
        p = self.pool
        src_regions = p.regions(layers, src)
        dig: Future[int] | None = None
        if self.corrupt_after_digest:
            dig = _done(p.digest(src_regions))
            p.flat[src_regions[0][0]] ^= 0xFF  # flipped in transit, as far as the receiver can tell
        elif not self.digests:
            dig = _done(0)
        elif self._hasher is not None:
            dig = self._hasher.submit(p.digest, src_regions)  # runs while transfer() below copies
        try:
            handle = self.agent.make_prepped_xfer("WRITE", self._local, local_idx, remote.dlist, remote_idx)
        except Exception as e:  # nixlRemoteDisconnectError and friends
            self._lost(out, f"NIXL WRITE to {out.dest.receiver} could not be created: {e}")
            return False
        try:
            state = self.agent.transfer(handle)
        except Exception as e:
            state, err = "ERR", str(e)
        else:
            err = "post failed"
        if state == "ERR":
            self._release(handle)
            self._lost(out, f"NIXL WRITE to {out.dest.receiver}: {err}")
            return False
        if dig is None:
            dig = _done(p.digest(src_regions))
        out.pending.append(_Write(handle, header, dig, remote.name))
        self._send_ready(out)  # earlier chunks of this message: the receiver starts verifying them
        return not out.error

    def _progress(self) -> None:
        for out in self._out.values():
            self._send_ready(out)
        for msgs in self.agent.get_new_notifs().values():
            for msg in msgs:
                try:
                    h, _ = Header.decode(msg)
                except KVTransferError:
                    continue
                if h.kind == KIND_ACK:
                    self._on_ack(h)

    def _send_ready(self, out: Outgoing) -> None:
        """Send, in order, the headers of the WRITEs that are complete and hashed."""
        while out.pending and not out.error:
            w: _Write = out.pending[0]
            try:
                state = self.agent.check_xfer_state(w.handle)
            except Exception:
                state = "ERR"
            if state == "PROC" or (state == "DONE" and not w.digest.done()):
                break
            out.pending.pop(0)
            self._release(w.handle)
            if state == "ERR":
                self._lost(out, f"NIXL WRITE to {out.dest.receiver} failed (receiver gone?)")
                break
            try:
                self.agent.send_notif(w.receiver, w.header.with_digest(w.digest.result()).encode())
            except Exception as e:
                self._lost(out, f"notification to {out.dest.receiver} failed: {e}")

    def _lost(self, out: Outgoing, error: str) -> None:
        """The receiver is unreachable: fail the request and forget the agent, so that a new
        receiver under a new name can be reached later."""
        out.error = error
        remote = self._remotes.pop(out.dest.receiver, None)
        if remote is not None:
            self._forget(remote)

    def _forget(self, remote: _Remote) -> None:
        with contextlib.suppress(Exception):
            self.agent.release_dlist_handle(remote.dlist)
        with contextlib.suppress(Exception):
            self.agent.remove_remote_agent(remote.name)

    def _release(self, handle: Any) -> None:
        # still active on a dead peer: NIXL reclaims it when the agent goes
        with contextlib.suppress(Exception):
            self.agent.release_xfer_handle(handle)

    def _abandon(self, out: Outgoing) -> None:
        for w in out.pending:
            self._release(w.handle)
        out.pending.clear()

    def _shutdown(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
        for remote in self._remotes.values():
            self._forget(remote)
        self._remotes.clear()
        with contextlib.suppress(Exception):
            self.agent.release_dlist_handle(self._local)
        self.agent.deregister_memory(self._reg)
