"""Moving paged KV blocks between processes: the KVTransport seam and its UCX implementations.

- ``transport``: the seam (KVReceiver / KVSender / KVTransport protocols, KVDestination,
  Completed / Failed) and ``make_transport(backend, transport)``;
- ``protocol``: headers, block-run coalescing, digests, the receiver's reservation book (pure);
- ``base``: the lifecycle, deadline and ack rules every backend shares;
- ``nixl_backend`` (default), ``ucxx_backend``, ``inprocess``: the three implementations;
- ``bench`` / ``bench_worker``: ``tandem kv-bench``.

Importing this package loads neither torch nor UCX; the backends load them when made.
"""

from kv_transfer.protocol import DeadlineExceededError, DigestMismatchError, KVTransferError, NoRoomError
from kv_transfer.transport import (
    Completed,
    Failed,
    KVDestination,
    KVReceiver,
    KVSender,
    KVTransport,
    make_transport,
)

__all__ = [
    "Completed",
    "DeadlineExceededError",
    "DigestMismatchError",
    "Failed",
    "KVDestination",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "KVTransport",
    "NoRoomError",
    "make_transport",
]
