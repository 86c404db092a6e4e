"""The CPU step with one C call per layer (``cpu_decode.c``): same kernels, no Python glue.

``Model.forward`` hands every step (one rank) to ``DecodePlan.forward`` when the model runs entirely
on the C kernels, a prefill chunk's tokens as one-token sequences (``as_decode_queries``: each token
attends to its own prefix through the decode attention kernel, so a chunk computes exactly what the
same tokens decoded one by one would, whatever the chunking — and a mixed step of decodes and
prefill chunks costs no more glue than a decode step). The kernels: the fused RMSNorm /
rope ops, the C decode attention, and ``cpu_gemm.c`` or ``cpu_quant_gemm.c`` linears. Per layer it
makes one ctypes call that runs that layer's kernels in the order and with the arguments the torch-
driven forward uses, then the SwiGLU activation in torch as the forward writes it. So the hidden
states and the KV cache are the same floats (tests/unit/test_cpu_decode_plan.py compares every
bit); only the ~13 Python-level calls per layer and their allocations are gone.

Lifecycle: ``DecodePlan.create`` (None where any part is not a C kernel) -> ``forward`` per step.
Not thread safe: one forward at a time, as the engine runs them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata
from engine.kernels import cpu_attention, cpu_fused
from engine.kernels.native import NativeLibrary
from engine.linear import GEMM, PackedLinear
from engine.quant import cpu_kernels
from engine.quant.cpu_kernels import QuantLinear

_p, _i, _i64, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _i), ("qtype", _i), ("packed", _p), ("n", _i64), ("k", _i64), ("bias", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _p),
        ("post_norm", _p),
        ("kv_layer", _p),
        ("n_qkv", _i),
        ("n_gate_up", _i),
        ("qkv", _Linear * 3),
        ("o", _Linear),
        ("gate_up", _Linear * 2),
        ("down", _Linear),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        *((name, _p) for name in ("gemm_f32", "gemm_q", "norm", "rope", "attn")),
        *((name, _i) for name in ("sum_width", "threads", "attn_threads", "attn_split")),
        ("eps", _f),
        ("scale", _f),
        *((name, _i) for name in ("H", "H_kv", "D", "B")),
        ("hidden", _i64),
        ("cos", _p),
        ("sin", _p),
        ("T", _i64),
        *((name, _p) for name in ("positions", "slots", "tables", "seq_lens")),
        ("table_stride", _i64),
        ("attn_scratch_stride", _i64),
        *((name, _p) for name in ("x", "h", "q_rot", "attn_out", "scratch", "attn_scratch")),
        *((name, _p) for name in ("qkv_out", "o_out", "gu_out", "down_out")),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    step, layer = ctypes.POINTER(_Step), ctypes.POINTER(_Layer)
    lib.tandem_decode_layer.argtypes = [step, layer, _p, _i64, layer]
    lib.tandem_decode_layer.restype = _i
    lib.tandem_decode_final.argtypes = [step, layer, _p, _i64, _p, _p]
    lib.tandem_decode_final.restype = _i


LIBRARY = NativeLibrary("cpu_decode.c", ("-O2",), _declare)

Kernel = PackedLinear | QuantLinear


def _address(fn: Any) -> int:
    return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)


def _linear(k: Kernel) -> _Linear:
    bias = 0 if k.bias is None else k.bias.data_ptr()
    return _Linear(k.kind, k.qtype, k.packed.data_ptr(), k.n, k.k, bias)


class DecodePlan:
    """One model's layers as C structures (weights' pointers), built once; see the module doc."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        step: _Step,
        layers: list[_Layer],
        kernels: list[tuple[tuple[Kernel, ...], Kernel, tuple[Kernel, ...], Kernel]],
        keep: list[Any],
        final_norm: torch.Tensor,
        ops: cpu_fused.FusedCpuOps,
    ) -> None:
        self.lib, self.step, self.layers, self.kernels = lib, step, layers, kernels
        self._keep = keep  # tensors whose pointers the structures hold
        self.final_norm, self.ops = final_norm, ops
        self._kv_ptr = 0

    @classmethod
    def create(
        cls,
        layer_kernels: list[Any],  # per layer: (qkv parts, o, gate/up parts, down) linears, or None
        norms: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: (input_norm, post_norm)
        final_norm: torch.Tensor,
        ops: object,
        attn: object,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        scale: float,
    ) -> DecodePlan | None:
        """The plan, or None where a part is not one of the C kernels (the model keeps its path)."""
        if not isinstance(ops, cpu_fused.FusedCpuOps) or not getattr(attn, "kernel", False):
            return None
        if any(k is None or not all(isinstance(x, Kernel) for x in _flat(k)) for k in layer_kernels):
            return None
        if num_heads % num_kv_heads or num_heads // num_kv_heads > 64:
            return None
        norm_list = list(norms)
        if any(t.dtype != torch.float32 or not t.is_contiguous() for pair in norm_list for t in pair):
            return None
        lib, gemm, fused, attn_lib = (
            LIBRARY.load(),
            GEMM.load(),
            cpu_fused.LIBRARY.load(),
            cpu_attention.KERNEL.load(),
        )
        quant = cpu_kernels.LIBRARY.load() if cpu_kernels.available() else None
        if lib is None or gemm is None or fused is None or attn_lib is None:
            return None
        step = _Step()
        step.gemm_f32 = _address(gemm.tandem_gemm_f32)
        step.gemm_q = _address(quant.tandem_quant_gemm) if quant is not None else 0
        step.norm = _address(fused.tandem_add_rms_norm_f32)
        step.rope = _address(fused.tandem_rope_write_kv_f32)
        step.attn = _address(attn_lib.tandem_paged_decode_f32)
        step.sum_width, step.eps, step.scale = ops.width, eps, scale
        step.H, step.H_kv, step.D = num_heads, num_kv_heads, head_dim
        step.hidden = int(final_norm.shape[0])
        step.cos, step.sin = ops.rope.cos.data_ptr(), ops.rope.sin.data_ptr()
        layers = []
        for (qkv, o, gate_up, down), (input_norm, post_norm) in zip(layer_kernels, norm_list, strict=True):
            layer = _Layer(input_norm=input_norm.data_ptr(), post_norm=post_norm.data_ptr())
            layer.n_qkv, layer.n_gate_up = len(qkv), len(gate_up)
            for i, k in enumerate(qkv):
                layer.qkv[i] = _linear(k)
            for i, k in enumerate(gate_up):
                layer.gate_up[i] = _linear(k)
            layer.o, layer.down = _linear(o), _linear(down)
            layers.append(layer)
        return cls(lib, step, layers, list(layer_kernels), [*norm_list, final_norm], final_norm, ops)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """x (T, hidden) the embedded tokens (updated in place, as the forward's residual stream);
        one query token per sequence (a prefill chunk comes as one sequence per token:
        ``engine.attention.as_decode_queries``). ``on_layer(i)`` runs once layer ``i``'s K/V are
        in ``kv_cache`` (after its call). Returns the final-norm hidden states (T, hidden)."""
        if meta.num_prefill_seqs:
            raise ValueError("the decode plan takes one query token per sequence (as_decode_queries)")
        s, T = self.step, x.shape[0]
        n_blocks, block = kv_cache.shape[1], kv_cache.shape[4]
        positions, slots = self.ops.prepare(positions, meta.slot_mapping, n_blocks * block)  # checked
        if kv_cache.data_ptr() != self._kv_ptr:  # the engine's pool: set once
            if not (kv_cache.is_contiguous() and kv_cache.dtype == torch.float32):
                raise ValueError("kv_cache must be a contiguous fp32 tensor")
            for i, layer in enumerate(self.layers):
                layer.kv_layer = kv_cache[i].data_ptr()
            self._kv_ptr = kv_cache.data_ptr()
        threads = torch.get_num_threads()
        g = s.H // s.H_kv
        split = cpu_attention.work_split(T * s.H_kv, g, threads)  # as paged_decode chooses
        attn_threads = max(1, min(threads, T * s.H_kv * split))
        width = g * max(meta.seq_lens_list)
        kinds = [k for layer in self.kernels for k in _flat(layer)]
        scratch_floats = max(k.scratch_floats(T, threads) for k in kinds)
        qkv_n = sum(k.n for k in self.kernels[0][0])
        inter = sum(k.n for k in self.kernels[0][2])
        hidden = int(s.hidden)
        buf = torch.empty(
            T * (4 * hidden + 2 * s.H * s.D + qkv_n + inter) + scratch_floats, dtype=torch.float32
        )
        attn_scratch = torch.empty(attn_threads, width, dtype=torch.float32)
        h, o_out, down_out, out, q_rot, attn_out, qkv_out, gu_out, scratch = buf.split(
            [T * hidden] * 4 + [T * s.H * s.D] * 2 + [T * qkv_n, T * inter, scratch_floats]
        )
        tables, seq_lens = meta.block_tables, meta.seq_lens
        if tables.dtype != torch.int32 or tables.stride(1) != 1 or seq_lens.dtype != torch.int32:
            raise ValueError("block_tables and seq_lens must be int32 with contiguous rows")
        s.B, s.T, s.threads, s.attn_threads, s.attn_split = block, T, threads, attn_threads, split
        s.positions, s.slots = positions.data_ptr(), slots.data_ptr()
        s.tables, s.table_stride, s.seq_lens = tables.data_ptr(), tables.stride(0), seq_lens.data_ptr()
        s.attn_scratch, s.attn_scratch_stride = attn_scratch.data_ptr(), width
        s.x, s.h, s.q_rot, s.attn_out, s.scratch = (
            x.data_ptr(),
            h.data_ptr(),
            q_rot.data_ptr(),
            attn_out.data_ptr(),
            scratch.data_ptr(),
        )
        s.qkv_out, s.o_out, s.gu_out, s.down_out = (
            qkv_out.data_ptr(),
            o_out.data_ptr(),
            gu_out.data_ptr(),
            down_out.data_ptr(),
        )
        # the activation's operands, as the forward slices them: gate / up of the fused output, or two blocks
        gate_up = self.kernels[0][2]
        if len(gate_up) == 1:
            half = inter // 2
            fused = gu_out.view(T, inter)
            gate, up = fused[:, :half], fused[:, half:]
        else:
            gate, up = gu_out[: T * gate_up[0].n].view(T, -1), gu_out[T * gate_up[0].n :].view(T, -1)
        ref, prev, act, act_stride = ctypes.byref, None, None, 0
        for i, layer in enumerate(self.layers):
            if self.lib.tandem_decode_layer(ref(s), prev, act, act_stride, ref(layer)):
                raise RuntimeError("a C kernel refused the decode step's arguments")
            if on_layer is not None:
                on_layer(i)
            a = F.silu(gate, inplace=True).mul_(up)  # (T, I): the forward's own SwiGLU
            prev, act, act_stride = ref(layer), a.data_ptr(), a.stride(0)
        out2d = out.view(T, hidden)
        if self.lib.tandem_decode_final(
            ref(s), prev, act, act_stride, self.final_norm.data_ptr(), out2d.data_ptr()
        ):
            raise RuntimeError("a C kernel refused the decode step's arguments")
        return out2d


def _flat(k: Any) -> list[Any]:
    qkv, o, gate_up, down = k
    return [*qkv, o, *gate_up, down]
