"""Moving paged KV blocks between processes: the KVTransport seam and its UCX implementations.

- ``transport``: the seam (KVReceiver / KVSender / KVTransport protocols, KVDestination,
  Completed / Failed); a leaf that imports no backend;
- ``factory``: ``make_transport(backend, transport)``, the one place a backend is chosen, and the
  UCX environment that picks its transport;
- ``protocol``: headers, block-run coalescing, digests, the receiver's reservation book, the errors
  (pure);
- ``heads``: which tensor-parallel rank sends which KV heads to which rank, and whether two
  workers' layouts can exchange KV at all (pure);
- ``pool``: a KV pool tensor's bytes as the backends address them (whole blocks or head slices);
- ``base``: the lifecycle, deadline and ack rules every backend shares;
- ``nixl_backend`` (default), ``ucxx_backend``, ``inprocess``: the three implementations.

``tandem kv-bench`` lives in benchmarks/. This package imports nothing on import (import the module
you need); the backends load torch and UCX when made.
"""
