"""The model's matrix multiplies: ``F.linear`` on the mapped weights, or a CPU kernel on prepacked ones.

On a CPU, torch's ``F.linear`` goes to MKL, which on this project's machines (AMD EPYC, AVX2) takes
a generic path that is slow for the small row counts of a decode step (8-32 rows). Two faster paths
pack each weight once at load:

- ``cpu``: ``engine/kernels/cpu_gemm.c``, an AVX2/FMA kernel compiled on first use. On the bench
  model's projections with the weights streamed from DRAM (``tandem bench kernels``): 1.43x
  oneDNN's speed at 16 rows (a decode step), 1.08-1.12x at 512 (a prefill chunk).
- ``onednn``: torch's bundled oneDNN with the weight reordered into its blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, what inductor does when it freezes a CPU model).

Both are *batch invariant*: an output row does not depend on how many rows share the call (checked
in tests); in the C kernel by construction, since every output is one chain of FMAs over k in order,
whatever the blocking or thread count. So a request's logits do not change with the batch it lands
in (MKL's do: a 1-row and a 64-row call differ in the last bits), and a decode worker computes the
same floats as a single process that mixes the request with prefill chunks.

``backend``: ``auto`` (``cpu`` for fp32 on an AVX2/FMA CPU where the kernel builds, else ``onednn``
where torch has it, else ``torch``), ``torch`` (``F.linear``, the reference whose fp32 logits equal
transformers' bit for bit), ``onednn`` or ``cpu``. The packed copy replaces the mapped weight in the
matmul; the mapped tensor stays for everything else (tied embeddings, tests).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.kernels.native import NativeLibrary
from engine.quant.weight import Weight

Linear = Callable[[torch.Tensor], torch.Tensor]

_MC, _NR = 48, 16  # cpu_gemm.c's row chunk (scratch rows per thread) and panel width


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.tandem_gemm_supported.argtypes, lib.tandem_gemm_supported.restype = [], i
    lib.tandem_gemm_pack_f32.argtypes, lib.tandem_gemm_pack_f32.restype = [p, i64, i64, p], None
    lib.tandem_gemm_f32.argtypes = [p, i64, i64, p, i64, i64, p, p, p, i]
    lib.tandem_gemm_f32.restype = i


# the kernel's arithmetic is its intrinsics: no -ffast-math
GEMM = NativeLibrary(
    "cpu_gemm.c", ("-O3", "-march=native", "-fopenmp", f"-DMC={_MC}"), _declare, includes=("gemm_micro.h",)
)


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_gemm_available() -> bool:
    lib = GEMM.load()
    return lib is not None and bool(lib.tandem_gemm_supported())


def resolve(backend: str, dtype: torch.dtype, device: torch.device) -> str:
    if backend not in ("auto", "torch", "onednn", "cpu"):
        raise ValueError(f"linear backend must be 'auto', 'torch', 'onednn' or 'cpu', got {backend!r}")
    fp32_cpu = device.type == "cpu" and dtype == torch.float32
    if backend == "auto":
        if fp32_cpu and cpu_gemm_available():
            return "cpu"
        return "onednn" if fp32_cpu and onednn_available() else "torch"
    if backend == "onednn" and not (device.type == "cpu" and onednn_available()):
        raise ValueError("linear backend 'onednn' needs CPU tensors and a torch built with oneDNN")
    if backend == "cpu" and not (fp32_cpu and cpu_gemm_available()):
        why = GEMM.load_error or "this CPU has no AVX2/FMA"
        raise ValueError(f"linear backend 'cpu' needs fp32 CPU tensors and the C kernel ({why})")
    return backend


def make_linear(weight: Weight, bias: torch.Tensor | None, backend: str) -> Linear:
    """``x (T, in) -> (T, out)`` with ``weight (out, in)``; ``backend`` already resolved. A quantized
    weight goes to its linear method (``engine.quant.method``): packed bytes, dequantized in the
    kernel."""
    if not isinstance(weight, torch.Tensor):
        from engine.quant.method import make_quant_linear

        return make_quant_linear(weight, bias, backend)
    if backend == "torch":
        return lambda x: F.linear(x, weight, bias)
    if backend == "cpu":
        return _cpu_linear(weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    op = torch.ops.mkldnn._linear_pointwise

    def linear(x: torch.Tensor) -> torch.Tensor:
        return op(x, packed, bias, "none", [], "")

    return linear


class PackedLinear:
    """``x (T, k) -> (T, n)`` on ``cpu_gemm.c`` over fp32 weights packed once into its panels. Its
    fields are what ``engine.kernels.cpu_decode`` hands the same kernel from C."""

    kind, qtype = 0, 0  # cpu_decode.c's linear kinds: 0 fp32 panels, 1 quantized panels

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        lib = GEMM.load()
        assert lib is not None, GEMM.load_error
        self.n, self.k = n, k = weight.shape
        w = weight.detach().to(torch.float32).contiguous()
        self.packed = torch.empty(-(-n // _NR) * _NR * k, dtype=torch.float32)
        lib.tandem_gemm_pack_f32(w.data_ptr(), n, k, self.packed.data_ptr())
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self._gemm = lib.tandem_gemm_f32

    @staticmethod
    def scratch_floats(m: int, threads: int) -> int:
        return threads * _MC * _NR

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.n, self.k
        if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32 or x.stride(1) != 1:
            raise ValueError(f"expected fp32 (T, {k}) with contiguous rows, got {x.dtype} {tuple(x.shape)}")
        m, threads = x.shape[0], torch.get_num_threads()
        y = torch.empty(m, n, dtype=torch.float32)
        if m:
            scratch = torch.empty(threads * _MC * _NR, dtype=torch.float32)
            self._gemm(
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


def _cpu_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    return PackedLinear(weight, bias)
