"""Times the Triton attention backend against the torch reference on the same paged batch.

    .venv/bin/python benchmarks/bench_attention.py                 # GPU if there is one
    .venv/bin/python benchmarks/bench_attention.py --decode-seqs 64 --context 2048 --dtype bfloat16

Prints per-call times of write_kv, decode-only and prefill-only forward for both backends and the
ratio torch/triton, plus the decode kernel's effective KV read bandwidth. Without a GPU the kernels
run in the Triton interpreter (TRITON_INTERPRET=1, set here before Triton is imported): the figures
then only show the interpreter's cost, and the default sizes shrink to keep it short.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.attention import AttentionMetadata, TorchAttention  # noqa: E402
from engine.kernels.triton_backend import TritonAttention  # noqa: E402
from engine.kv_layout import torch_dtype  # noqa: E402


def _time(fn: Callable[[], object], device: str, iters: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _batch(
    query_lens: list[int], seq_lens: list[int], args: argparse.Namespace, device: str
) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Metadata over shuffled blocks, a random pool, q (T, H_q, D), k and v (T, H_kv, D)."""
    bs, dtype = args.block_size, torch_dtype(args.dtype)
    need = [-(-n // bs) for n in seq_lens]
    perm = torch.randperm(sum(need)).tolist()
    tables, used = [], 0
    for nb in need:
        tables.append(perm[used : used + nb])
        used += nb
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, device=device)
    kv = torch.randn(sum(need), 2, args.kv_heads, bs, args.head_dim, device=device).to(dtype)
    t = sum(query_lens)
    q = torch.randn(t, args.q_heads, args.head_dim, device=device).to(dtype)
    k = torch.randn(t, args.kv_heads, args.head_dim, device=device).to(dtype)
    return meta, kv, q, k, k.clone()


def _bench_case(
    case: str, query_lens: list[int], seq_lens: list[int], args: argparse.Namespace, device: str
) -> None:
    ref, tri = TorchAttention(), TritonAttention()
    scale = args.head_dim**-0.5
    meta, kv, q, k, v = _batch(query_lens, seq_lens, args, device)
    slots = meta.slot_mapping
    ops = {
        "write_kv": (lambda: ref.write_kv(k, v, kv, slots), lambda: tri.write_kv(k, v, kv, slots)),
        "forward": (lambda: ref.forward(q, kv, meta, scale), lambda: tri.forward(q, kv, meta, scale)),
    }
    for op, (fr, ft) in ops.items():
        t_ref, t_tri = _time(fr, device, args.iters), _time(ft, device, args.iters)
        print(f"{case:<10}{op:<10}{t_ref * 1e3:>10.3f}{t_tri * 1e3:>11.3f}{t_ref / t_tri:>14.2f}")
        if case == "decode" and op == "forward":
            kv_bytes = 2 * sum(seq_lens) * args.kv_heads * args.head_dim * kv.element_size()
            print(f"  decode KV read: {kv_bytes / t_tri / 1e9:.2f} GB/s effective (triton)")
    out_ref, out_tri = ref.forward(q, kv, meta, scale), tri.forward(q, kv, meta, scale)
    print(f"  max |triton - torch| = {(out_ref.float() - out_tri.float()).abs().max().item():.3g}")


def main() -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode-seqs", type=int, default=64 if gpu else 4)
    p.add_argument("--context", type=int, default=2048 if gpu else 64, help="decode context length")
    p.add_argument("--prefill-seqs", type=int, default=4 if gpu else 1)
    p.add_argument("--prompt", type=int, default=1024 if gpu else 32, help="prefill chunk length")
    p.add_argument("--q-heads", type=int, default=32 if gpu else 4)
    p.add_argument("--kv-heads", type=int, default=8 if gpu else 2)
    p.add_argument("--head-dim", type=int, default=128 if gpu else 32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    p.add_argument("--iters", type=int, default=20 if gpu else 3)
    args = p.parse_args()
    device = "cuda" if gpu else "cpu"
    name = torch.cuda.get_device_name() if gpu else "CPU (Triton interpreter)"
    print(f"device: {name}; {args}")
    cases = {
        "decode": ([1] * args.decode_seqs, [args.context] * args.decode_seqs),
        "prefill": ([args.prompt] * args.prefill_seqs, [args.prompt] * args.prefill_seqs),
    }
    print(f"{'case':<10}{'op':<10}{'torch ms':>10}{'triton ms':>11}{'torch/triton':>14}")
    for case, (qls, sls) in cases.items():
        _bench_case(case, qls, sls, args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
