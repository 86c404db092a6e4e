"""Choosing an attention backend by name: the one place the kernel modules are imported.

The seam (``engine.attention.AttentionBackend``) and its torch reference stay in engine/attention.py,
which the kernels import; building a backend here, apart from the seam, keeps that import one-way.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend, TorchAttention


def get_backend(name: str, device: str | torch.device = "cpu") -> AttentionBackend:
    """``auto`` (``cpu`` on a CPU, ``triton`` on a GPU), ``torch`` (the reference, any device),
    ``cpu`` (the reference with fp32 decode in a compiled C kernel) or ``triton`` (GPU, or the
    interpreter on CPU)."""
    if name == "auto":
        name = "cpu" if torch.device(device).type == "cpu" else "triton"
    if name == "torch":
        return TorchAttention()
    if name == "cpu":
        from engine.kernels.cpu_attention import CpuAttention

        return CpuAttention()
    if name == "triton":
        from engine.kernels.triton_backend import TritonAttention

        return TritonAttention()
    raise ValueError(f"attention backend must be 'auto', 'torch', 'cpu' or 'triton', got {name!r}")
