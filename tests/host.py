"""What this host's CPU and torch make of the fast paths, for tests that must check the condition
before asserting a host-dependent outcome."""

from __future__ import annotations

import platform

import torch

from engine.kernels.native import compiler

# torch's capability on this host (DEFAULT / AVX2 / AVX512 on x86; ATEN_CPU_CAPABILITY lowers it)
TORCH_CAPABILITY = torch.backends.cpu.get_cpu_capability()
# Where the fused C layer ops must be active: a C compiler and an x86 torch, whose RMSNorm sums in
# the 8-lane order the C kernel follows under every capability (engine/kernels/cpu_fused.py).
FUSED_EXPECTED = (
    compiler() is not None
    and platform.machine() in ("x86_64", "AMD64")
    and TORCH_CAPABILITY in ("DEFAULT", "AVX2", "AVX512")
)
