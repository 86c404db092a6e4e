"""What every receiver and sender share: leases, verification bookkeeping, acks and deadlines.

A backend subclasses :class:`BaseReceiver` / :class:`BaseSender` and supplies only the moving parts:
how bytes and headers travel (``_progress``, ``_post``, ``_send_ack``, ``_connect``) and how a
payload is verified. The rules — one lease per request, every wait bounded by a deadline, a failure
frees the request's buffers and is reported, never raised into other requests — live here once.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer import protocol
from kv_transfer.pool import PoolView
from kv_transfer.protocol import (
    KIND_DATA,
    STATUS_FAILED,
    STATUS_NO_DIGEST,
    STATUS_OK,
    DeadlineExceededError,
    DigestMismatchError,
    Header,
    KVTransferError,
    Reservation,
    ReservationBook,
)
from kv_transfer.transport import Completed, Failed, HeadSlice, KVDestination

# Failed requests a receiver remembers, so a sender whose pieces arrive after the failure (another
# tensor-parallel rank of the same prefill) is told at once instead of waiting out its ack timeout.
_REMEMBERED_FAILURES = 1024


def idle(spins: int) -> None:
    """Back off in a polling loop after ``spins`` empty rounds: a few quick polls (latency), then
    short sleeps. Not ``sched_yield``: a yielding thread stays runnable, and on two cores a
    busy-polling receiver (or a sender waiting for its ack) takes the core that the peer's copy and
    the hashing thread need — measured, the sender's digest thread then ran only when the copy was
    preempted. A sleep of tens of microseconds costs little against a multi-megabyte WRITE."""
    if spins > 64:
        time.sleep(_IDLE_SLEEP_S)
    elif spins > 16:
        os.sched_yield()


_IDLE_SLEEP_S = 20e-6  # ~70-100 us in practice (timer slack)


def unique_name(role: str) -> str:
    return f"kv-{role}-{uuid.uuid4().hex[:12]}"


class BaseReceiver:
    """Decode side. Lifecycle: construct -> metadata() -> reserve / poll / release -> close().

    ``poll`` drives the transport, verifies each arriving message's digest before recording it,
    commits a request when every (layer, block) has arrived (returning ``Completed`` and acking the
    sender), and fails a request on a digest mismatch or when its lease deadline passes (returning
    ``Failed``, freeing its reservation and telling the sender if it is known). ``close`` is
    idempotent; calls after it raise.
    """

    backend = "base"

    def __init__(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> None:
        self.pool = PoolView(kv)
        self.name = unique_name("recv")
        self.book = ReservationBook(self.pool.num_blocks, capacity_blocks, max_requests)
        self.require_digest = True  # False only to measure the protocol without integrity (bench)
        # Test seam (chaos tests): request id -> how many more of its arriving payloads get one byte
        # flipped in the destination pool before their digest is checked, as if damaged in flight.
        # Empty unless a test fills it (DecodeWorker.corrupt_next_payload).
        self.corrupt_next: dict[str, int] = {}
        self.corrupted = 0  # payloads the seam damaged
        self.digest_mismatches = 0  # payloads refused for a digest mismatch (requests failed so)
        self._results: list[Completed | Failed] = []
        self._failed: OrderedDict[str, str] = OrderedDict()  # request id -> why, most recent last
        self._closed = False

    # -- backend hooks
    def metadata(self) -> bytes:
        raise NotImplementedError

    def _progress(self) -> None:
        raise NotImplementedError

    def _send_ack(self, sender: str, request_id: str, status: int, text: str) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        pass

    # -- public
    def reserve(
        self,
        request_id: str,
        block_ids: list[int],
        num_layers: int,
        deadline_s: float,
        parts: tuple[tuple[int, int], ...] = (),
    ) -> KVDestination:
        self._check_open()
        if num_layers != self.pool.num_layers:
            raise ValueError(f"{num_layers} layers asked, pool has {self.pool.num_layers}")
        if any(h < 0 or n < 1 or h + n > self.pool.num_heads for h, n in parts):
            raise ValueError(f"head parts {list(parts)} outside the pool's {self.pool.num_heads} KV heads")
        if parts and sum(n for _, n in parts) != self.pool.num_heads:
            raise ValueError(
                f"head parts {list(parts)} do not cover the pool's {self.pool.num_heads} KV heads"
            )
        self._failed.pop(request_id, None)
        self.book.reserve(request_id, block_ids, num_layers, time.monotonic() + deadline_s, parts)
        p = self.pool
        return KVDestination(
            backend=self.backend,
            request_id=request_id,
            receiver=self.name,
            address=self.metadata(),
            block_ids=tuple(block_ids),
            num_layers=num_layers,
            dtype=p.dtype,
            block_shape=p.block_shape,
            layer_block_bytes=p.layer_block_bytes,
            pool_blocks=p.num_blocks,
            base_addr=p.base_addr,
            mem_type=p.mem_type,
            device_id=p.device_id,
            deadline_s=deadline_s,
        )

    def poll(self) -> list[Completed | Failed]:
        self._check_open()
        self._progress()
        for r in self.book.expired(time.monotonic()):
            missing = len(r.missing)
            self._fail(
                r, f"deadline passed with {missing} (layer, block) pieces missing: sender dead or stalled"
            )
        out, self._results = self._results, []
        return out

    def release(self, request_id: str) -> None:
        """The caller takes the blocks (after Completed) or gives up the lease (cancel)."""
        self.book.drop(request_id)

    @property
    def num_reserved_blocks(self) -> int:
        return self.book.num_reserved_blocks

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for rid in self.book.request_ids:
            self.book.drop(rid)
        self._shutdown()

    def __enter__(self) -> BaseReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared message handling
    def _check_open(self) -> None:
        if self._closed:
            raise KVTransferError(f"receiver {self.name} is closed")

    def _on_data(
        self, h: Header, sender: str, verify: Callable[[list[tuple[int, int]], bool], int | None]
    ) -> None:
        """Handle one DATA header from ``sender``; ``verify(dst_regions, check)`` returns the
        payload's actual digest (0 when ``check`` is False), after which the bytes are in place."""
        r = self.book.get(h.request_id)
        if r is None or r.committed:
            # late message for a failed, released or finished request: drop it, and tell a sender
            # that has not heard of the failure yet (its pieces came after it)
            why = self._failed.get(h.request_id)
            if r is None and why is not None:
                with contextlib.suppress(Exception):
                    self._send_ack(sender, h.request_id, STATUS_FAILED, why)
            return
        if sender not in r.senders:
            r.senders.append(sender)
        try:
            self.book.check(r, h, self.pool.num_heads)
            p = self.pool
            if h.dtype != p.dtype or (h.block_shape[0], *h.block_shape[2:]) != (
                p.block_shape[0],
                *p.block_shape[2:],
            ):
                raise KVTransferError(
                    f"{h.request_id}: payload is {h.dtype} {h.block_shape}, pool is {p.dtype} {p.block_shape}"
                )
            dst = r.block_ids[h.block_start : h.block_start + h.num_blocks]
            regions = p.regions(range(h.layer, h.layer + h.num_layers), dst, h.heads)
            check = h.status != STATUS_NO_DIGEST
            if not check and self.require_digest:
                raise KVTransferError(f"{h.request_id}: payload without a digest refused")
            if self.corrupt_next.get(h.request_id, 0) > 0 and regions:
                self.corrupt_next[h.request_id] -= 1
                self.corrupted += 1
                p.flat[regions[0][0]] ^= 0xFF
            actual = verify(regions, check)
            if not check:
                actual = h.digest
        except KVTransferError as e:
            self._fail(r, str(e))
            return
        if actual != h.digest:
            self.digest_mismatches += 1
            got = "unreadable" if actual is None else f"{actual:#018x}"
            last = h.block_start + h.num_blocks - 1
            self._fail(
                r,
                f"digest mismatch on layer {h.layer} blocks {h.block_start}..{last}: "
                f"header {h.digest:#018x}, payload {got}",
            )
            return
        if self.book.record(r, h):
            r.committed = True
            self._results.append(
                Completed(r.request_id, r.num_layers * len(r.block_ids) * self.pool.layer_block_bytes)
            )
            for s in r.senders:
                self._send_ack(s, r.request_id, STATUS_OK, "")

    def _fail(self, r: Reservation, reason: str) -> None:
        self.book.drop(r.request_id)
        self._results.append(Failed(r.request_id, reason))
        self._failed[r.request_id] = reason
        while len(self._failed) > _REMEMBERED_FAILURES:
            self._failed.popitem(last=False)
        for s in r.senders:
            with contextlib.suppress(Exception):  # the sender may be the one that died
                self._send_ack(s, r.request_id, STATUS_FAILED, reason)


@dataclass(slots=True)
class Outgoing:
    """A request being sent: what is still in flight and whether it already failed."""

    dest: KVDestination
    pending: list[Any] = field(default_factory=list)  # backend handles, in posting order
    messages: int = 0
    error: str = ""


class BaseSender:
    """Prefill side. Lifecycle: construct -> send_layer* / finish per request -> close().

    ``send_layer`` posts one message (a layer, or ``num_layers`` layers, of a range of the
    destination's blocks) and returns without waiting; ``finish`` drives the transport until the
    receiver acks the commit, and raises :class:`KVTransferError` on a failure ack, a transport
    error, or ``timeout_s`` (dead or stalled receiver). Either way nothing is left in flight for
    the request afterwards. ``close`` is idempotent.
    """

    backend = "base"

    def __init__(self, kv: torch.Tensor) -> None:
        self.pool = PoolView(kv)
        self.name = unique_name("send")
        self.digests = True  # False only to measure the protocol without integrity (bench)
        self._out: dict[str, Outgoing] = {}
        self._acks: dict[str, Header] = {}
        self._closed = False

    # -- backend hooks
    def _connect(self, dest: KVDestination) -> None:
        raise NotImplementedError

    def _post(
        self,
        out: Outgoing,
        header: Header,
        layers: range,
        src: Sequence[int],
        dst: Sequence[int],
        heads: HeadSlice | None,
    ) -> None:
        """Move the payload; ``heads`` None: whole blocks, else that slice of each block's heads."""
        raise NotImplementedError

    def _progress(self) -> None:
        """Advance pending sends (sending headers of finished writes) and collect acks into _acks."""
        raise NotImplementedError

    def _abandon(self, out: Outgoing) -> None:
        """Drop whatever is still pending for ``out`` (the request failed)."""
        out.pending.clear()

    def _shutdown(self) -> None:
        pass

    # -- public
    def send_layer(
        self,
        dest: KVDestination,
        layer: int,
        src_block_ids: list[int],
        block_offset: int = 0,
        num_layers: int = 1,
        heads: HeadSlice | None = None,
    ) -> None:
        """Post ``num_layers`` layers of ``src_block_ids`` (all their KV heads, or the ``heads``
        slice) to the destination's blocks from ``block_offset`` on."""
        if self._closed:
            raise KVTransferError(f"sender {self.name} is closed")
        p = self.pool
        (_, dst_heads, *dst_bd), (_, src_heads, *src_bd) = dest.block_shape, p.block_shape
        if heads is not None and heads == HeadSlice(0, 0, src_heads) and dst_heads == src_heads:
            heads = None  # every head: the whole-block path
        if dest.dtype != p.dtype or dst_bd != src_bd or (heads is None and dst_heads != src_heads):
            raise ValueError(
                f"destination holds {dest.dtype} {dest.block_shape}, source is {p.dtype} {p.block_shape}"
            )
        if heads is not None and not (
            heads.count >= 1
            and heads.src >= 0
            and heads.src + heads.count <= src_heads
            and heads.dst >= 0
            and heads.dst + heads.count <= dst_heads
        ):
            raise ValueError(f"{heads} outside source heads {src_heads} / destination heads {dst_heads}")
        if block_offset < 0 or block_offset + len(src_block_ids) > len(dest.block_ids):
            raise ValueError(
                f"blocks {block_offset}+{len(src_block_ids)} outside the {len(dest.block_ids)} reserved"
            )
        if layer < 0 or layer + num_layers > min(dest.num_layers, p.num_layers):
            raise ValueError(f"layers {layer}+{num_layers} outside 0..{dest.num_layers - 1}")
        out = self._out.get(dest.request_id)
        if out is None:
            out = self._out[dest.request_id] = Outgoing(dest)
        if out.error:
            raise KVTransferError(f"{dest.request_id}: {out.error}")
        try:
            self._connect(dest)
        except Exception as e:
            self._out.pop(dest.request_id, None)
            raise KVTransferError(f"{dest.request_id}: cannot reach receiver {dest.receiver}: {e}") from e
        count = src_heads if heads is None else heads.count
        header = Header(
            KIND_DATA,
            dest.request_id,
            layer=layer,
            num_layers=num_layers,
            block_start=block_offset,
            num_blocks=len(src_block_ids),
            dtype=p.dtype,
            block_shape=(p.block_shape[0], count, *src_bd),  # type: ignore[arg-type]
            payload_bytes=num_layers * len(src_block_ids) * p.layer_block_bytes * count // src_heads,
            status=STATUS_OK if self.digests else STATUS_NO_DIGEST,
            head_start=0 if heads is None else heads.dst,
        )
        dst = dest.block_ids[block_offset : block_offset + len(src_block_ids)]
        self._post(out, header, range(layer, layer + num_layers), src_block_ids, dst, heads)
        out.messages += 1
        self._progress()
        if out.error:
            self._abandon(out)
            self._out.pop(dest.request_id, None)
            raise KVTransferError(f"{dest.request_id}: {out.error}")

    def finish(self, dest: KVDestination, timeout_s: float) -> int:
        """Wait for the receiver's commit; returns the number of messages the request took."""
        rid = dest.request_id
        out = self._out.get(rid)
        if out is None:
            raise KVTransferError(f"{rid}: nothing was sent")
        deadline = time.monotonic() + timeout_s
        spins = 0
        try:
            while True:
                spins += 1
                idle(spins)
                self._progress()
                ack = self._acks.pop(rid, None)
                if ack is not None:
                    if ack.status == STATUS_OK:
                        return out.messages
                    kind = DigestMismatchError if ack.text.startswith("digest mismatch") else KVTransferError
                    raise kind(f"{rid}: receiver failed the handoff: {ack.text}")
                if out.error:
                    raise KVTransferError(f"{rid}: {out.error}")
                if time.monotonic() > deadline:
                    raise DeadlineExceededError(
                        f"{rid}: no commit from receiver {dest.receiver} within {timeout_s:.1f} s "
                        f"({len(out.pending)} sends still pending): receiver dead or stalled"
                    )
        finally:
            self._abandon(out)
            self._out.pop(rid, None)

    def flush(self, dest: KVDestination, timeout_s: float) -> None:
        """Wait until every message posted for ``dest`` has left this side (not for the commit)."""
        out = self._out.get(dest.request_id)
        deadline = time.monotonic() + timeout_s
        spins = 0
        while out is not None and out.pending and not out.error:
            spins += 1
            idle(spins)
            self._progress()
            if time.monotonic() > deadline:
                raise DeadlineExceededError(f"{dest.request_id}: sends still pending after {timeout_s:.1f} s")

    @property
    def num_in_flight(self) -> int:
        """Requests started and not yet finished (0 after every finish, success or not)."""
        return len(self._out)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for out in self._out.values():
            self._abandon(out)
        self._out.clear()
        self._shutdown()

    def __enter__(self) -> BaseSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_ack(self, h: Header) -> None:
        if h.request_id in self._out:
            self._acks[h.request_id] = h


__all__ = ["BaseReceiver", "BaseSender", "Outgoing", "protocol", "unique_name"]
