"""Benchmarks whose figures go into docs/benchmarks*.md, each a ``tandem`` subcommand (deploy/cli.py).

Each prints its figures and a ratio against a reference measured in the same run (never a timed
assertion in a test):

- ``bench_engine``        ``tandem bench engine``: output tok/s, Tandem's engine vs transformers
- ``bench_kernels``       ``tandem bench kernels``: the projections per linear backend
- ``bench_quant``         ``tandem bench quant``: a GGUF model natively vs dequantized, 1 and 16 streams,
  against the read roofline and llama.cpp's server (``llama_peer``: that server)
- ``bench_kv_quant``      ``tandem bench kv-quant``: a quantized KV cache's accuracy (greedy agreement,
  KL) and bytes against the fp32 one
- ``bench_prefix_cache``  ``tandem bench prefix-cache``: TTFT with a prefix in G1 / G2 / G3 vs uncached
- ``bench_pools``         ``tandem bench pools``: ITL colocated vs disaggregated
- ``bench_serve``         ``tandem bench serve``: a load generator against ``tandem serve``
  (``serve_workload``: the seeded workload; ``serve_report``: table, JSON, PNG)
- ``bench_kv_transfer``   ``tandem kv-bench``: paged-KV transfers vs the memcpy ceiling
  (``kv_transfer_peer``: its two spawned processes)
- ``bench_tiers``         ``tandem tier-bench``: G2 / G3 throughput vs memory copy / direct I/O
- ``bench_attention``     a script: the Triton attention kernels against the torch reference

They sit above every library package: nothing in the library imports them.
"""
