"""Quantized weights against the floats the dequantized path loads, bit for bit.

- the torch reference (``engine.quant.ggml``) against ``gguf.quants.dequantize`` (what the
  load-time path runs) for every GGML type the kernels run, on random blocks whose scales include
  zero, -0, fp16 subnormals and the largest fp16;
- the C kernel (``cpu_quant_gemm.c``) against the fp32 C GEMM over that reference: the same
  output floats for every type, row count, bias and thread count (each output one FMA chain over
  k, as in cpu_gemm.c), and its dequantized panels equal to packing the reference;
- FP8 (e4m3, block-scaled): every byte value decoded as torch decodes ``float8_e4m3fn``, the
  kernel against the fp32 GEMM over ``FP8Weight.dequantize``;
- the embedding lookup, row slices and fused concatenation of quantized weights.

Under ``make test-isa`` (TANDEM_CPU_CAPABILITY=avx2 via ATEN_CPU_CAPABILITY) the same tests run the
AVX2 build of the kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.kernels.native import compiler
from engine.linear import cpu_gemm_available, make_linear
from engine.quant import cpu_kernels
from engine.quant.fp8 import FP8Weight, quantize_fp8
from engine.quant.ggml import BLOCKS, TYPES, GGMLWeight
from engine.quant.method import cat_rows, cpu_pack

pytestmark = pytest.mark.unit

needs_kernel = pytest.mark.skipif(
    compiler() is None or not (cpu_kernels.available() and cpu_gemm_available()),
    reason="no C compiler or no AVX2/FMA/F16C: the kernels cannot run here",
)

# fp16 bit patterns for scales: 0, -0, the smallest and largest subnormal, the smallest normal,
# 1, -1, the largest finite (65504) and its negative
EDGE_F16 = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF], dtype=np.uint16)
# where each type keeps its fp16 scales (d, and m / dmin) inside a block
_F16_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, rows: int, cols: int, seed: int, edges: bool = True) -> np.ndarray:
    """(rows, cols / QK * block bytes) uint8: random quants and sub-block scales; fp16 scales small
    and finite, a quarter of them edge values."""
    rng = np.random.default_rng(seed)
    qk, size = BLOCKS[qtype]
    b = rng.integers(0, 256, size=(rows, cols // qk, size), dtype=np.uint8)
    for at in _F16_AT[qtype]:
        scale = (rng.uniform(-1, 1, size=(rows, cols // qk)) * 0.02).astype(np.float16).view(np.uint16)
        if edges:
            pick = rng.random(size=scale.shape) < 0.25
            scale[pick] = rng.choice(EDGE_F16, size=int(pick.sum()))
        b[..., at : at + 2] = scale.view(np.uint8).reshape(rows, cols // qk, 2)
    return b.reshape(rows, -1)


def _bits(t: np.ndarray | torch.Tensor) -> np.ndarray:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", TYPES)
def test_reference_dequantization_equals_gguf_bit_for_bit(qtype: str) -> None:
    from gguf import GGMLQuantizationType, dequantize

    qk = BLOCKS[qtype][0]
    data = random_blocks(qtype, 24, 3 * qk, seed=1)
    want = dequantize(data, GGMLQuantizationType[qtype]).reshape(24, 3 * qk)
    got = GGMLWeight(qtype, (24, 3 * qk), torch.from_numpy(data)).dequantize()
    assert np.isfinite(want).all()
    assert np.array_equal(_bits(got), _bits(want))
    # infinite / NaN scales: NaN where gguf gives NaN (a NaN's sign and payload are not compared)
    raw = np.random.default_rng(2).integers(0, 256, size=data.shape, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 in gguf's own arithmetic
        want = dequantize(raw, GGMLQuantizationType[qtype]).reshape(24, 3 * qk)
    got_raw = GGMLWeight(qtype, (24, 3 * qk), torch.from_numpy(raw)).dequantize().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got_raw), nan)
    assert np.array_equal(_bits(got_raw)[~nan], _bits(want)[~nan])


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES)
def test_kernel_equals_the_fp32_gemm_over_the_reference(qtype: str) -> None:
    qk = BLOCKS[qtype][0]
    n, k = 37, max(2, 512 // qk) * qk  # a partial last panel; two 256-k blocks
    w = GGMLWeight(qtype, (n, k), torch.from_numpy(random_blocks(qtype, n, k, seed=3)))
    ref = w.dequantize()  # (n, k)
    packed = cpu_pack(w)
    # the panels the kernel multiplies by are the reference's, in cpu_gemm.c's packed layout
    want_panels = torch.zeros(-(-n // 16) * 16, k)
    want_panels[:n] = ref
    assert torch.equal(packed.unpack(), want_panels.view(-1, 16, k).transpose(1, 2))
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(n, generator=g)
    for m in (1, 5, 13, 40):  # one row, a partial and a whole 12-row block (AVX-512), several
        x = torch.randn(m, k, generator=g)
        for b in (None, bias):
            want = make_linear(ref, b, "cpu")(x)
            got = cpu_kernels.quant_linear(packed, b)(x)
            assert torch.equal(got, want), (m, b is None)
    # one thread or two (or three: uneven runs of panels): the same floats, on the few-rows path (3
    # rows) and the panel-block one (9); panels are shared out, never split along k
    for rows in (3, 9):
        x = torch.randn(rows, k, generator=g)
        threads = torch.get_num_threads()
        try:
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(cpu_kernels.quant_linear(packed, bias)(x))
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        # a row's output does not depend on the rows beside it (batch invariance)
        assert torch.equal(cpu_kernels.quant_linear(packed, bias)(x[2:3]), outs[0][2:3])


def test_fp8_decodes_every_byte_as_torch_does() -> None:
    all_bytes = torch.arange(256, dtype=torch.uint8)
    want = all_bytes.view(torch.float8_e4m3fn).float()
    w = FP8Weight(all_bytes.view(torch.float8_e4m3fn).reshape(2, 128), torch.ones(1, 1), (128, 128))
    got = w.dequantize().reshape(-1)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    if cpu_kernels.available():  # the C decoder: unpack the panels of the same bytes
        panels = cpu_pack(w).unpack()  # (1, 128, 16): rows 0, 1 in lanes 0, 1
        c = panels[0, :, :2].t().reshape(-1)
        assert torch.equal(torch.isnan(c), torch.isnan(want))
        assert torch.equal(c.nan_to_num(), want.nan_to_num())


@needs_kernel
@pytest.mark.parametrize("block", [(128, 128), (16, 256)])
def test_fp8_kernel_equals_the_fp32_gemm_over_the_reference(block: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(5)
    n, k = 150, 512
    w = quantize_fp8(torch.randn(n, k, generator=g) * 0.05, block)
    ref = w.dequantize()
    assert w.scale_inv.shape == (-(-n // block[0]), k // block[1])
    packed = cpu_pack(w)
    bias = torch.randn(n, generator=g)
    for m in (1, 7, 30):
        x = torch.randn(m, k, generator=g)
        assert torch.equal(cpu_kernels.quant_linear(packed, bias)(x), make_linear(ref, bias, "cpu")(x))


def test_fp8_reference_is_the_scaled_product() -> None:
    g = torch.Generator().manual_seed(6)
    w = quantize_fp8(torch.randn(200, 300, generator=g), (128, 128))  # partial blocks both ways
    want = torch.empty(200, 300)
    for i in range(200):
        for j in range(0, 300, 100):  # slices that stay in one column block
            cols = range(j, j + 100)
            s = w.scale_inv[i // 128, torch.tensor([c // 128 for c in cols])]
            want[i, j : j + 100] = w.q[i, j : j + 100].float() * s
    assert torch.equal(w.dequantize(), want)
    # quantizing then dequantizing stays within FP8's precision of the original (3 mantissa bits)
    orig = torch.randn(200, 300, generator=torch.Generator().manual_seed(6))
    assert ((w.dequantize() - orig).abs() <= orig.abs() / 16 + 1e-3).all()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K"])
def test_embedding_rows_slices_and_concatenation(qtype: str) -> None:
    qk = BLOCKS[qtype][0]
    w = GGMLWeight(qtype, (40, qk), torch.from_numpy(random_blocks(qtype, 40, qk, seed=7)))
    full = w.dequantize()
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(w.embedding(ids), full[ids])
    assert torch.equal(w.rows(8, 20).dequantize(), full[8:20])
    fused = cat_rows([w.rows(0, 10), w.rows(10, 40)])
    assert isinstance(fused, GGMLWeight) and torch.equal(fused.dequantize(), full)
    other_type = "Q4_0" if qtype == "Q8_0" else "Q8_0"
    other = GGMLWeight(
        other_type, (3, qk), torch.zeros(3, qk // 32 * BLOCKS[other_type][1], dtype=torch.uint8)
    )
    assert cat_rows([w, other]) is None  # two types: multiplied apart
    f8 = quantize_fp8(torch.randn(300, 128), (128, 128))
    assert torch.equal(f8.embedding(ids), f8.dequantize()[ids])
    assert torch.equal(f8.rows(128, 300).dequantize(), f8.dequantize()[128:])
    assert cat_rows([f8.rows(0, 128), f8.rows(128, 300)]) is not None
    assert cat_rows([f8.rows(0, 256), quantize_fp8(torch.randn(10, 128))]) is not None
    assert cat_rows([quantize_fp8(torch.randn(10, 128)), f8]) is None  # 10 rows split a scale block


def test_bad_quantized_input_is_named() -> None:
    with pytest.raises(ValueError, match="'Q2_K' is not one the kernels run"):
        GGMLWeight("Q2_K", (1, 256), torch.zeros(1, 84, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a whole number of 32-blocks"):
        GGMLWeight("Q8_0", (1, 40), torch.zeros(1, 34, dtype=torch.uint8))
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        FP8Weight(torch.zeros(4, 256, dtype=torch.float8_e4m3fn), torch.ones(1, 1), (128, 128))
