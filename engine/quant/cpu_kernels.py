"""The C kernels that multiply by quantized weights on a CPU (``engine/kernels/cpu_quant_gemm.c``).

``pack`` repacks a GGUF (or FP8) matrix once into 16-row panels of the same quantized fields
(the layout is drawn in the C file); ``quant_linear`` returns the ``Linear`` that multiplies by
them, dequantizing 16 rows x 256 k at a time in L1 and running cpu_gemm.c's own micro-kernel over
them. No fp32 copy of the matrix exists at any time, and every output equals, bit for bit, the fp32
C GEMM over the reference dequantization (``engine.quant.ggml`` / ``engine.quant.fp8``): the same
floats, summed in the same order (tests/unit/test_quant_kernels.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from engine.kernels.native import NativeLibrary

# C type codes (cpu_quant_gemm.c's enum) and the k one dequantized panel block spans
TYPE_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "fp8_e4m3": 6}
_QKB, _NR = 256, 16


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.tandem_quant_supported.argtypes, lib.tandem_quant_supported.restype = [], i
    lib.tandem_quant_packed_bytes.argtypes, lib.tandem_quant_packed_bytes.restype = [i, i64, i64], i64
    lib.tandem_quant_pack.argtypes = [i, p, i64, i64, i64, p, i64, p]
    lib.tandem_quant_pack.restype = i
    lib.tandem_quant_unpack.argtypes, lib.tandem_quant_unpack.restype = [i, p, i64, i64, p], i
    lib.tandem_quant_gemm.argtypes = [i, p, i64, i64, p, i64, i64, p, p, p, i]
    lib.tandem_quant_gemm.restype = i


# a multiply and an add must stay two roundings, as numpy's: no FMA contraction, no fast-math
LIBRARY = NativeLibrary(
    "cpu_quant_gemm.c",
    ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", f"-DQKB={_QKB}"),
    _declare,
    includes=("gemm_micro.h", "quant_dequant.h"),
)


def available() -> bool:
    """Whether the kernel builds and runs here (AVX2/FMA/F16C or AVX-512)."""
    lib = LIBRARY.load()
    return lib is not None and bool(lib.tandem_quant_supported())


class PackedMatrix:
    """A (n, k) quantized matrix repacked into the kernel's panels (uint8), with its type."""

    def __init__(self, fmt: str, n: int, k: int, data: torch.Tensor) -> None:
        self.fmt, self.n, self.k, self.data = fmt, n, k, data
        self.code = TYPE_CODES[fmt]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def unpack(self) -> torch.Tensor:
        """The fp32 panels the kernel multiplies by, (ceil(n/16), k, 16): cpu_gemm.c's packed
        layout of the dequantized matrix (tests compare it with packing the reference)."""
        lib = _lib()
        out = torch.empty(-(-self.n // _NR), self.k, _NR, dtype=torch.float32)
        if lib.tandem_quant_unpack(self.code, self.data.data_ptr(), self.n, self.k, out.data_ptr()):
            raise ValueError(f"cannot unpack {self.fmt} ({self.n}, {self.k})")
        return out


def _lib() -> ctypes.CDLL:
    lib = LIBRARY.load()
    if lib is None or not lib.tandem_quant_supported():
        raise RuntimeError(f"the quantized CPU kernel is unavailable: {LIBRARY.load_error or 'no AVX2/FMA'}")
    return lib


def pack(
    fmt: str,
    rows: torch.Tensor,  # (n, bytes per row) uint8: GGUF block rows, or FP8 e4m3 bytes (n, k)
    n: int,
    k: int,
    scales: torch.Tensor | None = None,  # FP8: (ceil(n / block_rows), k / 128) fp32
    block_rows: int = 0,
) -> PackedMatrix:
    lib = _lib()
    code = TYPE_CODES[fmt]
    size = int(lib.tandem_quant_packed_bytes(code, n, k))
    if size < 0:
        raise ValueError(f"{fmt}: a row of {k} weights is not a whole number of blocks")
    src = rows if rows.stride(-1) == 1 else rows.contiguous()
    sc = None if scales is None else scales.to(torch.float32).contiguous()
    out = torch.empty(size, dtype=torch.uint8)
    rc = lib.tandem_quant_pack(
        code,
        src.data_ptr(),
        src.stride(0),
        n,
        k,
        None if sc is None else sc.data_ptr(),
        block_rows,
        out.data_ptr(),
    )
    if rc:
        raise ValueError(f"cannot pack {fmt} ({n}, {k})")
    return PackedMatrix(fmt, n, k, out)


class QuantLinear:
    """``x (T, k) fp32 -> (T, n) fp32``: x @ W^T (+ bias) straight from a ``PackedMatrix``. Its fields
    are what ``engine.kernels.cpu_decode`` hands the same kernel from C."""

    kind = 1  # cpu_decode.c's linear kinds: 0 fp32 panels, 1 quantized panels

    def __init__(self, packed: PackedMatrix, bias: torch.Tensor | None) -> None:
        self.matrix = packed
        self.n, self.k, self.qtype, self.packed = packed.n, packed.k, packed.code, packed.data
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self._gemm = _lib().tandem_quant_gemm

    @staticmethod
    def scratch_floats(m: int, threads: int) -> int:
        return threads * (_QKB + m) * _NR

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.n, self.k
        if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32 or x.stride(1) != 1:
            raise ValueError(f"expected fp32 (T, {k}) with contiguous rows, got {x.dtype} {tuple(x.shape)}")
        m, threads = x.shape[0], torch.get_num_threads()
        y = torch.empty(m, n, dtype=torch.float32)
        if m:
            scratch = torch.empty(self.scratch_floats(m, threads), dtype=torch.float32)
            self._gemm(
                self.qtype,
                x.data_ptr(),
                x.stride(0),
                m,
                self.packed.data_ptr(),
                n,
                k,
                None if self.bias is None else self.bias.data_ptr(),
                y.data_ptr(),
                scratch.data_ptr(),
                threads,
            )
        return y


def quant_linear(packed: PackedMatrix, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (T, k) fp32 -> (T, n) fp32``: x @ W^T (+ bias) straight from the packed matrix."""
    return QuantLinear(packed, bias)
