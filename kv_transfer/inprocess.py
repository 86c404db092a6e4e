"""In-process transport for a colocated prefill/decode pair: a plain copy between two pools.

Same protocol and bookkeeping as the UCX backends (reservations, digests, acks, deadlines), with
the "wire" being a process-local registry: the sender copies its blocks straight into the
receiver's pool and hands the header to the receiver, which checks the digest on its next poll.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kv_transfer import protocol
from kv_transfer.base import BaseReceiver, BaseSender, Outgoing
from kv_transfer.protocol import KIND_ACK, Header
from kv_transfer.transport import HeadSlice, KVDestination

_RECEIVERS: dict[str, InProcessReceiver] = {}
_SENDERS: dict[str, InProcessSender] = {}


class InProcessTransport:
    backend = "inprocess"

    def __init__(self, transport: str = "auto") -> None:
        self.transport = transport

    def receiver(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> InProcessReceiver:
        return InProcessReceiver(kv, capacity_blocks, max_requests)

    def sender(self, kv: torch.Tensor) -> InProcessSender:
        return InProcessSender(kv)


class InProcessReceiver(BaseReceiver):
    backend = "inprocess"

    def __init__(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> None:
        super().__init__(kv, capacity_blocks, max_requests)
        self.inbox: list[tuple[str, Header]] = []
        _RECEIVERS[self.name] = self

    def metadata(self) -> bytes:
        return self.name.encode()

    def _progress(self) -> None:
        inbox, self.inbox = self.inbox, []
        for sender, h in inbox:
            self._on_data(h, sender, lambda regions, check: self.pool.digest(regions) if check else 0)

    def _send_ack(self, sender: str, request_id: str, status: int, text: str) -> None:
        s = _SENDERS.get(sender)
        if s is not None:
            s._on_ack(Header(KIND_ACK, request_id, status=status, text=text))

    def _shutdown(self) -> None:
        _RECEIVERS.pop(self.name, None)


class InProcessSender(BaseSender):
    backend = "inprocess"

    def __init__(self, kv: torch.Tensor) -> None:
        super().__init__(kv)
        self.corrupt_after_digest = False  # test hook: flip one copied byte after hashing
        _SENDERS[self.name] = self

    def _connect(self, dest: KVDestination) -> None:
        if dest.receiver not in _RECEIVERS:
            raise protocol.KVTransferError(f"receiver {dest.receiver} is not in this process (or is closed)")

    def _post(
        self,
        out: Outgoing,
        header: Header,
        layers: range,
        src: Sequence[int],
        dst: Sequence[int],
        heads: HeadSlice | None,
    ) -> None:
        rx = _RECEIVERS.get(out.dest.receiver)
        if rx is None:
            out.error = f"receiver {out.dest.receiver} closed"
            return
        p = self.pool
        src_regions = p.regions(layers, src, None if heads is None else (heads.src, heads.count))
        dig = p.digest(src_regions) if self.digests else 0
        ls = slice(layers.start, layers.stop)
        hs = slice(None) if heads is None else slice(heads.src, heads.src + heads.count)
        hd = slice(None) if heads is None else slice(heads.dst, heads.dst + heads.count)
        for s, d, n in protocol.paired_runs(src, dst):
            # (layers, n, 2, heads, B, D)
            rx.pool.kv[ls, d : d + n, :, hd].copy_(p.kv[ls, s : s + n, :, hs])
        if self.corrupt_after_digest:
            rx.pool.flat[rx.pool.regions(layers, dst, header.heads)[0][0]] ^= 0xFF
        rx.inbox.append((self.name, header.with_digest(dig)))

    def _progress(self) -> None:
        rx_names = {o.dest.receiver for o in self._out.values()}
        for name in rx_names:  # colocated: drive the receiver too, so finish() cannot wait on itself
            rx = _RECEIVERS.get(name)
            if rx is not None and not rx._closed:
                rx._progress()

    def _shutdown(self) -> None:
        _SENDERS.pop(self.name, None)
