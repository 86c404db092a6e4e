"""A GGUF file's quantized tensors kept as their block bytes (``weights: native``).

The bytes are a view of the memory-mapped file: loading copies nothing and dequantizes nothing.
The one exception is llama.cpp's permuted ``attn_q`` / ``attn_k`` (engine/gguf_loader.py draws the
permutation): it reorders whole rows, and a row is a run of whole blocks, so undoing it on the byte
rows gives exactly the blocks of the un-permuted matrix (one copy of those two tensors).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from engine.quant.ggml import TYPES, GGMLWeight


def native_tensor(t: Any, unpermute: Callable[[np.ndarray], np.ndarray] | None = None) -> GGMLWeight | None:
    """``t`` (a ``gguf.ReaderTensor``) as a ``GGMLWeight``, its rows put through ``unpermute`` when
    given; None for a type the kernels do not run (F32, F16, BF16 and the quantized types outside
    ``TYPES``: the caller dequantizes those)."""
    qtype = t.tensor_type.name
    if qtype not in TYPES or len(t.shape) != 2:
        return None
    cols, rows = (int(s) for s in t.shape)  # GGUF lists the fastest dimension first
    data = np.asarray(t.data)  # (rows, row bytes) uint8, read-only mapping
    if unpermute is not None:
        data = np.ascontiguousarray(unpermute(data))
    with warnings.catch_warnings():
        # torch warns that the array is read-only: nothing ever writes a weight
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(data)
    return GGMLWeight(qtype, (rows, cols), tensor)
