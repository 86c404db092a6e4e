"""Building a KVTransport: the backend by name, and the UCX transport it runs over.

``make_transport(backend, transport)`` is the one place a backend module is imported, so the seam
(kv_transfer/transport.py) stays a leaf that every backend imports without a circle.

UCX transports are picked by configuration, through UCX environment variables set before the UCX
context is created (once per process): ``auto`` (UCX decides), ``shm`` (shared memory / CMA on one
host), ``tcp``, and on GPU hosts ``cuda_ipc`` (NVLink / PCIe peers on one node) and ``rc``
(InfiniBand / RoCE).
"""

from __future__ import annotations

import os

from kv_transfer.transport import KVTransport

TRANSPORTS = ("auto", "shm", "tcp", "cuda_ipc", "rc")
BACKENDS = ("nixl", "ucxx", "inprocess")

# UCX_TLS per (backend, transport). NIXL runs UCX with peer error handling, which excludes the
# posix/sysv shared-memory transports: its shared-memory path is CMA for data plus TCP for the
# active messages that carry notifications. ucxx endpoints here have error handling off, so "sm"
# (posix/sysv/cma) works for both data and control.
_UCX_TLS = {
    ("nixl", "shm"): "cma,tcp,self",
    ("nixl", "tcp"): "tcp,self",
    ("nixl", "cuda_ipc"): "cuda_ipc,cuda_copy,cma,tcp,self",
    ("nixl", "rc"): "rc,cuda_copy,tcp,self",
    ("ucxx", "shm"): "sm,self",
    ("ucxx", "tcp"): "tcp,self",
    ("ucxx", "cuda_ipc"): "cuda_ipc,cuda_copy,sm,self",
    ("ucxx", "rc"): "rc,cuda_copy,sm,self",
}


def ucx_env(backend: str, transport: str) -> dict[str, str]:
    """The UCX environment that selects ``transport`` for ``backend`` ({} for auto / in-process)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    tls = _UCX_TLS.get((backend, transport))
    return {} if tls is None else {"UCX_TLS": tls}


def make_transport(backend: str = "nixl", transport: str = "auto") -> KVTransport:
    """The transport for ``backend`` over ``transport``. For UCX backends this sets the process's UCX
    environment, so call it before any other UCX use in the process (and never before a fork)."""
    env = ucx_env(backend, transport)
    for k, v in env.items():
        os.environ[k] = v
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if backend == "nixl":
        from kv_transfer.nixl_backend import NixlTransport

        return NixlTransport(transport)
    if backend == "ucxx":
        from kv_transfer.ucxx_backend import UcxxTransport

        return UcxxTransport(transport)
    from kv_transfer.inprocess import InProcessTransport

    return InProcessTransport(transport)
