"""MLA decode on the CPU, fp32, in C: the absorbed query and output projections as grouped GEMMs (one
group per head, ``cpu_moe.c`` over ``cpu_gemm.c``'s packed, batch-invariant GEMM) and the attention
over the paged latents (``cpu_mla_decode.c``, read in place).

Why: the torch path (engine/mla.py ``_decode``) batches decode sequences into padded bmm calls whose
summation order depends on the batch, so a request's logits changed in the last bits with the
other sequences of its step; here each (sequence, head) is computed the same way whatever shares
the step, as the dense models' CPU kernels do, and no gather copies the latents.
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu_moe import LIBRARY as GEMMS
from engine.kernels.cpu_moe import cpu_moe_available
from engine.kernels.native import NativeLibrary
from engine.linear import _MC, _NR


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.tandem_mla_decode_f32.argtypes = [p, p, p, i64, p, p, p, i64, i, i, i, i, i, f, i, i]
    lib.tandem_mla_decode_f32.restype = None


KERNEL = NativeLibrary("cpu_mla_decode.c", ("-O3", "-march=native", "-ffast-math", "-fopenmp"), _declare)


def cpu_mla_available() -> bool:
    return KERNEL.load() is not None and cpu_moe_available()


class GroupedGemm:
    """y[g] = x[g] @ W[g]^T for every group g in one C call; the weights packed once."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        lib = GEMMS.load()
        assert lib is not None
        lib.tandem_grouped_gemm_f32.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
        ]
        lib.tandem_grouped_gemm_f32.argtypes += [
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
        ]
        lib.tandem_grouped_gemm_f32.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        lib.tandem_grouped_gemm_f32.restype = ctypes.c_int
        self.lib = lib
        self.n, self.k = weights[0].shape
        self._packed = []
        for weight in weights:
            w = weight.detach().to(torch.float32).contiguous()  # alive through the call
            packed = torch.empty(-(-self.n // _NR) * _NR * self.k, dtype=torch.float32)
            lib.tandem_gemm_pack_f32(w.data_ptr(), self.n, self.k, packed.data_ptr())
            self._packed.append(packed)
        self._ptrs = torch.tensor([t.data_ptr() for t in self._packed], dtype=torch.int64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, G, >= K) with rows and groups strided (the first K values of each are used) ->
        (G, M, N)."""
        m, g = x.shape[0], x.shape[1]
        if g != len(self._packed) or x.dtype != torch.float32 or x.stride(2) != 1 or x.shape[2] < self.k:
            raise ValueError(
                f"expected fp32 (M, {len(self._packed)}, >= {self.k}), got {x.dtype} {tuple(x.shape)}"
            )
        y = torch.empty(g, m, self.n, dtype=torch.float32)
        if m:
            threads = torch.get_num_threads()
            scratch = torch.empty(threads * _MC * _NR, dtype=torch.float32)
            rc = self.lib.tandem_grouped_gemm_f32(
                x.data_ptr(),
                x.stride(1),
                x.stride(0),
                m,
                self._ptrs.data_ptr(),
                g,
                self.n,
                self.k,
                y.data_ptr(),
                scratch.data_ptr(),
                threads,
            )
            if rc != 0:
                raise RuntimeError(f"tandem_grouped_gemm_f32 failed ({rc})")
        return y


def mla_decode(
    q: torch.Tensor,  # (S, H, L) the absorbed queries, fp32 contiguous
    lat: torch.Tensor,  # (N, B, L) the layer's latent pool, contiguous
    tables: torch.Tensor,  # (S, W) int32
    seq_lens: torch.Tensor,  # (S,) int32
    seq_lens_list: list[int],
    r: int,
    scale: float,
) -> torch.Tensor:
    """(S, H, R) = softmax(q . lat) @ lat[:, :R], per (sequence, head), in C."""
    lib = KERNEL.load()
    assert lib is not None, KERNEL.load_error
    s, h, lw = q.shape
    threads = max(1, torch.get_num_threads())
    group = h if s >= threads else max(1, -(-h // max(1, threads // s)))  # enough items for the threads
    stride = group * (max(seq_lens_list) + 1)
    scratch = torch.empty(threads, stride, dtype=torch.float32)
    out = torch.empty(s, h, r, dtype=torch.float32)
    tables = tables.to(torch.int32)
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    lens = seq_lens.to(torch.int32).contiguous()  # alive through the call
    if (
        not (q.is_contiguous() and lat.is_contiguous())
        or q.dtype != torch.float32
        or lat.dtype != torch.float32
    ):
        raise ValueError("q and the latent pool must be contiguous fp32")
    lib.tandem_mla_decode_f32(
        q.data_ptr(),
        lat.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        lens.data_ptr(),
        out.data_ptr(),
        scratch.data_ptr(),
        stride,
        s,
        h,
        lat.shape[1],
        lw,
        r,
        scale,
        group,
        threads,
    )
    return out
