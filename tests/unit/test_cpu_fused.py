"""The fused C layer ops (engine/kernels/cpu_fused.c) against the torch expressions they replace:
every output bit equal, including the RMSNorm's mean, whose sum follows torch's summation order."""

from __future__ import annotations

import pytest
import torch

from engine.attention import TorchAttention
from engine.kernels import cpu_fused
from engine.kernels.cpu_fused import FusedCpuOps, TorchLayerOps, rms_norm
from engine.kernels.native import compiler
from engine.rope import RotaryTables
from tests.host import FUSED_EXPECTED

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(compiler() is None, reason="no C compiler: the kernel cannot be built here"),
]


def _rope(d: int, positions: int = 512) -> RotaryTables:
    angles = torch.arange(positions).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    return RotaryTables(cos=angles.cos(), sin=angles.sin())


def _ops(d: int) -> tuple[FusedCpuOps, TorchLayerOps]:
    rope = _rope(d)
    fused = FusedCpuOps.create(rope, d)
    if fused is None and not FUSED_EXPECTED:
        pytest.skip(
            f"torch's summation order under {torch.backends.cpu.get_cpu_capability()} is not one we follow"
        )
    assert fused is not None, cpu_fused.LIBRARY.load_error or "fused RMSNorm refused on a known capability"
    return fused, TorchLayerOps(rope, TorchAttention(), d)


@pytest.mark.skipif(not FUSED_EXPECTED, reason="the lane count is stated for x86 torch only")
def test_torch_sums_with_eight_lanes_under_every_x86_capability() -> None:
    """What the fast path relies on, stated: under DEFAULT, AVX2 and AVX512 alike (CI runs this
    module natively and under ATEN_CPU_CAPABILITY=avx2), the 8-lane order reproduces torch."""
    assert cpu_fused.torch_sum_width(torch.backends.cpu.get_cpu_capability()) == 8


def test_a_summation_order_torch_does_not_follow_is_refused_and_the_model_keeps_torch_ops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    """The refusal branch, on every machine: 3 lanes is an order no torch kernel sums in, so the
    load-time comparison fails, ``create`` returns None and a model built now runs the torch ops
    (and still gives transformers' floats: tests/integration/test_model_logits.py)."""
    from engine.model import load_model
    from tests.helpers_checkpoints import make_checkpoint

    monkeypatch.setattr(cpu_fused, "CANDIDATE_WIDTHS", (3,))
    with caplog.at_level("WARNING", logger=cpu_fused.__name__):
        assert FusedCpuOps.create(_rope(8), 8) is None
    assert "reproduces none of torch's summation orders (3,)" in caplog.text
    model = load_model(make_checkpoint(tmp_path, "llama"), attn_backend="cpu")
    assert isinstance(model.ops, TorchLayerOps)
    monkeypatch.undo()
    if FUSED_EXPECTED:  # and with the real candidates the same model takes the fused ops
        model = load_model(make_checkpoint(tmp_path / "again", "llama"), attn_backend="cpu")
        assert isinstance(model.ops, FusedCpuOps)


@pytest.mark.parametrize("n", [3, 7, 64, 100, 512, 896, 1000, 4096, 5000])  # 3, 7: shorter than a vector
@pytest.mark.parametrize("t", [1, 7, 300])  # 300 x >= 218 columns takes the OpenMP path
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_equals_torch_bit_for_bit(n: int, t: int, with_delta: bool) -> None:
    g = torch.Generator().manual_seed(n * t)
    x = torch.randn(t, n, generator=g) * 3
    delta = torch.randn(t, n, generator=g) if with_delta else None
    w = torch.randn(n, generator=g)
    fused, ref = _ops(8)
    want_x, want_h = ref.add_rms_norm(x.clone(), delta, w, 1e-5)
    got_x, got_h = fused.add_rms_norm(x.clone(), delta, w, 1e-5)
    assert torch.equal(got_x, want_x)
    assert torch.equal(got_h, want_h)
    assert torch.equal(want_h, rms_norm(want_x, w, 1e-5))


def test_add_rms_norm_updates_x_in_place_and_checks_its_inputs() -> None:
    fused, _ = _ops(8)
    x, delta, w = torch.zeros(2, 16), torch.ones(2, 16), torch.ones(16)
    out_x, _ = fused.add_rms_norm(x, delta, w, 1e-6)
    assert out_x.data_ptr() == x.data_ptr() and torch.equal(x, torch.ones(2, 16))
    with pytest.raises(ValueError, match="contiguous fp32"):
        fused.add_rms_norm(torch.zeros(16, 2).t(), None, torch.ones(16), 1e-6)
    with pytest.raises(ValueError, match="contiguous fp32"):
        fused.add_rms_norm(x, delta.double(), w, 1e-6)


@pytest.mark.parametrize(
    ("h", "h_kv", "d", "b", "t"),
    [
        (8, 4, 64, 16, 5),  # GQA
        (4, 4, 32, 8, 70),  # MHA, 70 tokens takes the OpenMP path
        (8, 1, 128, 4, 3),  # MQA, head_dim 128
    ],
)
def test_rope_write_kv_equals_torch_bit_for_bit(h: int, h_kv: int, d: int, b: int, t: int) -> None:
    g = torch.Generator().manual_seed(h * d + t)
    qkv = torch.randn(t, (h + 2 * h_kv) * d, generator=g)  # one matmul's output, split into views
    q, k, v = qkv.split([h * d, h_kv * d, h_kv * d], dim=-1)
    positions = torch.randint(0, 512, (t,), generator=g)
    n = t // b + 6
    slots = torch.randperm(n * b, generator=g)[:t]
    slots[t // 2] = -1  # padding: written nowhere
    fused, ref = _ops(d)
    pool = torch.randn(n, 2, h_kv, b, d, generator=g)
    want_pool, got_pool = pool.clone(), pool.clone()
    want = ref.rope_write_kv(q, k, v, ref.prepare(positions, slots, n * b), want_pool)
    got = fused.rope_write_kv(q, k, v, fused.prepare(positions, slots, n * b), got_pool)
    assert got.shape == (t, h, d) and got.is_contiguous()
    assert torch.equal(got, want)
    assert torch.equal(got_pool, want_pool)
    assert not torch.equal(got_pool, pool)  # something was written
    # the padded token's K/V landed nowhere: only t - 1 slots of each of K and V changed
    changed = (got_pool != pool).any(-1)  # (n, 2, h_kv, b)
    assert int(changed.sum()) == 2 * h_kv * (t - 1)


def test_rope_write_kv_refuses_out_of_range_slots_and_positions() -> None:
    fused, _ = _ops(8)
    q, k, v = torch.randn(2, 16), torch.randn(2, 8), torch.randn(2, 8)
    pool = torch.zeros(3, 2, 1, 4, 8)
    with pytest.raises(IndexError, match="beyond the KV pool"):
        fused.rope_write_kv(q, k, v, fused.prepare(torch.tensor([0, 1]), torch.tensor([0, 12]), 12), pool)
    with pytest.raises(IndexError, match="rotary table"):
        fused.prepare(torch.tensor([3, 512]), torch.tensor([0, 1]), 12)
    with pytest.raises(ValueError, match="heads"):
        fused.rope_write_kv(
            q, k, v, fused.prepare(torch.tensor([0, 1]), torch.tensor([0, 1]), 12), torch.zeros(3, 2, 2, 4, 8)
        )
    assert torch.equal(pool, torch.zeros_like(pool))


def test_without_a_compiler_the_model_keeps_the_torch_ops(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cpu_fused.LIBRARY.reset()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    try:
        assert FusedCpuOps.create(_rope(8), 8) is None
        assert cpu_fused.LIBRARY.load_error is not None
    finally:
        cpu_fused.LIBRARY.reset()
