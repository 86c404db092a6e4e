"""The Triton kernel for quantized weights (engine/quant/triton_kernels.py) against the torch reference.

Without a GPU it runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so the
shapes are tiny; ``make test-gpu`` runs this file compiled for the GPU. Two checks per format:

- multiplying by the identity returns every dequantized weight exactly (each output is one exact
  product plus zeros), so the kernel's dequantization is the reference's, bit for bit;
- a random x gives ``F.linear`` over the reference to fp32 rounding (the summation order is the
  kernel's), with a bias and a partial tile of rows and outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.quant.fp8 import quantize_fp8
from engine.quant.ggml import BLOCKS, TYPES, GGMLWeight
from engine.quant.triton_kernels import runs_interpreted, triton_linear
from tests.unit.test_quant_kernels import random_blocks

pytestmark = pytest.mark.unit

DEVICE = "cpu" if runs_interpreted() else "cuda"
SMALL = (16, 32, 32)  # BLOCK_M, BLOCK_N, BLOCK_K: cheap in the interpreter

if not runs_interpreted() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _weight(fmt: str, n: int, edges: bool = True) -> tuple[object, int]:
    if fmt == "fp8":
        k = 256
        w = quantize_fp8(torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.1, (16, 128))
        return w.to(DEVICE), k
    k = max(64, BLOCKS[fmt][0])
    return GGMLWeight(fmt, (n, k), torch.from_numpy(random_blocks(fmt, n, k, seed=9, edges=edges))).to(
        DEVICE
    ), k


@pytest.mark.parametrize("fmt", [*TYPES, "fp8"])
def test_kernel_dequantizes_exactly_and_multiplies_like_f_linear(fmt: str) -> None:
    n = 20  # a partial tile of outputs
    w, k = _weight(fmt, n)
    ref = w.dequantize()  # type: ignore[attr-defined]
    linear = triton_linear(w, None, SMALL)  # type: ignore[arg-type]
    eye = torch.eye(k, device=DEVICE)
    assert torch.equal(linear(eye), ref.t())  # (k, n): row i holds weight column i, exactly
    w, k = _weight(fmt, n, edges=False)  # scales of a real model's size: fp32 rounding is small
    ref = w.dequantize()  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, k, generator=g).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    got = triton_linear(w, bias, SMALL)(x)  # type: ignore[arg-type]
    torch.testing.assert_close(got, F.linear(x, ref, bias), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(runs_interpreted(), reason="bf16 is wrong in the Triton interpreter (MEASURED.md)")
@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0", "Q6_K"])
def test_bf16_activations_on_the_gpu(fmt: str) -> None:
    w, k = _weight(fmt, 200)
    x = torch.randn(33, k, device=DEVICE).to(torch.bfloat16)
    want = F.linear(x.float(), w.dequantize(torch.bfloat16).float())  # type: ignore[attr-defined]
    got = triton_linear(w, None)(x)  # type: ignore[arg-type]
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
