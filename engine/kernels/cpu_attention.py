"""The CPU attention backend: paged decode attention read in place by a small C kernel.

On a CPU the torch reference path (engine/attention.py) has to gather every decoding sequence's K/V
blocks into a new tensor, once per layer and step, before it can call a matmul: the decode step pays
the KV bytes three times (read, write, read again). ``cpu_paged_decode.c`` reads each sequence's
blocks where they lie, once for K and once for V, for all query heads of a GQA group at a time. It
is compiled on first use with the machine's C compiler (``cc -O3 -march=native``, ~0.3 s) into
``$TANDEM_HOME/kernels/`` under a name that hashes the source, the flags and the compiler, and
loaded through ctypes. The (sequence, KV head) work items are shared among torch's intra-op thread
count with OpenMP: the object links libgomp by its soname, so in a process that imported torch it
joins torch's own OpenMP runtime and threads. (A second pool of Python threads, tried first, fought
torch's spinning OpenMP workers for the same cores: two threads were no faster than one inside the
engine, against 1.4x faster in isolation.)

Prefill chunks, bf16/fp16 and non-CPU tensors take the torch reference path unchanged. Without a C
compiler (or if the build fails) the backend logs why once and the reference path does everything.
"""

from __future__ import annotations

import ctypes

import torch

from engine.attention import AttentionMetadata, TorchAttention
from engine.kernels.native import NativeLibrary

_MAX_GROUP = 64  # query heads per KV head; the kernel keeps one 1/sum per head on its stack


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.tandem_paged_decode_f32
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [p, p, p, i64, p, p, p, i64, i, i, i, i, ctypes.c_float, i, i, i]
    fn.restype = None
    q = lib.tandem_paged_decode_q  # the same over a quantized pool (engine/kv_quant.py)
    q.argtypes = [p, p, p, i64, p, p, p, i64, i, i, i, i, ctypes.c_float, i, i, i, i]
    q.restype = None


KERNEL = NativeLibrary("cpu_paged_decode.c", ("-O3", "-march=native", "-ffast-math", "-fopenmp"), _declare)


def paged_decode_quantized(
    q: torch.Tensor,  # (S, H_q, D) fp32, contiguous
    kv_layer: torch.Tensor,  # (N, 2, H_kv, B, D + 4) uint8: codes and a scale per row (engine/kv_quant.py)
    block_tables: torch.Tensor,  # (S, W) int32
    seq_lens: torch.Tensor,  # (S,) int32
    seq_lens_list: list[int],
    scale: float,
    out: torch.Tensor,  # (S, H_q, D) fp32
    kind: str,  # fp8_e4m3 | int8
    threads: int | None = None,
) -> None:
    """Decode attention over a quantized pool, each block's rows dequantized as they are read."""
    lib = KERNEL.load()
    if lib is None:
        raise RuntimeError(f"CPU decode kernel unavailable: {KERNEL.load_error}")
    s, hq, d = q.shape
    _, _, h, b, row = kv_layer.shape
    if row != d + 4 or kv_layer.dtype != torch.uint8 or not kv_layer.is_contiguous():
        raise ValueError(
            f"expected a contiguous uint8 pool of rows {d} + 4, got {kv_layer.dtype} {tuple(kv_layer.shape)}"
        )
    if hq % h or hq // h > _MAX_GROUP or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError("bad heads or block tables for the quantized decode kernel")
    g = hq // h
    split = work_split(s * h, g, threads or torch.get_num_threads())
    threads = max(1, min(threads or torch.get_num_threads(), s * h * split))
    width = g * max(seq_lens_list)
    scratch = torch.empty(threads, width + b * d, dtype=torch.float32)
    lib.tandem_paged_decode_q(
        q.data_ptr(),
        kv_layer.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
        out.data_ptr(),
        scratch.data_ptr(),
        width,
        hq,
        h,
        b,
        d,
        scale,
        s * h * split,
        split,
        threads,
        {"fp8_e4m3": 0, "int8": 1}[kind],
    )


def work_split(items: int, group: int, threads: int) -> int:
    """Into how many parts each (sequence, KV head) item's query heads are cut: one where the items
    already keep every thread busy, else up to the group size (one sequence of SmolLM2 is 3 items
    of 3 query heads: 9 items share 2 threads 5 / 4 instead of 2 / 1). Results do not depend on it."""
    if threads <= 1 or items >= 4 * threads:
        return 1
    return max(1, min(group, -(-4 * threads // items)))


def paged_decode(
    q: torch.Tensor,  # (S, H_q, D) fp32, contiguous
    kv_layer: torch.Tensor,  # (N, 2, H_kv, B, D) fp32, contiguous
    block_tables: torch.Tensor,  # (S, W) int32, rows contiguous
    seq_lens: torch.Tensor,  # (S,) int32
    seq_lens_list: list[int],
    scale: float,
    out: torch.Tensor,  # (S, H_q, D) fp32, contiguous
    threads: int | None = None,
) -> None:
    """Decode attention of S one-token queries into ``out``, with the C kernel (which must load)."""
    lib = KERNEL.load()
    if lib is None:
        raise RuntimeError(f"CPU decode kernel unavailable: {KERNEL.load_error}")
    s, hq, d = q.shape
    _, _, h, b, _ = kv_layer.shape
    if hq % h or hq // h > _MAX_GROUP:
        raise ValueError(
            f"query heads {hq} must be a multiple of KV heads {h}, at most {_MAX_GROUP} per KV head"
        )
    for name, t in (("q", q), ("kv_layer", kv_layer), ("out", out), ("seq_lens", seq_lens)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if block_tables.stride(1) != 1 or block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32 with contiguous rows")
    g = hq // h
    split = work_split(s * h, g, threads or torch.get_num_threads())
    threads = max(1, min(threads or torch.get_num_threads(), s * h * split))
    width = g * max(seq_lens_list)
    scratch = torch.empty(threads, width, dtype=torch.float32)
    lib.tandem_paged_decode_f32(
        q.data_ptr(),
        kv_layer.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
        out.data_ptr(),
        scratch.data_ptr(),
        width,
        hq,
        h,
        b,
        d,
        scale,
        s * h * split,
        split,
        threads,
    )


class CpuAttention(TorchAttention):
    """The torch reference, with fp32 decode rows on CPU tensors sent to the C kernel."""

    def __init__(self) -> None:
        self.kernel = KERNEL.load() is not None

    def _decode(
        self,
        q: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        if not (
            self.kernel and q.dtype == torch.float32 and q.device.type == "cpu" and kv_layer.dtype == q.dtype
        ):
            super()._decode(q, kv_layer, meta, scale, out)
            return
        first, t0 = meta.num_prefill_seqs, meta.num_prefill_tokens
        rows = out[t0:]  # decode rows are the tail of the flat batch: contiguous
        paged_decode(
            q[t0:].contiguous(),
            kv_layer,
            meta.block_tables[first:],
            meta.seq_lens[first:],
            meta.seq_lens_list[first:],
            scale,
            rows,
        )
