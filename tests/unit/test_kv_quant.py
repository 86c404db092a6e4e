"""The quantized KV cache (engine/kv_quant.py): rows quantized within their format's precision, a
block's bytes independent of how its tokens were written, the C decode kernel reading codes in
place against the torch reference over the dequantized blocks, and a model running on such a pool."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, TorchAttention
from engine.kernels import cpu_attention
from engine.kernels.native import compiler
from engine.kv_layout import KVLayout
from engine.kv_quant import QMAX, QuantizedKVAttention, dequantize_rows, quantize_rows
from engine.model import load_model

pytestmark = pytest.mark.unit
KINDS = ("fp8_e4m3", "int8")


@pytest.mark.parametrize("kind", KINDS)
def test_rows_round_trip_within_the_formats_precision(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=g) * torch.logspace(-3, 2, 50).reshape(50, 1, 1)
    x[7, 1] = 0.0  # an all-zero row: scale 0, codes 0
    rows = quantize_rows(x, kind)
    assert rows.dtype == torch.uint8 and rows.shape == (50, 3, 68)
    back = dequantize_rows(rows, kind)
    scale = x.abs().amax(-1, keepdim=True) / QMAX[kind]
    if kind == "int8":  # rounding to the nearest step of the row's scale
        bound = scale / 2
    else:  # e4m3: 3 mantissa bits (half a step: 2^-4 relative), subnormal steps of 2^-9 scales
        bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10)
    assert ((back - x).abs() <= bound * (1 + 1e-6) + 1e-30).all()
    assert torch.equal(back[7, 1], torch.zeros(64))
    assert (back.abs().amax(-1) <= x.abs().amax(-1) * (1 + 1e-6)).all()  # the largest maps to QMAX


@pytest.mark.parametrize("kind", KINDS)
def test_a_block_written_token_by_token_equals_one_written_at_once(kind: str) -> None:
    """Rows are quantized alone: a prefill chunk, a decode step or a handoff write the same bytes."""
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(16, 2, 32, generator=g), torch.randn(16, 2, 32, generator=g)
    attn = QuantizedKVAttention(TorchAttention(), kind)
    whole, pieces = (
        torch.zeros(3, 2, 2, 8, 36, dtype=torch.uint8),
        torch.zeros(3, 2, 2, 8, 36, dtype=torch.uint8),
    )
    slots = torch.arange(8, 24)  # blocks 1 and 2 of 8 slots
    attn.write_kv(k, v, whole, slots)
    for lo, hi in ((0, 5), (5, 6), (6, 16)):
        attn.write_kv(k[lo:hi], v[lo:hi], pieces, slots[lo:hi])
    assert torch.equal(whole, pieces)
    assert torch.equal(
        dequantize_rows(whole[1, 0, :, 3], kind), dequantize_rows(quantize_rows(k[3], kind), kind)
    )


@pytest.mark.skipif(compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("kind", KINDS)
def test_the_c_kernel_reads_codes_as_the_reference_does(kind: str) -> None:
    hq, h, b, d, lens = 8, 2, 16, 64, [1, 17, 40, 300]
    g = torch.Generator().manual_seed(2)
    n = sum(-(-x // b) for x in lens) + 3
    pool = quantize_rows(torch.randn(n, 2, h, b, d, generator=g), kind)  # (N, 2, H_kv, B, D + 4)
    ids = (torch.randperm(n - 1, generator=g) + 1).tolist()
    tables, at = [], 0
    for x in lens:
        tables.append(ids[at : at + -(-x // b)])
        at += -(-x // b)
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, b)
    q = torch.randn(len(lens), hq, d, generator=g)
    reference = QuantizedKVAttention(TorchAttention(), kind)  # the dequantized blocks, torch attention
    want = reference.forward(q, pool, meta, d**-0.5)
    fast = QuantizedKVAttention(TorchAttention(), kind, decode_kernel=True)
    got = fast.forward(q, pool, meta, d**-0.5)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    one, two = torch.empty_like(q), torch.empty_like(q)
    args = (q, pool, meta.block_tables, meta.seq_lens, meta.seq_lens_list, d**-0.5)
    cpu_attention.paged_decode_quantized(*args, one, kind, threads=1)
    cpu_attention.paged_decode_quantized(*args, two, kind, threads=2)
    assert torch.equal(one, two)


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_on_a_quantized_pool(kind: str, checkpoint) -> None:  # type: ignore[no-untyped-def]
    ids = [5, 17, 9, 200, 3, 64, 64, 1, 300, 42, 7]

    def logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
        layout = model.kv_layout(4)
        kv = layout.allocate(4)
        meta = AttentionMetadata.build([len(ids)], [len(ids)], [[0, 1, 2]], 4)
        return model.compute_logits(model.forward(torch.tensor(ids), torch.arange(len(ids)), kv, meta))

    model = load_model(checkpoint, kv_cache_dtype=kind)
    layout = model.kv_layout(4)
    assert (layout.row_size, layout.torch_dtype, layout.cache_dtype) == (
        layout.head_dim + 4,
        torch.uint8,
        kind,
    )
    fp32 = KVLayout(layout.num_layers, layout.num_kv_heads, layout.head_dim, 4)
    assert layout.layer_block_bytes * 4 * layout.head_dim == fp32.layer_block_bytes * (layout.head_dim + 4)
    assert model.decode_plan is None  # the quantizing write is torch's
    full = load_model(checkpoint)
    got, want = logits(model), logits(full)
    assert not torch.equal(got, want)  # the cache is quantized ...
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # ... within its precision
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        load_model(checkpoint, kv_cache_dtype="fp4")


def test_the_cost_model_prices_the_bytes_a_quantized_cache_moves(checkpoint) -> None:  # type: ignore[no-untyped-def]
    from engine.config import ModelConfig
    from router.pools_backend import cost_params

    mc = ModelConfig.from_pretrained(checkpoint)
    fp32, fp8 = cost_params(mc, 16), cost_params(mc, 16, "fp8_e4m3")
    d = mc.head_dim
    assert fp32.kv_bytes_per_token == 2 * mc.num_layers * mc.num_kv_heads * d * 4
    assert fp8.kv_bytes_per_token == 2 * mc.num_layers * mc.num_kv_heads * (d + 4)  # codes + a scale per row
