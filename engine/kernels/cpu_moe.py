"""The routed experts of a MoE layer in one C call (``cpu_moe.c``, over ``cpu_gemm.c``'s packed GEMM).

Each expert's gate/up (concatenated) and down weights are packed once at load, like every other
projection of the CPU linear backend (engine/linear.py); a call then runs every active expert's
rows through gate/up, SiLU * up, down and the routing weight without returning to Python between
experts (``engine.moe.GroupedExperts`` pays ~6 torch calls per active expert instead, which a
prefill step with dozens of active experts feels).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from engine.kernels.native import NativeLibrary
from engine.linear import _MC, _NR


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.tandem_moe_supported.argtypes, lib.tandem_moe_supported.restype = [], i
    lib.tandem_gemm_pack_f32.argtypes, lib.tandem_gemm_pack_f32.restype = [p, i64, i64, p], None
    lib.tandem_moe_f32.argtypes = [p, i64, i64, p, i64, p, p, i64, p, p, p, p, i]
    lib.tandem_moe_f32.restype = i


LIBRARY = NativeLibrary(
    "cpu_moe.c",
    ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", f"-DMC={_MC}"),
    _declare,
    includes=("cpu_gemm.c", "gemm_micro.h"),
)


def cpu_moe_available() -> bool:
    lib = LIBRARY.load()
    return lib is not None and bool(lib.tandem_moe_supported())


def _pack(lib: ctypes.CDLL, weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    w = weight.detach().to(torch.float32).contiguous()
    packed = torch.empty(-(-n // _NR) * _NR * k, dtype=torch.float32)
    lib.tandem_gemm_pack_f32(w.data_ptr(), n, k, packed.data_ptr())
    return packed


class CpuExperts:
    """``engine.moe.Experts`` for fp32 CPU tensors: every active expert in one ``tandem_moe_f32``."""

    def __init__(
        self, gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor], down: Sequence[torch.Tensor]
    ) -> None:
        lib = LIBRARY.load()
        if lib is None or not lib.tandem_moe_supported():
            raise RuntimeError(f"the CPU MoE kernel is unavailable: {LIBRARY.load_error or 'no AVX2/FMA'}")
        self.lib = lib
        self.inter, self.hidden = gate[0].shape if gate else (0, 0)
        self._gate_up = [_pack(lib, torch.cat([g, u])) for g, u in zip(gate, up, strict=True)]
        self._down = [_pack(lib, d) for d in down]
        self._gu_ptrs = torch.tensor([t.data_ptr() for t in self._gate_up], dtype=torch.int64)
        self._down_ptrs = torch.tensor([t.data_ptr() for t in self._down], dtype=torch.int64)

    def __call__(self, xs: torch.Tensor, counts: Sequence[int], w: torch.Tensor) -> torch.Tensor:
        p, h = xs.shape
        if len(counts) != len(self._gate_up) or sum(counts) != p:
            raise ValueError(f"{len(counts)} expert counts summing to {sum(counts)} for {p} rows")
        if xs.dtype != torch.float32 or h != self.hidden:
            raise ValueError(f"expected fp32 (P, {self.hidden}), got {xs.dtype} {tuple(xs.shape)}")
        xs, w = xs.contiguous(), w.to(torch.float32).contiguous()
        y = torch.empty(p, h, dtype=torch.float32)
        if p == 0:
            return y
        threads = torch.get_num_threads()
        hbuf = torch.empty(p, 2 * self.inter, dtype=torch.float32)
        scratch = torch.empty(threads * _MC * _NR, dtype=torch.float32)
        n = torch.tensor(list(counts), dtype=torch.int64)
        rc = self.lib.tandem_moe_f32(
            xs.data_ptr(),
            p,
            h,
            n.data_ptr(),
            len(counts),
            self._gu_ptrs.data_ptr(),
            self._down_ptrs.data_ptr(),
            self.inter,
            w.data_ptr(),
            y.data_ptr(),
            hbuf.data_ptr(),
            scratch.data_ptr(),
            threads,
        )
        if rc != 0:
            raise RuntimeError(f"tandem_moe_f32 failed ({rc})")
        return y
