"""The linear-method seam: how a projection whose weight is quantized is multiplied, and the choice
between running quantized checkpoints natively and dequantizing them at load.

``quantized_weights`` (engine option, ``--quantized-weights``, YAML ``engine.quantized_weights``):

- ``native``: the packed bytes stay the weights (a GGUF file's are a view of the mapped file). On a
  CPU in fp32 with the ``cpu`` linear backend they go to the C kernel (engine/quant/cpu_kernels.py),
  on CUDA to the Triton kernel (engine/quant/triton_kernels.py); anywhere else each call
  dequantizes with the torch reference and runs ``F.linear`` (exact, slow: a reference, not a path
  to serve from);
- ``dequantize``: what Tandem did before: every weight dequantized at load to the run dtype, then
  the dense backends. The reference the native path is tested against;
- ``auto`` (default): ``native`` where a kernel serves it, else ``dequantize``.

On the C backend both give the same logits bit for bit; elsewhere to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.quant import cpu_kernels
from engine.quant.fp8 import FP8Weight
from engine.quant.ggml import GGMLWeight
from engine.quant.weight import Weight, is_quantized

Linear = Callable[[torch.Tensor], torch.Tensor]
MODES = ("auto", "native", "dequantize")


def resolve_mode(mode: str, linear_backend: str, dtype: torch.dtype, device: torch.device) -> str:
    """``native`` or ``dequantize`` for ``mode``, given the resolved dense linear backend."""
    if mode not in MODES:
        raise ValueError(f"quantized_weights must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "native" if has_kernel(linear_backend, dtype, device) else "dequantize"


def has_kernel(linear_backend: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether quantized weights get a kernel of their own (rather than the per-call reference)."""
    if device.type == "cuda":
        from engine.quant.triton_kernels import triton_available

        return triton_available()
    return linear_backend == "cpu" and dtype == torch.float32 and cpu_kernels.available()


def make_quant_linear(weight: Weight, bias: torch.Tensor | None, linear_backend: str) -> Linear:
    """``x (T, in) -> (T, out)`` for a quantized ``weight (out, in)``; ``linear_backend`` is the
    model's resolved dense backend (``cpu`` only for fp32 on a CPU)."""
    assert is_quantized(weight) and not isinstance(weight, torch.Tensor)
    device = weight.device
    if device.type == "cpu" and linear_backend == "cpu" and cpu_kernels.available() and cpu_supports(weight):
        return cpu_kernels.quant_linear(cpu_pack(weight), bias)
    if device.type == "cuda" and has_kernel(linear_backend, torch.float32, device):
        from engine.quant.triton_kernels import triton_linear, triton_supports

        if triton_supports(weight):
            return triton_linear(weight, bias)
    w = weight

    def reference(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w.dequantize(x.dtype), bias)  # exactly the dequantized path's weights

    return reference


def cpu_supports(weight: Weight) -> bool:
    """Whether the C kernel runs this format and shape (FP8: blocks of 128 columns)."""
    if isinstance(weight, GGMLWeight):
        return weight.qtype in cpu_kernels.TYPE_CODES
    if isinstance(weight, FP8Weight):
        return weight.block[1] % 128 == 0 and weight.shape[1] % 128 == 0
    return False


def cpu_pack(weight: Weight) -> cpu_kernels.PackedMatrix:
    """``weight``'s bytes repacked into the C kernel's panels (a copy of the quantized bytes)."""
    if isinstance(weight, GGMLWeight):
        n, k = weight.shape
        return cpu_kernels.pack(weight.qtype, weight.data, n, k)
    if isinstance(weight, FP8Weight):
        n, k = weight.shape
        q, scales = weight.per_128_columns()
        return cpu_kernels.pack("fp8_e4m3", q.view(torch.uint8), n, k, scales, weight.block[0])
    raise TypeError(f"no CPU kernel for {type(weight).__name__}")


def cat_rows(parts: list[Weight]) -> Weight | None:
    """The parts' rows one after another, for a fused q/k/v or gate/up matmul: every output is the
    same dot product as in the separate ones. None where the parts do not concatenate (another
    GGML type each, or FP8 parts that split a scale block): the caller multiplies them apart."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)  # type: ignore[arg-type]
    if all(isinstance(p, GGMLWeight) for p in parts):
        gg = [p for p in parts if isinstance(p, GGMLWeight)]
        if len({(p.qtype, p.shape[1]) for p in gg}) == 1:
            return GGMLWeight.cat(gg)
    if all(isinstance(p, FP8Weight) for p in parts):
        f8 = [p for p in parts if isinstance(p, FP8Weight)]
        if FP8Weight.can_cat(f8):
            return FP8Weight.cat(f8)
    return None


def embedding(w: Weight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows ``ids`` (T,) of the embedding, (T, hidden) in ``dtype``, a fresh tensor: a quantized
    table dequantizes only those rows (the same floats as a lookup in the dequantized table)."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    return w.embedding(ids).to(dtype)
