"""The CPU fast paths against their references: the C paged-decode kernel (engine/kernels/
cpu_attention.py) against the torch reference attention, and the packed matmuls of engine/linear.py
(the C kernel cpu_gemm.c and oneDNN) against F.linear, including the batch invariance the engine
relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, TorchAttention
from engine.attention_backends import get_backend
from engine.kernels import cpu_attention
from engine.kernels.native import compiler
from engine.linear import cpu_gemm_available, make_linear, onednn_available, resolve

pytestmark = pytest.mark.unit

needs_cc = pytest.mark.skipif(compiler() is None, reason="no C compiler: the kernel cannot be built here")


def _pool(n: int, h: int, b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, h, b, d, generator=g)


def _tables(lens: list[int], b: int, n: int, seed: int) -> list[list[int]]:
    """Disjoint, shuffled block ids per sequence (block 0 left unused, as padding would point)."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(n - 1, generator=g) + 1).tolist()
    out, at = [], 0
    for length in lens:
        k = -(-length // b)
        out.append(ids[at : at + k])
        at += k
    return out


@needs_cc
@pytest.mark.parametrize(
    ("hq", "hkv", "b", "d", "lens"),
    [
        (8, 4, 16, 64, [1, 15, 16, 17, 300]),  # GQA 2, block edges
        (4, 4, 4, 32, [7, 8, 9, 40]),  # MHA
        (8, 1, 8, 16, [33, 2]),  # MQA
        (12, 3, 16, 128, [129]),  # one sequence, head_dim 128
    ],
)
def test_decode_kernel_matches_the_torch_reference(
    hq: int, hkv: int, b: int, d: int, lens: list[int]
) -> None:
    n = sum(-(-x // b) for x in lens) + 5
    kv = _pool(n, hkv, b, d, seed=len(lens))
    tables = _tables(lens, b, n, seed=d)
    # a mixed batch: one prefill chunk first (takes the reference path in both), then the decodes
    pre_len = 5
    pre_table = _tables([pre_len], b, n, seed=99)[0]
    meta = AttentionMetadata.build([pre_len] + [1] * len(lens), [pre_len, *lens], [pre_table, *tables], b)
    q = torch.randn(pre_len + len(lens), hq, d, generator=torch.Generator().manual_seed(1))
    want = TorchAttention().forward(q, kv, meta, d**-0.5)
    backend = get_backend("cpu")
    assert backend.kernel  # type: ignore[attr-defined]
    got = backend.forward(q, kv, meta, d**-0.5)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # one thread and two threads split the work differently and must agree exactly
    out1, out2 = torch.empty(len(lens), hq, d), torch.empty(len(lens), hq, d)
    args = (
        q[pre_len:].contiguous(),
        kv,
        meta.block_tables[1:],
        meta.seq_lens[1:],
        meta.seq_lens_list[1:],
        d**-0.5,
    )
    cpu_attention.paged_decode(*args, out1, threads=1)
    cpu_attention.paged_decode(*args, out2, threads=2)
    assert torch.equal(out1, out2)
    # one sequence alone: its KV heads' query heads are cut into more items (work_split), the same
    # floats as in the batch
    one = torch.empty(1, hq, d)
    last = (
        q[-1:].contiguous(),
        kv,
        meta.block_tables[-1:],
        meta.seq_lens[-1:],
        meta.seq_lens_list[-1:],
        d**-0.5,
    )
    assert cpu_attention.work_split(hkv, hq // hkv, 2) > 1 or hq == hkv or hkv >= 8
    cpu_attention.paged_decode(*last, one, threads=2)
    assert torch.equal(one, out1[-1:])


@needs_cc
def test_decode_kernel_reads_only_its_own_blocks() -> None:
    """Poisoning every block a sequence does not own (and the tail of its last block) changes nothing."""
    b, d = 4, 8
    kv = _pool(12, 2, b, d, seed=3)
    lens = [6, 9]
    tables = _tables(lens, b, 12, seed=4)
    meta = AttentionMetadata.build([1, 1], lens, tables, b)
    q = torch.randn(2, 4, d)
    clean = get_backend("cpu").forward(q, kv, meta, 0.3)
    poisoned = kv.clone()
    owned = {blk for t in tables for blk in t}
    for blk in range(12):
        if blk not in owned:
            poisoned[blk] = float("nan")
    for t, length in zip(tables, lens, strict=True):
        poisoned[t[-1], :, :, length - (len(t) - 1) * b :] = float("nan")
    assert torch.equal(get_backend("cpu").forward(q, poisoned, meta, 0.3), clean)


def test_without_a_compiler_the_backend_falls_back_to_the_reference(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    cpu_attention.KERNEL.reset()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    try:
        backend = get_backend("cpu")
        assert not backend.kernel  # type: ignore[attr-defined]
        assert cpu_attention.KERNEL.load_error is not None
    finally:
        cpu_attention.KERNEL.reset()  # later tests load the real kernel again
    meta = AttentionMetadata.build([1], [5], [[1, 2]], 4)
    kv, q = _pool(3, 2, 4, 8, seed=0), torch.randn(1, 4, 8)
    assert torch.equal(backend.forward(q, kv, meta, 0.5), TorchAttention().forward(q, kv, meta, 0.5))


@needs_cc
def test_build_is_cached_by_content(tmp_path) -> None:
    first = cpu_attention.KERNEL.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_attention.KERNEL.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_auto_picks_cpu_on_cpu() -> None:
    assert type(get_backend("auto")).__name__ == "CpuAttention"
    with pytest.raises(ValueError, match="attention backend"):
        get_backend("flash")


@pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
def test_onednn_linear_matches_f_linear_and_is_batch_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(40, 64, generator=g)
    lin = make_linear(w, bias, "onednn")
    full = lin(x)
    torch.testing.assert_close(full, F.linear(x, w, bias), atol=1e-4, rtol=1e-5)
    # a row's result does not depend on how many rows share the call
    for m in (1, 3, 16):
        for start in (0, 7):
            assert torch.equal(lin(x[start : start + m]), full[start : start + m])


def test_linear_backend_resolution() -> None:
    cpu = torch.device("cpu")
    best = "cpu" if cpu_gemm_available() else "onednn" if onednn_available() else "torch"
    assert resolve("auto", torch.float32, cpu) == best
    assert resolve("auto", torch.bfloat16, cpu) == "torch"
    assert resolve("torch", torch.float32, cpu) == "torch"
    with pytest.raises(ValueError, match="linear backend"):
        resolve("mkl", torch.float32, cpu)
    with pytest.raises(ValueError, match="linear backend 'cpu' needs fp32"):
        resolve("cpu", torch.bfloat16, cpu)


needs_gemm = pytest.mark.skipif(not cpu_gemm_available(), reason="no C compiler or no AVX2/FMA here")


@needs_gemm
@pytest.mark.parametrize(("n", "k"), [(100, 77), (16, 512), (1024, 512), (33, 300), (512, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_gemm_matches_f_linear_and_is_batch_and_thread_invariant(n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n + k)
    w, b = torch.randn(n, k, generator=g), (torch.randn(n, generator=g) if bias else None)
    x = torch.randn(250, k, generator=g)  # 250 rows: several row chunks of 96, a tail of 58
    lin = make_linear(w, b, "cpu")
    full = lin(x)
    torch.testing.assert_close(full, F.linear(x, w, b), atol=1e-4 * k**0.5, rtol=1e-5)
    # a row's result depends neither on the rows sharing the call (any chunk, any row block of 6
    # on AVX2 or 12 on AVX-512)
    # nor on the thread count
    for m in (1, 5, 6, 7, 11, 12, 13, 16, 97):
        for start in (0, 3, 150):
            assert torch.equal(lin(x[start : start + m]), full[start : start + m])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lin(x), full)
    finally:
        torch.set_num_threads(threads)
    # strided rows (a view of a wider tensor, as the split gate/up output is)
    wide = torch.cat([x, torch.randn(250, 3, generator=g)], dim=1)[:, :k]
    assert wide.stride(0) == k + 3 and torch.equal(lin(wide), full)
    assert lin(x[:0]).shape == (0, n)


@needs_gemm
def test_cpu_gemm_refuses_bad_input() -> None:
    lin = make_linear(torch.randn(8, 4), None, "cpu")
    with pytest.raises(ValueError, match="expected fp32"):
        lin(torch.randn(3, 5))
    with pytest.raises(ValueError, match="expected fp32"):
        lin(torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected fp32"):
        lin(torch.randn(4, 3).t())


@pytest.mark.parametrize("backend", ["onednn", "cpu"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_and_gate_up_equal_separate_matmuls_bit_for_bit(bias: bool, backend: str) -> None:
    from engine.model import _LayerLinears
    from engine.weights import LayerWeights

    if not (onednn_available() if backend == "onednn" else cpu_gemm_available()):
        pytest.skip(f"linear backend {backend} unavailable here")

    g = torch.Generator().manual_seed(5)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    hidden, hq, hkv, inter = 64, 96, 32, 160
    w = LayerWeights(
        input_norm=r(hidden),
        q_proj=r(hq, hidden),
        k_proj=r(hkv, hidden),
        v_proj=r(hkv, hidden),
        q_bias=r(hq) if bias else None,
        k_bias=r(hkv) if bias else None,
        v_bias=r(hkv) if bias else None,
        o_proj=r(hidden, hq),
        o_bias=None,
        post_norm=r(hidden),
        gate_proj=r(inter, hidden),
        up_proj=r(inter, hidden),
        down_proj=r(hidden, inter),
    )
    fused = _LayerLinears.build(w, backend)
    x = r(16, hidden)
    q, k, v = fused.qkv(x)
    assert torch.equal(q, make_linear(w.q_proj, w.q_bias, backend)(x))
    assert torch.equal(k, make_linear(w.k_proj, w.k_bias, backend)(x))
    assert torch.equal(v, make_linear(w.v_proj, w.v_bias, backend)(x))
    gate, up = fused.gate_up(x)
    assert torch.equal(gate, make_linear(w.gate_proj, None, backend)(x))
    assert torch.equal(up, make_linear(w.up_proj, None, backend)(x))
    ref = _LayerLinears.build(w, "torch")
    torch.testing.assert_close(ref.qkv(x)[0], q, atol=1e-4, rtol=1e-5)
