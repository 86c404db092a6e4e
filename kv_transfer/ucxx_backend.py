"""ucxx transport: two-sided tag messages; the sender packs, the receiver verifies and scatters.

One message per ``send_layer``::

    ┌──────────────── message (tag DATA) ────────────────┐
    │ header (protocol.Header, text = sender name) │ pad │ payload: layer-major, block order │
    └────────────────────────────────────────────────────┘   payload = last payload_bytes bytes

The receiver probes its worker for DATA messages from any sender, receives each into a scratch
buffer on its pool's device, checks the digest and scatters the payload into the reserved blocks.
Endpoints are made from worker addresses with error handling off — the only way ucxx uses shared
memory (MEASURED.md) — so a dead peer is never reported by UCX: the deadlines in base.py are what
detect it. Everything is driven by ``worker.progress()`` from ``poll`` / ``send_layer`` /
``finish``: no progress thread (slower on 2 cores), no asyncio.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kv_transfer.base import BaseReceiver, BaseSender, Outgoing
from kv_transfer.pool import tensor_digest
from kv_transfer.protocol import KIND_ACK, KIND_DATA, KIND_HELLO, Header, KVTransferError
from kv_transfer.transport import HeadSlice, KVDestination

TAG_HELLO = 0x4B5654_01
TAG_DATA = 0x4B5654_02
TAG_ACK = 0x4B5654_03
_ALIGN = 64  # payload starts on a cache line
_RECV_TIMEOUT_S = 2.0  # + 20 ms per MB: a matched message must finish within this


def _ucx() -> Any:
    from ucxx._lib import libucxx

    return libucxx


def _array(t: torch.Tensor) -> Any:
    from ucxx._lib.arr import Array

    return Array(t if t.is_cuda else t.numpy())


class _Worker:
    """One UCX context and worker, polled by its owner."""

    def __init__(self) -> None:
        ucx = _ucx()
        self.ucx = ucx
        self.ctx = ucx.UCXContext(feature_flags=(ucx.Feature.TAG,))
        self.worker = ucx.UCXWorker(self.ctx)
        self.address: bytes = bytes(self.worker.address.tobytes())
        self.endpoints: dict[str, Any] = {}
        self._sends: list[tuple[Any, Any]] = []  # small control sends kept alive until complete

    def endpoint(self, key: str, address: bytes) -> Any:
        ep = self.endpoints.get(key)
        if ep is None:
            addr = self.ucx.UCXAddress.create_from_buffer(np.frombuffer(address, dtype=np.uint8))
            ep = self.ucx.UCXEndpoint.create_from_worker_address(self.worker, addr, False)
            self.endpoints[key] = ep
        return ep

    def send_small(self, key: str, tag: int, payload: bytes) -> None:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        req = self.endpoints[key].tag_send(_array(buf), self.ucx.UCXXTag(tag))
        self._sends.append((req, buf))

    def progress(self) -> None:
        self.worker.progress()
        self._sends = [(r, b) for r, b in self._sends if not r.completed]

    def probe(self, tag: int) -> Any | None:
        res = self.worker.tag_probe(self.ucx.UCXXTag(tag), remove=True)
        return res if res.matched else None

    def recv(self, probe: Any, buf: torch.Tensor, timeout_s: float = _RECV_TIMEOUT_S) -> None:
        import time

        req = self.worker.tag_recv_with_handle(_array(buf), probe)
        deadline = time.monotonic() + timeout_s
        while not req.completed:
            self.worker.progress()
            if time.monotonic() > deadline:
                raise KVTransferError(f"a {probe.length}-byte message did not finish within {timeout_s} s")
        req.check_error()

    def recv_small(self, probe: Any) -> bytes:
        buf = torch.empty(probe.length, dtype=torch.uint8)
        self.recv(probe, buf)
        return bytes(buf.numpy())

    def close(self) -> None:
        for ep in self.endpoints.values():
            with contextlib.suppress(Exception):
                ep.close()
        self.endpoints.clear()


class UcxxTransport:
    backend = "ucxx"

    def __init__(self, transport: str = "auto") -> None:
        self.transport = transport

    def receiver(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> UcxxReceiver:
        return UcxxReceiver(kv, capacity_blocks, max_requests)

    def sender(self, kv: torch.Tensor) -> UcxxSender:
        return UcxxSender(kv)


class UcxxReceiver(BaseReceiver):
    backend = "ucxx"

    def __init__(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> None:
        super().__init__(kv, capacity_blocks, max_requests)
        self.w = _Worker()
        self._scratch = torch.empty(0, dtype=torch.uint8, device=kv.device)
        self._abandoned: list[torch.Tensor] = []

    def metadata(self) -> bytes:
        return self.w.address

    def _progress(self) -> None:
        self.w.progress()
        while (p := self.w.probe(TAG_HELLO)) is not None:
            try:
                msg = self.w.recv_small(p)
                h, n = Header.decode(msg)
            except Exception:
                continue  # sender died mid-message, or not our message
            self.w.endpoint(h.text, msg[n:])
        while (p := self.w.probe(TAG_DATA)) is not None:
            if self._scratch.numel() < p.length:
                self._scratch = torch.empty(p.length, dtype=torch.uint8, device=self._scratch.device)
            buf = self._scratch[: p.length]
            try:
                self.w.recv(p, buf, timeout_s=_RECV_TIMEOUT_S + p.length / 50e6)
            except Exception:
                # sender died mid-message: its request fails at its lease deadline. UCX may still
                # hold the scratch buffer, so it is never reused.
                self._abandoned.append(self._scratch)
                self._scratch = torch.empty(0, dtype=torch.uint8, device=self._scratch.device)
                continue
            try:
                h, _ = Header.decode(bytes(buf[:4096].cpu().numpy()))
            except KVTransferError:
                continue
            payload = buf[p.length - h.payload_bytes :]

            def verify(
                regions: list[tuple[int, int]], check: bool, payload: torch.Tensor = payload, h: Header = h
            ) -> int:
                if sum(n for _, n in regions) != payload.numel():
                    raise KVTransferError(f"payload of {payload.numel()} bytes for regions of another size")
                actual = tensor_digest(payload) if check else 0
                if actual == h.digest or not check:  # only verified bytes reach the blocks
                    self.pool.scatter(regions, payload)
                return actual

            self._on_data(h, h.text, verify)

    def _send_ack(self, sender: str, request_id: str, status: int, text: str) -> None:
        if sender in self.w.endpoints:
            self.w.send_small(
                sender, TAG_ACK, Header(KIND_ACK, request_id, status=status, text=text[:1000]).encode()
            )
            self.w.progress()

    def _shutdown(self) -> None:
        self.w.close()


@dataclass(slots=True)
class _Send:
    req: Any
    buf: torch.Tensor  # kept alive until UCX is done with it


class UcxxSender(BaseSender):
    backend = "ucxx"

    def __init__(self, kv: torch.Tensor) -> None:
        super().__init__(kv)
        self.w = _Worker()
        self._free: dict[int, list[torch.Tensor]] = {}  # reusable pack buffers by size
        self._zombies: list[_Send] = []  # sends of failed requests: UCX may still read them
        self.corrupt_after_digest = False  # test hook: flip one payload byte after hashing it

    def _connect(self, dest: KVDestination) -> None:
        if dest.receiver in self.w.endpoints:
            return
        self.w.endpoint(dest.receiver, dest.address)
        self.w.send_small(
            dest.receiver, TAG_HELLO, Header(KIND_HELLO, "", text=self.name).encode() + self.w.address
        )

    def _buffer(self, size: int) -> torch.Tensor:
        free = self._free.get(size)
        if free:
            return free.pop()
        return torch.empty(size, dtype=torch.uint8, device=self.pool.kv.device)

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
        regions = p.regions(layers, src, None if heads is None else (heads.src, heads.count))
        hlen = len(header.with_digest(0, self.name).encode())
        start = -(-hlen // _ALIGN) * _ALIGN
        buf = self._buffer(start + header.payload_bytes)
        payload = buf[start:]
        p.pack(regions, payload)
        dig = tensor_digest(payload) if self.digests else 0
        if self.corrupt_after_digest:
            payload[0] ^= 0xFF
        hdr = header.with_digest(dig, self.name).encode()
        buf[: len(hdr)].copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
        req = self.w.endpoints[out.dest.receiver].tag_send(_array(buf), self.w.ucx.UCXXTag(TAG_DATA))
        out.pending.append(_Send(req, buf))

    def _progress(self) -> None:
        self.w.progress()
        for out in self._out.values():
            while out.pending and out.pending[0].req.completed:
                s: _Send = out.pending.pop(0)
                try:
                    s.req.check_error()
                except Exception as e:
                    out.error = f"ucxx send to {out.dest.receiver} failed: {e}"
                self._free.setdefault(s.buf.numel(), []).append(s.buf)
        self._zombies = [z for z in self._zombies if not z.req.completed]
        while (pr := self.w.probe(TAG_ACK)) is not None:
            h, _ = Header.decode(self.w.recv_small(pr))
            if h.kind == KIND_ACK:
                self._on_ack(h)

    def _abandon(self, out: Outgoing) -> None:
        self._zombies.extend(out.pending)
        out.pending.clear()

    def _shutdown(self) -> None:
        self.w.close()
        self._free.clear()


__all__ = ["KIND_DATA", "UcxxReceiver", "UcxxSender", "UcxxTransport"]
