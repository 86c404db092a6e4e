"""What a stored weight is to the model: a dense tensor, or a quantized one kept in its packed form.

``QuantizedWeight`` is the protocol every quantized format follows (GGUF blocks in
``engine.quant.ggml``, block-scaled FP8 in ``engine.quant.fp8``). Its ``dequantize`` is the
*reference*: the exact floats every kernel that multiplies by the packed bytes must use, so that a
quantized matmul and ``F.linear`` over the dequantized matrix are comparable bit for bit (on the
C backend, where both sum in the same order) or to fp32 rounding elsewhere.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class QuantizedWeight(Protocol):
    """A (out, in) matrix stored packed. Immutable: every method returns a new value."""

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the logical matrix."""
        ...

    @property
    def format(self) -> str:
        """The storage format's name, e.g. ``Q4_1`` or ``fp8_e4m3/128x128``."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes a full matmul reads: the packed data and its scales."""
        ...

    @property
    def device(self) -> torch.device: ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: the (out, in) matrix as fp32, cast to ``dtype`` after."""
        ...

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (T,) dequantized, (T, in) fp32: an embedding lookup that dequantizes only
        the rows it reads."""
        ...

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows [start, stop) (a tensor-parallel shard, or a part of a fused projection)."""
        ...

    def to(self, device: str | torch.device) -> QuantizedWeight: ...


# What engine.weights hands the model for a projection or the embedding.
Weight = torch.Tensor | QuantizedWeight


def is_quantized(w: object) -> bool:
    return isinstance(w, QuantizedWeight) and not isinstance(w, torch.Tensor)


def dense(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """``w`` as a dense ``dtype`` tensor: a quantized weight's reference dequantization, cast."""
    if isinstance(w, torch.Tensor):
        return w.to(dtype)
    return w.dequantize(dtype)


def weight_nbytes(w: Weight) -> int:
    """Bytes a matmul by ``w`` reads."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes
