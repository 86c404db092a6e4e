"""Attention kernels. Triton kernels for paged attention and KV writes (``paged_attention``,
``kv_write``, ``triton_backend``): on a machine with no GPU they run only through the Triton
interpreter, and `TRITON_INTERPRET=1` must be set before those modules are imported. The CPU decode
kernel (``cpu_paged_decode.c``), the fused layer ops (``cpu_fused.c``) and the fp32 GEMM
(``cpu_gemm.c``) are C, compiled on first use by ``native``."""
