"""The forward pass's small per-layer operations on the CPU, fused in C, bit for bit equal to torch.

``LayerOps`` is the seam ``engine.model`` runs every layer through: the residual add + RMSNorm, and
rotary embedding + the KV write. ``TorchLayerOps`` is the reference (transformers' expressions, and
the attention backend's ``write_kv``); ``FusedCpuOps`` does the same in ``cpu_fused.c`` (3 calls per
layer instead of ~25 torch calls of 5-80 us each, which were ~15% of a decode step of the bench
model). The C file is compiled without fast-math and without FMA contraction, and its sum of squares
follows torch's own summation order for the CPU capability torch runs with (``torch_vector_width``),
so the outputs are the same floats: checked once when the library loads (a mismatch logs why and
keeps the torch path) and bit for bit in the unit tests.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Protocol

import torch

from engine.attention import AttentionBackend
from engine.kernels.native import NativeLibrary
from engine.rope import RotaryTables, apply_rotary

log = logging.getLogger(__name__)


class LayerOps(Protocol):
    def prepare(self, positions: torch.Tensor, slot_mapping: torch.Tensor, num_slots: int) -> Any:
        """Per-forward state for every layer's ``rope_write_kv``: the tokens' rotary angles and
        their slots (T,) int64 in a pool of ``num_slots`` slots, checked once here."""
        ...

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms_norm(x + delta)) for x, delta (T, hidden); x may be updated in place."""
        ...

    def rope_write_kv(
        self,
        q: torch.Tensor,  # (T, H*D), rows possibly strided (a view of the fused q/k/v output)
        k: torch.Tensor,  # (T, H_kv*D)
        v: torch.Tensor,  # (T, H_kv*D)
        state: Any,  # from prepare()
        kv_layer: torch.Tensor,  # (N, 2, H_kv, B, D)
    ) -> torch.Tensor:
        """Rotate q and k, store k and v at their slots; returns the rotated q, (T, H, D)."""
        ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, cast back, *then* scale (matters in bf16).
    (torch's F.rms_norm computes the same in fp32 but measured slower here: 204 vs 137 us at 512
    rows, on par at 16.)"""
    h = x.float()  # (T, hidden) fp32
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class TorchLayerOps:
    """The reference: transformers' expressions, and the attention backend's KV write."""

    def __init__(self, rope: RotaryTables, attn: AttentionBackend, head_dim: int) -> None:
        self.rope, self.attn, self.head_dim = rope, attn, head_dim

    def prepare(
        self, positions: torch.Tensor, slot_mapping: torch.Tensor, num_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (*self.rope.lookup(positions), slot_mapping)  # write_kv's indexing checks the slots

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, eps)

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
    ) -> torch.Tensor:
        cos, sin, slot_mapping = state
        t, d = q.shape[0], self.head_dim
        q, k = apply_rotary(q.view(t, -1, d), cos, sin), apply_rotary(k.view(t, -1, d), cos, sin)
        self.attn.write_kv(k, v.view(t, -1, d), kv_layer, slot_mapping)
        return q


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.tandem_add_rms_norm_f32.argtypes = [p, p, p, p, i64, i64, f, i, i]
    lib.tandem_add_rms_norm_f32.restype = None
    lib.tandem_rope_write_kv_f32.argtypes = [p, i64, p, i64, p, i64, p, p, p, p, p, p, i64, i, i, i, i, i]
    lib.tandem_rope_write_kv_f32.restype = None


# no -ffast-math and no FMA contraction: every operation rounds where torch's does
LIBRARY = NativeLibrary("cpu_fused.c", ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp"), _declare)

_VECTOR_WIDTH = {"AVX2": 8, "AVX512": 16}  # torch's Vectorized<float>::size() per CPU capability
_checked: dict[int, bool] = {}


def torch_vector_width() -> int | None:
    """The float lanes of torch's CPU kernels here (its summation order depends on it), or None."""
    return _VECTOR_WIDTH.get(torch.backends.cpu.get_cpu_capability())


class FusedCpuOps:
    """``LayerOps`` for fp32 CPU tensors in ``cpu_fused.c``; build with ``FusedCpuOps.create``."""

    def __init__(self, lib: ctypes.CDLL, rope: RotaryTables, head_dim: int, width: int) -> None:
        if rope.cos.dtype != torch.float32 or not (rope.cos.is_contiguous() and rope.sin.is_contiguous()):
            raise ValueError("the fused CPU ops need contiguous fp32 rotary tables")
        self.lib, self.rope, self.head_dim, self.width = lib, rope, head_dim, width

    @classmethod
    def create(cls, rope: RotaryTables, head_dim: int) -> FusedCpuOps | None:
        """The fused ops, or None where the library does not build or does not reproduce torch's
        RMSNorm bit for bit here (an unknown CPU capability): the caller keeps ``TorchLayerOps``."""
        width = torch_vector_width()
        lib = LIBRARY.load()
        if width is None or lib is None or head_dim % 2:
            return None
        ops = cls(lib, rope, head_dim, width)
        if width not in _checked:
            _checked[width] = ops.matches_torch_rms_norm()
            if not _checked[width]:
                log.warning("fused RMSNorm differs from torch's here (capability %s): using torch ops", width)
        return ops if _checked[width] else None

    def matches_torch_rms_norm(self) -> bool:
        g = torch.Generator().manual_seed(0)
        x, delta, w = torch.randn(5, 1000, generator=g), torch.randn(5, 1000, generator=g), torch.randn(1000)
        want_x = x + delta
        got_x, got = self.add_rms_norm(x.clone(), delta, w, 1e-6)
        return torch.equal(got_x, want_x) and torch.equal(got, rms_norm(want_x, w, 1e-6))

    def prepare(
        self, positions: torch.Tensor, slot_mapping: torch.Tensor, num_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.numel() and int(positions.max()) >= self.rope.cos.shape[0]:
            raise IndexError(f"position {int(positions.max())} is beyond the rotary table")
        if slot_mapping.numel() and int(slot_mapping.max()) >= num_slots:
            raise IndexError(f"slot {int(slot_mapping.max())} is beyond the KV pool ({num_slots} slots)")
        return positions.to(torch.int64).contiguous(), slot_mapping.to(torch.int64).contiguous()

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t, n = x.shape
        for name, a in (("x", x), ("delta", delta), ("weight", weight)):
            if a is not None and not (a.is_contiguous() and a.dtype == torch.float32):
                raise ValueError(f"{name} must be a contiguous fp32 tensor")
        h = torch.empty_like(x)
        self.lib.tandem_add_rms_norm_f32(
            x.data_ptr(),
            None if delta is None else delta.data_ptr(),
            weight.data_ptr(),
            h.data_ptr(),
            t,
            n,
            eps,
            self.width,
            torch.get_num_threads(),
        )
        return x, h

    def rope_write_kv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
    ) -> torch.Tensor:
        positions, slot_mapping = state
        t, d = q.shape[0], self.head_dim
        n_blocks, _, h_kv, b, d_pool = kv_layer.shape
        if d_pool != d or k.shape[1] != h_kv * d or v.shape[1] != h_kv * d:
            raise ValueError("k/v do not match the KV pool's heads and head size")
        for name, a in (("q", q), ("k", k), ("v", v)):
            if a.dtype != torch.float32 or a.stride(1) != 1:
                raise ValueError(f"{name} must be fp32 with contiguous rows")
        if not (kv_layer.is_contiguous() and kv_layer.dtype == torch.float32):
            raise ValueError("kv_layer must be a contiguous fp32 tensor")
        out = torch.empty(t, q.shape[1] // d, d, dtype=torch.float32)
        self.lib.tandem_rope_write_kv_f32(
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            positions.data_ptr(),
            self.rope.cos.data_ptr(),
            self.rope.sin.data_ptr(),
            out.data_ptr(),
            kv_layer.data_ptr(),
            slot_mapping.data_ptr(),
            t,
            out.shape[1],
            h_kv,
            d,
            b,
            torch.get_num_threads(),
        )
        return out
