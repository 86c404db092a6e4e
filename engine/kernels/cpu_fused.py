"""The forward pass's small per-layer operations on the CPU, fused in C, bit for bit equal to torch.

``LayerOps`` is the seam ``engine.model`` runs every layer through: the residual add + RMSNorm, and
rotary embedding + the KV write. ``TorchLayerOps`` is the reference (transformers' expressions, and
the attention backend's ``write_kv``); ``FusedCpuOps`` does the same in ``cpu_fused.c`` (3 calls per
layer instead of ~25 torch calls of 5-80 us each, which were ~15% of a decode step of the bench
model). The C file is compiled without fast-math and without FMA contraction, and its sum of squares
follows torch's own summation order, whose lane count depends on the kernel torch dispatches to
(``torch_sum_width`` finds it once per process by comparing with torch, rather than guessing it from
the CPU capability: an AVX-512 torch sums with its 8-lane AVX2 kernel). So the outputs are the same
floats; where no known order matches, ``create`` logs why and the model keeps the torch ops. The unit
tests compare every bit, under each capability CI runs (native, ``ATEN_CPU_CAPABILITY=avx2``).
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

# Widths the C sum can follow: torch's Vectorized<float> lanes. On x86 torch's sum kernel runs 8 lanes
# whatever its CPU capability: ATen registers it with REGISTER_DISPATCH, which leaves the AVX-512
# slot empty, so an AVX-512 torch sums with its AVX2 kernel (and DEFAULT's generic vectors are 8
# lanes too). 16 and 4 cover a torch that registers an AVX-512 sum, and ARM's NEON.
CANDIDATE_WIDTHS: tuple[int, ...] = (8, 16, 4)
# Row lengths the probe compares: every length below two cascade steps of 8 lanes, the scalar path
# of rows shorter than a vector, and model-sized rows with tails.
_PROBE_LENGTHS = (*range(1, 40), 64, 100, 576, 896, 1000, 4096, 5000)


_widths: dict[tuple[str, tuple[int, ...]], int | None] = {}


def torch_sum_width(capability: str, candidates: tuple[int, ...] = CANDIDATE_WIDTHS) -> int | None:
    """The lane count whose summation order reproduces torch's RMSNorm bit for bit under
    ``capability`` (``torch.backends.cpu.get_cpu_capability()``, fixed per process), found once by
    comparing the C kernel with torch's own expression; None where no candidate does, or where the
    library does not build: the caller keeps the torch ops."""
    lib = LIBRARY.load()
    if lib is None:
        return None
    key = (capability, candidates)
    if key not in _widths:
        _widths[key] = next(
            (w for w in candidates if all(_matches_torch(lib, w, n) for n in _PROBE_LENGTHS)), None
        )
        if _widths[key] is None:
            log.warning(
                "fused RMSNorm reproduces none of torch's summation orders %s here (capability %s): "
                "using torch ops",
                candidates,
                capability,
            )
    return _widths[key]


def _matches_torch(lib: ctypes.CDLL, width: int, n: int) -> bool:
    g = torch.Generator().manual_seed(n)
    x, delta, w = (
        torch.randn(3, n, generator=g) * 3,
        torch.randn(3, n, generator=g),
        torch.randn(n, generator=g),
    )
    want_x = x + delta
    got_x, got = x.clone(), torch.empty_like(x)
    lib.tandem_add_rms_norm_f32(
        got_x.data_ptr(), delta.data_ptr(), w.data_ptr(), got.data_ptr(), 3, n, 1e-6, width, 1
    )
    return torch.equal(got_x, want_x) and torch.equal(got, rms_norm(want_x, w, 1e-6))


class FusedCpuOps:
    """``LayerOps`` for fp32 CPU tensors in ``cpu_fused.c``; build with ``FusedCpuOps.create``."""

    def __init__(self, lib: ctypes.CDLL, rope: RotaryTables, head_dim: int, width: int) -> None:
        if rope.cos.dtype != torch.float32 or not (rope.cos.is_contiguous() and rope.sin.is_contiguous()):
            raise ValueError("the fused CPU ops need contiguous fp32 rotary tables")
        self.lib, self.rope, self.head_dim, self.width = lib, rope, head_dim, width

    @classmethod
    def create(cls, rope: RotaryTables, head_dim: int) -> FusedCpuOps | None:
        """The fused ops, or None where the library does not build or reproduces none of the
        ``CANDIDATE_WIDTHS`` summation orders of torch's RMSNorm here: the caller keeps
        ``TorchLayerOps``."""
        lib = LIBRARY.load()
        if lib is None or head_dim % 2:
            return None
        width = torch_sum_width(torch.backends.cpu.get_cpu_capability(), CANDIDATE_WIDTHS)
        return None if width is None else cls(lib, rope, head_dim, width)

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
