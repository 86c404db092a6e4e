"""Choosing the routed experts' backend by name: the one place the MoE kernels are imported
(engine/moe.py, their seam and reference, imports none; as engine/attention_backends.py does for
attention)."""

from __future__ import annotations

import torch

from engine.moe import Experts, GroupedExperts, MoEWeights

BACKENDS = ("auto", "grouped", "cpu", "triton")


def experts_for(
    name: str, w: MoEWeights, linear_backend: str, dtype: torch.dtype, device: torch.device
) -> Experts:
    """``auto``: ``cpu`` for fp32 on a CPU where the C kernel builds, ``triton`` on a GPU, else
    ``grouped`` (per active expert through the model's linears: the reference with the ``torch``
    linear backend)."""
    if name not in BACKENDS:
        raise ValueError(f"moe backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        elif dtype == torch.float32 and linear_backend != "torch":
            from engine.kernels.cpu_moe import cpu_moe_available

            name = "cpu" if cpu_moe_available() else "grouped"
        else:
            name = "grouped"
    if name == "cpu":
        from engine.kernels.cpu_moe import CpuExperts

        return CpuExperts(w.gate, w.up, w.down)
    if name == "triton":
        from engine.kernels.triton_moe import TritonExperts

        return TritonExperts(w.gate, w.up, w.down)
    return GroupedExperts(w, linear_backend)
