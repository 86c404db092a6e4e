"""Compiles this package's kernels for NVIDIA targets with the Triton wheel's own ptxas, no GPU needed.

The interpreter accepts programs the GPU compiler rejects (and says nothing of shared memory), so
this is the check that the GPU path builds at all on a machine without one::

    TRITON_INTERPRET=0 python -m engine.kernels.compile_check --arch 80 90

It must run with TRITON_INTERPRET unset or 0: kernels defined under the interpreter cannot be
compiled. Prints one line per (kernel, configuration, arch) with the shared memory it needs; exits
1 if any configuration fails to compile or needs more than ``--max-shared`` bytes.
"""

from __future__ import annotations

import argparse
import sys

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from engine.kernels import kv_write, paged_attention
from engine.quant import triton_kernels

_ATTN_PTRS = ("out_ptr", "q_ptr", "kv_ptr")
_INDEX_PTRS = ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr")


def _signature(fn: object, dtype: str, consts: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:  # type: ignore[attr-defined]
        if name in consts:
            sig[name] = "constexpr"
        elif name in _ATTN_PTRS or name in ("k_ptr", "v_ptr"):
            sig[name] = f"*{dtype}"
        elif name in _INDEX_PTRS:
            sig[name] = "*i32"
        elif name == "slot_ptr":
            sig[name] = "*i64"
        elif name == "scale_log2e":
            sig[name] = "fp32"
        elif name in ("x_ptr", "y_ptr", "bias_ptr"):  # the quantized linear's activations
            sig[name] = f"*{dtype}"
        elif name == "w_ptr":
            sig[name] = "*u8"
        elif name == "s_ptr":
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
    return sig


Config = tuple[str, object, str, dict[str, object], int]
# the quantized linear: every format as served (bf16), fp32 once
_QUANT: list[Config] = [
    (
        f"quant linear {fmt} {dt} {bm}x64x64",
        triton_kernels._quant_linear_kernel,
        dt,
        dict[str, object](QTYPE=code, HAS_BIAS=False, FP32=dt == "fp32", BLOCK_M=bm, BLOCK_N=64)
        | {"BLOCK_K": 64, "FP8_BN": 128, "FP8_BK": 128},
        4,
    )
    for fmt, code in triton_kernels.QTYPES.items()
    for dt, bm in (("bf16", 16), ("fp32", 64))
    if dt == "bf16" or fmt == "Q4_1"
]
# (label, kernel, pointer dtype, constexprs, num_warps): the configurations the wrappers launch
_CONFIGS: list[Config] = [
    (
        "decode bf16 group8 d128 n16",
        paged_attention._paged_decode_kernel,
        "bf16",
        {"GROUP": 8, "GROUP_PAD": 8, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_N": 16},
        8,
    ),
    (
        "decode fp32 group1 d64 n64",
        paged_attention._paged_decode_kernel,
        "fp32",
        {"GROUP": 1, "GROUP_PAD": 1, "HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_N": 64},
        4,
    ),
    (
        "prefill bf16 group4 d128 64x32",
        paged_attention._paged_prefill_kernel,
        "bf16",
        {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 64, "BLOCK_N": 32, "UPCAST": False}
        | {"PRECISION": None},
        8,
    ),
    (
        "prefill fp16 group1 d96 64x32",
        paged_attention._paged_prefill_kernel,
        "fp16",
        {"GROUP": 1, "HEAD_DIM": 96, "BLOCK_D": 128, "BLOCK_M": 64, "BLOCK_N": 32, "UPCAST": False}
        | {"PRECISION": None},
        8,
    ),
    (
        "prefill fp32 group4 d128 32x32 ieee",
        paged_attention._paged_prefill_kernel,
        "fp32",
        {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": 32, "BLOCK_N": 32, "UPCAST": False}
        | {"PRECISION": "ieee"},
        8,
    ),
    (
        "kv_write i16 d128 h8",
        kv_write._kv_write_kernel,
        "i16",
        {"HEAD_DIM": 128, "BLOCK_D": 128, "H_PAD": 8},
        4,
    ),
    *_QUANT,
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compile the Triton kernels for NVIDIA targets")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    p.add_argument("--max-shared", type=int, default=99 * 1024, help="bytes (sm_86/89 have 99 KiB)")
    args = p.parse_args(argv)
    failed = 0
    for arch in args.arch:
        for label, kernel, dtype, consts, warps in _CONFIGS:
            if not hasattr(kernel, "arg_names"):
                print("kernels were defined under TRITON_INTERPRET=1: run with TRITON_INTERPRET=0")
                return 1
            src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, consts), constexprs=consts)
            try:
                compiled = compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            except Exception as exc:  # report every configuration, not only the first failure
                print(f"FAIL sm_{arch} {label}: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            shared = int(compiled.metadata.shared)
            ok = shared <= args.max_shared
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} sm_{arch} {label}: shared {shared} B, {warps} warps")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
