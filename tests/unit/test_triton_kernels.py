"""The Triton backend (engine/kernels/) against the torch reference (engine/attention.py).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so the cases are tiny. Outputs are compared with the reference computed in
fp32 from the very same (rounded) K/V/Q values: a fp16/bf16 kernel output must be within one ulp of
its own dtype of that, which allows the interpreter's truncating fp32->bf16 store and nothing more.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine.attention import AttentionMetadata, TorchAttention
from engine.attention_backends import get_backend
from engine.kernels.kv_write import write_kv
from engine.kernels.paged_attention import paged_decode_attention, paged_prefill_attention
from engine.kernels.triton_backend import TritonAttention
from tests.unit.test_attention_reference import MIXED, TOLERANCE, Case, make_case, naive_attention

_MANTISSA = {torch.float16: 10, torch.bfloat16: 7}


def _assert_within_ulp(out: torch.Tensor, ref32: torch.Tensor, ulps: float = 1.0) -> None:
    """|out - ref| <= ulps * ulp_dtype(ref) (+ fp32 noise); fp32 outputs: atol 1e-5."""
    diff = (out.float() - ref32).abs()
    if out.dtype == torch.float32:
        assert diff.max().item() <= 1e-5, diff.max().item()
        return
    _, exp = torch.frexp(ref32)  # ref = mant * 2**exp, mant in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(ref32), exp - 1 - _MANTISSA[out.dtype])
    excess = diff - (ulps * ulp + 1e-6)
    assert excess.max().item() <= 0, f"{int((excess > 0).sum())} elements off by > {ulps} ulp"


def _reference32(case: Case, kv_layer: torch.Tensor) -> torch.Tensor:
    """TorchAttention in fp32 on the same values: the exact answer the kernel rounds."""
    return TorchAttention().forward(case.q.float(), kv_layer.float(), case.meta, case.scale)


def _run_both(case: Case, backend: TritonAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's KV with each backend into its own pool (must agree bit for bit), then
    return (triton output, fp32 reference output)."""
    kv_ref, kv_tri = case.kv_layer.clone(), case.kv_layer.clone()
    TorchAttention().write_kv(case.k_new, case.v_new, kv_ref, case.meta.slot_mapping)
    backend.write_kv(case.k_new, case.v_new, kv_tri, case.meta.slot_mapping)
    assert torch.equal(kv_tri, kv_ref)
    out = backend.forward(case.q, kv_tri, case.meta, case.scale)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    return out, _reference32(case, kv_ref)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "block_size, heads, head_dim",
    [(4, (4, 2), 16), (16, (4, 4), 32), (8, (8, 1), 16), (6, (3, 1), 24)],
    ids=["b4-gqa", "b16-mha", "b8-mqa", "b6-d24-group3"],
)
def test_triton_mixed_batch_matches_reference(
    dtype: torch.dtype, block_size: int, heads: tuple[int, int], head_dim: int
) -> None:
    case = make_case(*MIXED, block_size, *heads, head_dim, dtype, seed=3)
    out, ref = _run_both(case, TritonAttention())
    _assert_within_ulp(out, ref)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prefill_fallback_to_torch(dtype: torch.dtype) -> None:
    case = make_case(*MIXED, 4, 4, 2, 16, dtype, seed=5)
    out, ref = _run_both(case, TritonAttention(triton_prefill=False))
    t_pre = case.meta.num_prefill_tokens
    _assert_within_ulp(out[t_pre:], ref[t_pre:])
    # the prefill rows are TorchAttention's own, computed in the pool's dtype: bit for bit
    kv = case.kv_layer.clone()
    TorchAttention().write_kv(case.k_new, case.v_new, kv, case.meta.slot_mapping)
    expected = TorchAttention().forward(case.q, kv, case.meta, case.scale)[:t_pre]
    assert torch.equal(out[:t_pre], expected)


@pytest.mark.unit
@pytest.mark.parametrize(
    "seq_lens, block_size, head_dim",
    [([1, 5, 17, 33], 4, 16), ([31, 2, 64], 32, 64), ([7, 129], 16, 128), ([9, 23], 5, 8)],
    ids=["b4-d16", "b32-d64", "b16-d128", "b5-d8"],
)
def test_triton_decode_odd_lengths(seq_lens: list[int], block_size: int, head_dim: int) -> None:
    case = make_case([1] * len(seq_lens), seq_lens, block_size, 4, 2, head_dim, torch.float32, seed=11)
    out, ref = _run_both(case, TritonAttention())
    _assert_within_ulp(out, ref)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=0)


@pytest.mark.unit
def test_triton_decode_tiles_smaller_than_a_block() -> None:
    # 16-token tiles inside 32-token blocks: the tile walks half blocks through the same table entry
    case = make_case([1, 1], [45, 20], 32, 2, 1, 16, torch.float32, seed=2)
    kv = case.kv_layer.clone()
    write_kv(case.k_new, case.v_new, kv, case.meta.slot_mapping)
    out = torch.zeros_like(case.q)
    meta = case.meta
    paged_decode_attention(
        case.q, kv, meta.block_tables, meta.seq_lens, case.scale, out, num_seqs=2, block_n=16
    )
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=0)


@pytest.mark.unit
def test_triton_prefill_spans_several_query_and_key_tiles() -> None:
    # 21 new tokens after a 19-token prefix: 2 query tiles, 3 key tiles (16x16 in the interpreter)
    case = make_case([21, 1], [40, 3], 4, 2, 1, 16, torch.float32, seed=4)
    out, ref = _run_both(case, TritonAttention())
    _assert_within_ulp(out, ref)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize("block_m, block_n", [(32, 32), (64, 32)])
def test_triton_prefill_gpu_tile_sizes(block_m: int, block_n: int) -> None:
    # the tiles the GPU path picks, here in the interpreter: tiles larger than the chunk, a
    # chunk crossing a query tile, a key tile ending mid-block
    case = make_case([3, 40, 9], [3, 75, 30], 8, 2, 2, 16, torch.float32, seed=8)
    kv = case.kv_layer.clone()
    write_kv(case.k_new, case.v_new, kv, case.meta.slot_mapping)
    out = torch.zeros_like(case.q)
    meta = case.meta
    paged_prefill_attention(
        case.q,
        kv,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        case.scale,
        out,
        num_seqs=3,
        max_query_len=40,
        block_m=block_m,
        block_n=block_n,
    )
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_write_kv_is_bit_exact_and_skips_negative_slots(dtype: torch.dtype) -> None:
    kv = torch.zeros(4, 2, 3, 4, 16, dtype=dtype)
    k = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    v = -k
    write_kv(k, v, kv, torch.tensor([6, -1, 13]))  # token 1 is padding
    assert torch.equal(kv[1, 0, :, 2], k[0]) and torch.equal(kv[1, 1, :, 2], v[0])
    assert torch.equal(kv[3, 0, :, 1], k[2]) and torch.equal(kv[3, 1, :, 1], v[2])
    assert int((kv != 0).sum()) == 2 * 2 * 3 * 16


@pytest.mark.unit
def test_triton_rejects_mismatched_dtype() -> None:
    meta = AttentionMetadata.build([1], [1], [[0]], 4)
    with pytest.raises(ValueError, match="dtype"):
        TritonAttention().forward(torch.zeros(1, 2, 16), torch.zeros(1, 2, 1, 4, 16).half(), meta, 1.0)


@pytest.mark.integration
def test_kernels_compile_for_cuda_without_a_gpu() -> None:
    """The interpreter accepts programs the GPU compiler rejects: compile every GPU configuration
    with the wheel's ptxas, in a fresh process since kernels defined under the interpreter can't."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "engine.kernels.compile_check", "--arch", "80", "90"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 6 attention / KV-write configurations, 8 of the quantized linear (engine/quant/triton_kernels.py)
    assert proc.stdout.count("ok   sm_") == 2 * (6 + 8), proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_triton_on_cuda(dtype: torch.dtype, block_size: int) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels run in the interpreter: set TANDEM_GPU=1 to compile them for the GPU")
    query_lens = [37, 100, 5] + [1] * 13
    seq_lens = [80, 100, 300] + [1, 17, 64, 65, 129, 500, 1000, 33, 31, 2, 15, 16, 1025]
    case = make_case(query_lens, seq_lens, block_size, 32, 8, 128, dtype, seed=1)
    meta = AttentionMetadata.build(
        query_lens,
        seq_lens,
        case.meta.block_tables.tolist(),
        block_size,
        device="cuda",
    )
    kv_ref = case.kv_layer.clone()
    TorchAttention().write_kv(case.k_new, case.v_new, kv_ref, case.meta.slot_mapping)
    ref = _reference32(case, kv_ref)
    kv = case.kv_layer.cuda()
    backend = get_backend("triton")
    backend.write_kv(case.k_new.cuda(), case.v_new.cuda(), kv, meta.slot_mapping)
    assert torch.equal(kv.cpu(), kv_ref)
    out = backend.forward(case.q.cuda(), kv, meta, case.scale).cpu()
    # on a GPU the prefill kernel feeds tensor cores fp16/bf16 probabilities (rounded, so errors
    # are absolute, not relative): the same bounds as the torch reference's own against float64
    torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype], rtol=0)
