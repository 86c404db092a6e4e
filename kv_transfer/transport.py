"""The KVTransport seam: receiver and sender protocols, the destination handle, the poll results.

A decode worker owns a :class:`KVReceiver` over its KV pool; a prefill worker owns a
:class:`KVSender` over its own. The handoff (ARCHITECTURE.md, "The KV handoff")::

    decode                                   control channel           prefill
    rx = transport.receiver(kv, layout)
    dest = rx.reserve(rid, block_ids, L, deadline_s)  ──── dest (picklable) ────▶
                                                                      tx.send_layer(dest, l, src_ids)
                                                                      ... one call per layer, while
                                                                      later layers are computed ...
    rx.poll() -> [Completed(rid)] (digests checked)                   tx.finish(dest, timeout_s)
    (commit: the blocks belong to the decode worker)  ◀── ack ──────  returns; prefill frees its copy
    rx.release(rid)

Tensor-parallel workers hold some KV heads per rank: a sender then writes the heads it holds
(``HeadSlice``: its first head, the receiver's first head, how many) and the receiver is told at
``reserve`` which head ``parts`` of each block arrive apart; it commits once every part of every
block has been verified, and acks every sender that wrote to it.

Any failure (digest mismatch, deadline, dead peer) frees the receiver's reservation and surfaces as
``Failed`` from ``poll`` on the decode side and :class:`~kv_transfer.protocol.KVTransferError` from
``finish`` on the prefill side; both keep serving other requests.

A leaf: this module imports no backend. ``kv_transfer.factory.make_transport`` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class KVDestination:
    """Where a sender writes one request's KV: made by ``KVReceiver.reserve``, picklable.

    ``block_ids`` are the receiver's block ids in request order; the sender maps its own block ids
    onto them one to one. ``address`` is backend-specific (NIXL agent metadata, a ucxx worker
    address, an in-process registry key); for NIXL, ``base_addr`` / ``pool_blocks`` let the sender
    compute the remote address of any (layer, block) without asking.
    """

    backend: str
    request_id: str
    receiver: str  # the receiver's name (NIXL agent name, or a unique id)
    address: bytes
    block_ids: tuple[int, ...]
    num_layers: int
    dtype: str
    block_shape: tuple[int, int, int, int]  # (2, H_kv, B, D) of one layer's block
    layer_block_bytes: int
    pool_blocks: int = 0
    base_addr: int = 0
    mem_type: str = "DRAM"  # DRAM or VRAM
    device_id: int = 0
    deadline_s: float = 0.0  # the lease the receiver gave, in seconds from reservation

    @property
    def bytes_total(self) -> int:
        return self.num_layers * len(self.block_ids) * self.layer_block_bytes


@dataclass(frozen=True, slots=True)
class HeadSlice:
    """``count`` KV heads of every block: the sender's heads ``[src, src + count)`` go to the
    receiver's ``[dst, dst + count)``."""

    src: int
    dst: int
    count: int


@dataclass(frozen=True, slots=True)
class Completed:
    request_id: str
    nbytes: int


@dataclass(frozen=True, slots=True)
class Failed:
    request_id: str
    reason: str


class KVReceiver(Protocol):
    """Decode side. Lifecycle: construct (registers the pool) -> metadata() -> serve: reserve / poll /
    release -> drain (poll until no reservations) -> close(). ``close`` is idempotent; after it every
    other call raises. ``poll`` must be called regularly: it drives the transport, checks digests,
    commits, acks and expires leases."""

    name: str

    def metadata(self) -> bytes: ...

    def reserve(
        self,
        request_id: str,
        block_ids: list[int],
        num_layers: int,
        deadline_s: float,
        parts: tuple[tuple[int, int], ...] = (),
    ) -> KVDestination: ...

    def poll(self) -> list[Completed | Failed]: ...

    def release(self, request_id: str) -> None: ...

    @property
    def num_reserved_blocks(self) -> int: ...

    def close(self) -> None: ...


class KVSender(Protocol):
    """Prefill side. Lifecycle: construct (registers the pool) -> serve: send_layer* then finish per
    request -> close(). ``close`` is idempotent. ``send_layer`` returns once the transfer is posted;
    ``finish`` waits for the receiver's commit or raises KVTransferError within ``timeout_s``, after
    which nothing is left in flight for that request."""

    name: str

    def send_layer(
        self,
        dest: KVDestination,
        layer: int,
        src_block_ids: list[int],
        block_offset: int = 0,
        num_layers: int = 1,
        heads: HeadSlice | None = None,
    ) -> None: ...

    def finish(self, dest: KVDestination, timeout_s: float) -> int: ...

    @property
    def num_in_flight(self) -> int: ...

    def close(self) -> None: ...


class KVTransport(Protocol):
    """A backend: makes receivers and senders over a KV pool tensor ``(L, N, 2, H_kv, B, D)``."""

    backend: str
    transport: str

    def receiver(
        self, kv: torch.Tensor, capacity_blocks: int | None = None, max_requests: int = 1024
    ) -> KVReceiver: ...

    def sender(self, kv: torch.Tensor) -> KVSender: ...
