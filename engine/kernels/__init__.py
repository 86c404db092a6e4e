"""Triton kernels for paged attention and KV writes. On a machine with no GPU they run only through
the Triton interpreter: `TRITON_INTERPRET=1` must be set before this package is imported."""
