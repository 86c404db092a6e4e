"""``tandem bench kernels``: the model's projections under each linear backend, as a decode step and a
prefill chunk run them.

One pass is every layer's fused q/k/v, o, fused gate/up and down matmul of the checkpoint (the
``bench`` preset by default: 8 layers, ~100 MB of fp32 weights, more than the L3 cache, so the
weights stream from DRAM as in the engine), at a given number of rows. Each backend packs the same
weights; the table gives the median time of a pass, the GFLOPS, and the speed relative to
``torch`` (``F.linear``, MKL) and to ``onednn``, all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir (default: the 'bench' preset)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512], help="rows per matmul")
    p.add_argument("--reps", type=int, default=7, help="passes per backend and row count (median)")
    p.add_argument("--json", action="store_true")


def _one_pass(layers: list[Any], x: Any, xo: Any, xd: Any) -> None:
    for lin in layers:
        lin.qkv(x), lin.o(xo), lin.gate_up(x), lin.down(xd)


def run(args: argparse.Namespace) -> int:
    import torch

    from engine.config import ModelConfig
    from engine.demo import bench_model_dir
    from engine.kernels.native import describe_host
    from engine.linear import cpu_gemm_available, onednn_available
    from engine.model import _LayerLinears
    from engine.quant.weight import dense
    from engine.weights import load_weights

    model_dir = Path(args.model) if args.model else bench_model_dir()
    config = ModelConfig.from_pretrained(model_dir, "float32")
    weights = load_weights(model_dir, config)
    backends = (
        ["torch"] + (["onednn"] if onednn_available() else []) + (["cpu"] if cpu_gemm_available() else [])
    )
    flops_per_row = 2 * sum(
        dense(t, torch.float32).numel()
        for w in weights.layers
        for t in (w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.gate_proj, w.up_proj, w.down_proj)
        if t is not None
    )
    results: list[dict[str, Any]] = []
    for backend in backends:
        layers = [_LayerLinears.build(w, backend) for w in weights.layers]
        for rows in args.rows:
            x = torch.randn(rows, config.hidden_size)
            xo = torch.randn(rows, config.num_heads * config.head_dim)
            xd = torch.randn(rows, config.intermediate_size)

            _one_pass(layers, x, xo, xd)  # warm-up
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                _one_pass(layers, x, xo, xd)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            results.append(
                {"backend": backend, "rows": rows, "ms": ms, "gflops": flops_per_row * rows / ms / 1e6}
            )
            print(f"  {backend}: {rows} rows {ms:.2f} ms", file=sys.stderr)
    by_key = {(r["backend"], r["rows"]): r["ms"] for r in results}
    for r in results:
        r["vs_torch"] = by_key[("torch", r["rows"])] / r["ms"]
        r["vs_onednn"] = by_key[("onednn", r["rows"])] / r["ms"] if ("onednn", r["rows"]) in by_key else None
    host = describe_host()
    if args.json:
        threads = torch.get_num_threads()
        print(json.dumps({"model": str(model_dir), "threads": threads, "host": host, "results": results}))
        return 0
    print(
        f"projections of {model_dir.name}: {len(weights.layers)} layers, {flops_per_row / 2e6:.1f}M weights"
    )
    print(f"host: {host}")
    print(f"{'backend':<8} {'rows':>5} {'ms/pass':>9} {'GFLOPS':>8} {'vs torch':>9} {'vs onednn':>10}")
    for r in results:
        vs_onednn = f"{r['vs_onednn']:.2f}x" if r["vs_onednn"] is not None else "-"
        print(
            f"{r['backend']:<8} {r['rows']:>5} {r['ms']:>9.2f} {r['gflops']:>8.1f} "
            f"{r['vs_torch']:>8.2f}x {vs_onednn:>10}"
        )
    return 0
