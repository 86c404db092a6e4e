"""NIXL (UCX backend) transport: one-sided WRITEs straight into the receiver's reserved blocks.

The receiver registers its whole KV pool once; a reservation hands the sender the pool's base
address and the reserved block ids. The sender prepares NIXL descriptor lists once — its own pool,
and each receiver's pool at first contact, one descriptor per (layer, block) — and per message
posts a WRITE by indices into them (NIXL merges consecutive ones into runs) — no packing.

Headers travel as NIXL notifications, and one notification may carry several (protocol.decode_all).
A message over CHUNK_BYTES goes as several WRITEs of whole layers; a hashing thread digests chunk
i + 1 while chunk i copies (over CMA the copy runs inside ``transfer`` with the GIL released, and
xxh3 releases it too), so each WRITE is posted with the headers of every chunk whose bytes are in
place and whose digest is known — its own included — and NIXL sends them once the WRITE is
complete: one notification per WRITE, none of its own. A small one-WRITE message (a layer of a
short prompt) is hashed inline just before its post and its header rides on its own WRITE; a
larger one is hashed beside its copy and its header follows at once. The receiver checks each
piece's digest when its header arrives, while later pieces are still being copied, and commits
when every piece has been verified.

No progress thread (it halved throughput on 2 cores, MEASURED.md): both sides poll, the receiver
in ``poll`` and the sender in ``send_layer`` / ``finish``. The first message from a sender to a
receiver is a HELLO notification carrying the sender's agent metadata, so the receiver can ack.
The receiver must be polled continuously (a decode worker's loop): without it, connection setup
and notifications stall and the sender's WRITEs never complete.

Head slices (tensor-parallel workers, ``send_layer(heads=...)``): a rank writes only the KV heads
it holds into the receiving rank that owns them. Both sides then get a second descriptor list per
(first head, count), one descriptor per (layer, block, K/V) head slice, prepared at first use; a
message is again one ``make_prepped_xfer`` by indices, so no rank packs or gathers anything.

Caveat of one-sided writes: when the receiver fails a request (deadline, digest) it frees the
blocks at once, but a stalled (not dead) sender may still WRITE into them later. Headers of such
late messages are dropped, yet the bytes land. A caller that reuses freed blocks at once should
give failed reservations a grace period, or give senders a shorter deadline than the lease.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kv_transfer import protocol
from kv_transfer.base import BaseReceiver, BaseSender, Outgoing
from kv_transfer.pool import PoolView
from kv_transfer.protocol import KIND_ACK, KIND_DATA, KIND_HELLO, Header, KVTransferError
from kv_transfer.transport import HeadSlice, KVDestination


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
                    headers, n = protocol.decode_all(msg)
                except KVTransferError:
                    continue  # not ours (another protocol sharing the agent): drop it
                for h in headers:
                    if h.kind == KIND_HELLO:
                        if sender not in self._senders:
                            self.agent.add_remote_agent(bytes(msg[n:]))
                            self._senders.add(sender)
                    elif h.kind == KIND_DATA:
                        self._on_data(h, sender, self._verify)

    def _verify(self, regions: list[tuple[int, int]], check: bool) -> int:
        return self.pool.digest(regions) if check else 0

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


# A message bigger than this is posted as several WRITEs of whole layers, so the receiver verifies
# the first layers while later ones are still being copied (one 64 MiB whole-request WRITE would
# otherwise leave the receiver's digest pass entirely after the copy). Smaller pieces shorten that
# tail but cost ~20-40 us each (post, handle, notification): 4 MiB was the best trade measured.
CHUNK_BYTES = 4 << 20


# A one-WRITE message smaller than this is hashed inline, just before its post (the copy then reads
# cache-warm bytes, and the header rides on the WRITE's own notification). Handing a few hundred
# kilobytes to the hashing thread cost more than hashing them (a thread wake-up is tens of
# microseconds, more when both cores are busy); larger payloads gain from hashing beside the copy.
INLINE_HASH_BYTES = 1 << 20


class _Digests:
    """The digests of one message's chunks: computed inline, or on the hashing thread one chunk
    ahead of the copy. ``values[i]`` is None until chunk i is hashed (a list slot written by one
    thread and read by another: atomic under the GIL)."""

    __slots__ = ("jobs", "values")

    def __init__(self, n: int) -> None:
        self.values: list[int | None] = [None] * n
        self.jobs: list[Future[None] | None] = [None] * n

    def ready(self, i: int) -> bool:
        return self.values[i] is not None

    def get(self, i: int) -> int:
        job = self.jobs[i]
        if self.values[i] is None and job is not None:
            job.result()  # the thread is finishing it (or raises what it raised)
        v = self.values[i]
        if v is None:
            raise KVTransferError(f"no digest for chunk {i}")
        return v

    def compute(self, pool: PoolView, i: int, regions: list[tuple[int, int]]) -> None:
        self.values[i] = pool.digest(regions)


@dataclass(slots=True)
class _Write:
    """One posted WRITE and the header that vouches for its bytes."""

    handle: Any
    header: Header  # digest still 0: filled in from ``digests`` when the header goes out
    digests: _Digests
    index: int  # this WRITE's chunk in ``digests``
    done: bool = False  # the WRITE is complete (over CMA: as soon as transfer() returns)
    header_sent: bool = False  # the header went out (alone, or riding on a later WRITE)

    def encoded_header(self) -> bytes:
        return self.header.with_digest(self.digests.get(self.index)).encode()


@dataclass(slots=True)
class _Remote:
    name: str  # the loaded agent's name
    dlist: Any  # prepped descriptor list of the receiver's pool, one descriptor per (layer, block)
    pool_blocks: int
    # (first head, count) -> descriptor list of those heads, one per (layer, block, K/V)
    slices: dict[tuple[int, int], Any] = field(default_factory=dict)


def _block_descs(base: int, count: int, size: int, device_id: int, stride: int | None = None) -> np.ndarray:
    """(count, 3) descriptors (address, length, device) of ``count`` ``size``-byte pieces ``stride``
    bytes apart (default: back to back)."""
    addr = base + np.arange(count, dtype=np.uint64) * np.uint64(stride or size)
    return np.stack([addr, np.full_like(addr, size), np.full_like(addr, device_id)], axis=1)


def _slice_descs(
    base: int,
    num_layers: int,
    num_blocks: int,
    layer_block_bytes: int,
    heads: tuple[int, int],
    num_heads: int,
) -> np.ndarray:
    """Descriptors of heads ``[first, first + count)`` of every (layer, block, K/V) of a pool; index
    ``(layer * num_blocks + block) * 2 + kind``. (A latent pool, one plane of one head, never
    sends a head slice: its one head is the whole block.)"""
    half = layer_block_bytes // 2  # K or V of one block: (H_kv, B, D)
    head = half // num_heads
    return _block_descs(base + heads[0] * head, num_layers * num_blocks * 2, heads[1] * head, 0, half)


class NixlSender(BaseSender):
    """Descriptor lists are prepared once (``prep_xfer_dlist``): the local pool at construction and
    each receiver's pool at first contact, one descriptor per (layer, block); a message is then a
    ``make_prepped_xfer`` by indices (NIXL merges the consecutive ones back into runs).

    Digests run on one hashing thread (CPU pools): CMA copies inside ``transfer`` with the GIL
    released, and xxh3 releases it too, so hashing and copying proceed on both cores at once. A
    message cut into several WRITEs is hashed one chunk ahead of the copy, so each WRITE is posted
    with the headers of every complete chunk whose digest is known — its own included — and NIXL
    sends them as the WRITE's notification once it completes: no separate notification per chunk.
    A header still unsent when the message's last WRITE is posted goes out alone right after it, so
    the receiver can verify every piece without waiting for the next message. Small one-WRITE
    messages (< INLINE_HASH_BYTES) are hashed inline just before their post."""

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
        # CPU pools with a GIL-releasing digest hash on a thread; otherwise inline, before the post
        self._hasher = (
            ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-digest")
            if p.np_flat is not None and protocol.DIGEST_RELEASES_GIL
            else None
        )
        self._local_slices: dict[tuple[int, int], Any] = {}  # (first head, count) -> local dlist
        self.corrupt_after_digest = False  # test hook: flip one source byte after hashing it

    def _local_slice(self, heads: tuple[int, int]) -> Any:
        dl = self._local_slices.get(heads)
        if dl is None:
            p = self.pool
            descs = _slice_descs(
                p.base_addr, p.num_layers, p.num_blocks, p.layer_block_bytes, heads, p.num_heads
            )
            descs[:, 2] = p.device_id
            dl = self._local_slices[heads] = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, p.mem_type)
        return dl

    def _remote_slice(self, remote: _Remote, dest: KVDestination, heads: tuple[int, int]) -> Any:
        dl = remote.slices.get(heads)
        if dl is None:
            descs = _slice_descs(
                dest.base_addr,
                dest.num_layers,
                dest.pool_blocks,
                dest.layer_block_bytes,
                heads,
                dest.block_shape[1],
            )
            descs[:, 2] = dest.device_id
            dl = remote.slices[heads] = self.agent.prep_xfer_dlist(remote.name, descs, dest.mem_type)
        return dl

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
        self,
        out: Outgoing,
        header: Header,
        layers: range,
        src: Sequence[int],
        dst: Sequence[int],
        heads: HeadSlice | None,
    ) -> None:
        p = self.pool
        remote = self._remotes[out.dest.receiver]
        per_layer = header.payload_bytes // len(layers)  # bytes of one layer of the message
        step = max(1, CHUNK_BYTES // max(1, per_layer))  # layers per WRITE
        groups = [range(f, min(f + step, layers.stop)) for f in range(layers.start, layers.stop, step)]
        src_heads = None if heads is None else (heads.src, heads.count)
        chunks = [p.regions(g, src, src_heads) for g in groups]
        lay = np.arange(layers.start, layers.stop, dtype=np.int64)[:, None]  # (l, 1)
        s_ids, d_ids = np.asarray(src, dtype=np.int64)[None, :], np.asarray(dst, dtype=np.int64)[None, :]
        local_dl, remote_dl = self._local, remote.dlist
        # descriptor indices in payload order: (l, n) (layer, then block), or with a head slice
        # (l, n, 2) (layer, block, then K/V)
        local_idx = (lay * p.num_blocks + s_ids).astype(np.int32)
        remote_idx = (lay * remote.pool_blocks + d_ids).astype(np.int32)
        if heads is not None:
            kind = np.arange(2, dtype=np.int32)[None, None, :]
            local_idx, remote_idx = local_idx[..., None] * 2 + kind, remote_idx[..., None] * 2 + kind
            local_dl = self._local_slice((heads.src, heads.count))
            remote_dl = self._remote_slice(remote, out.dest, (heads.dst, heads.count))
        digests = _Digests(len(groups))
        first = 0
        if not self.digests:
            digests.values = [0] * len(groups)
            first = len(groups)
        elif self.corrupt_after_digest:
            digests.values[0] = p.digest(chunks[0])
            p.flat[chunks[0][0][0]] ^= 0xFF  # flipped in transit, as far as the receiver can tell
            first = 1
        hasher = self._hasher
        if len(groups) == 1 and header.payload_bytes < INLINE_HASH_BYTES:
            hasher = None
        # With a hashing thread, chunk i + 1 is hashed while chunk i copies: one chunk ahead, not
        # more. Running further ahead took the second core from the receiver (its digest checks
        # waited for the thread to finish) and let the hashed bytes leave the cache before their
        # copy read them; one chunk ahead, the copy and the receiver's check read cache-warm bytes.
        if hasher is not None and first < len(groups):
            digests.jobs[first] = hasher.submit(digests.compute, p, first, chunks[first])
        for i, g in enumerate(groups):
            if hasher is not None and first < i + 1 < len(groups):
                digests.jobs[i + 1] = hasher.submit(digests.compute, p, i + 1, chunks[i + 1])
            h = header
            if len(groups) > 1:
                h = Header(
                    KIND_DATA,
                    header.request_id,
                    layer=g.start,
                    num_layers=len(g),
                    block_start=header.block_start,
                    num_blocks=header.num_blocks,
                    dtype=header.dtype,
                    block_shape=header.block_shape,
                    payload_bytes=len(g) * per_layer,
                    status=header.status,
                    head_start=header.head_start,
                )
            if hasher is None and not digests.ready(i):
                digests.values[i] = p.digest(chunks[i])  # inline, just before the copy reads them
            rows = slice(g.start - layers.start, g.stop - layers.start)
            w = _Write(None, h, digests, i)
            li, ri = local_idx[rows].reshape(-1), remote_idx[rows].reshape(-1)
            if not self._post_one(out, w, local_dl, remote_dl, li, ri):
                return
        self._send_ready(out)  # what no WRITE carried (a one-WRITE message's own header) goes now

    def _post_one(
        self,
        out: Outgoing,
        w: _Write,
        local_dl: Any,
        remote_dl: Any,
        local_idx: np.ndarray,
        remote_idx: np.ndarray,
    ) -> bool:
        """Post one WRITE carrying the headers of this request that are ready: complete WRITEs whose
        digest is known and whose header is unsent, then this WRITE's own if its digest is known."""
        try:
            w.handle = self.agent.make_prepped_xfer("WRITE", local_dl, local_idx, remote_dl, remote_idx)
        except Exception as e:  # nixlRemoteDisconnectError and friends
            self._lost(out, f"NIXL WRITE to {out.dest.receiver} could not be created: {e}")
            return False
        carried = [x for x in out.pending if x.done and not x.header_sent and x.digests.ready(x.index)]
        if w.digests.ready(w.index):
            carried.append(w)
        notif = b"".join(x.encoded_header() for x in carried)
        try:
            state = self.agent.transfer(w.handle, notif) if notif else self.agent.transfer(w.handle)
        except Exception as e:
            state, err = "ERR", str(e)
        else:
            err = "post failed"
        if state == "ERR":
            self._release(w.handle)
            self._lost(out, f"NIXL WRITE to {out.dest.receiver}: {err}")
            return False
        for x in carried:
            x.header_sent = True  # NIXL sends the notification once this WRITE is complete
        w.done = state == "DONE"
        out.pending.append(w)
        # forget finished WRITEs (their handles go back to NIXL); keep the ones still owed a header
        while out.pending and out.pending[0].done and out.pending[0].header_sent:
            self._release(out.pending.pop(0).handle)
        return True

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
        """Drive ``out``'s WRITEs in order: once one is complete, send its header if no later WRITE
        carried it (waiting for its digest, which the hashing thread is finishing), then let it go."""
        while out.pending and not out.error:
            w: _Write = out.pending[0]
            if not w.done:
                try:
                    state = self.agent.check_xfer_state(w.handle)
                except Exception:
                    state = "ERR"
                if state == "PROC":
                    break
                if state == "ERR":
                    self._lost(out, f"NIXL WRITE to {out.dest.receiver} failed (receiver gone?)")
                    break
                w.done = True
            if not w.header_sent:
                remote = self._remotes.get(out.dest.receiver)
                try:
                    if remote is None:
                        raise KVTransferError("receiver forgotten")
                    self.agent.send_notif(remote.name, w.encoded_header())
                except Exception as e:
                    self._lost(out, f"notification to {out.dest.receiver} failed: {e}")
                    break
                w.header_sent = True
            out.pending.pop(0)
            self._release(w.handle)

    def _lost(self, out: Outgoing, error: str) -> None:
        """The receiver is unreachable: fail the request and forget the agent, so that a new
        receiver under a new name can be reached later."""
        out.error = error
        remote = self._remotes.pop(out.dest.receiver, None)
        if remote is not None:
            self._forget(remote)

    def _forget(self, remote: _Remote) -> None:
        for dl in [remote.dlist, *remote.slices.values()]:
            with contextlib.suppress(Exception):
                self.agent.release_dlist_handle(dl)
        remote.slices.clear()
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
        for dl in [self._local, *self._local_slices.values()]:
            with contextlib.suppress(Exception):
                self.agent.release_dlist_handle(dl)
        self.agent.deregister_memory(self._reg)
