"""The model's matrix multiplies: ``F.linear`` on the mapped weights, or oneDNN on prepacked ones.

On a CPU, torch's ``F.linear`` goes to MKL, which on this project's machines (AMD EPYC, AVX2) takes
a generic path that is slow for the small row counts of a decode step (8-32 rows). oneDNN, which
ships inside torch, JITs its kernels for the CPU it finds; with the weight reordered once into its
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what torch's own inductor does when it
freezes a CPU model) a 16-row projection of the ``bench`` model takes ~0.25 ms against ~0.35 ms.
A second property matters as much: each output row of the packed oneDNN matmul does not depend on
how many rows share the call (checked in tests), so a request's logits do not change with the batch
it lands in. MKL's do (a 1-row and a 64-row call differ in the last bits).

``backend``: ``auto`` (oneDNN for fp32 on CPU when torch was built with it, else ``torch``),
``torch`` (``F.linear``, the reference whose fp32 logits equal transformers' bit for bit), or
``onednn``. The packed copy replaces the mapped weight in the matmul; the mapped tensor stays for
everything else (tied embeddings, tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve(backend: str, dtype: torch.dtype, device: torch.device) -> str:
    if backend not in ("auto", "torch", "onednn"):
        raise ValueError(f"linear backend must be 'auto', 'torch' or 'onednn', got {backend!r}")
    if backend == "auto":
        fits = device.type == "cpu" and dtype == torch.float32 and onednn_available()
        return "onednn" if fits else "torch"
    if backend == "onednn" and not (device.type == "cpu" and onednn_available()):
        raise ValueError("linear backend 'onednn' needs CPU tensors and a torch built with oneDNN")
    return backend


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> Linear:
    """``x (T, in) -> (T, out)`` with ``weight (out, in)``; ``backend`` already resolved."""
    if backend == "torch":
        return lambda x: F.linear(x, weight, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    op = torch.ops.mkldnn._linear_pointwise

    def linear(x: torch.Tensor) -> torch.Tensor:
        return op(x, packed, bias, "none", [], "")

    return linear
