"""The torch reference attention (engine/attention.py) against a naive dense causal attention
computed per sequence from contiguous K/V, and its KV write against hand-computed slots.

The case builder here (``make_case``) is shared with tests/unit/test_triton_kernels.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from engine.attention import AttentionMetadata, TorchAttention
from engine.attention_backends import get_backend

pytestmark = pytest.mark.unit


@dataclass(slots=True)
class Case:
    meta: AttentionMetadata
    q: torch.Tensor  # (T, H_q, D) this step's queries
    k_new: torch.Tensor  # (T, H_kv, D) this step's keys, not yet in the pool
    v_new: torch.Tensor  # (T, H_kv, D)
    kv_layer: torch.Tensor  # (N, 2, H_kv, B, D) cached prefixes written, this step's slots zero
    contexts: list[tuple[torch.Tensor, torch.Tensor]]  # per seq, contiguous K, V (ctx, H_kv, D)
    scale: float


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    block_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
    spare_blocks: int = 3,
) -> Case:
    """A flat batch whose sequences own shuffled (non-contiguous, interleaved) blocks of one pool.
    Each sequence's whole context is drawn contiguously first; the cached prefix (positions before
    this step's tokens) is stored into the pool by a plain loop, independent of any write_kv."""
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for nb in need:
        tables.append(perm[used : used + nb])
        used += nb
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    kv_layer = torch.zeros(num_blocks, 2, num_kv_heads, block_size, head_dim, dtype=dtype)
    contexts, q_rows, k_rows, v_rows = [], [], [], []
    for q_len, ctx, table in zip(query_lens, seq_lens, tables, strict=True):
        k, v = rand(ctx, num_kv_heads, head_dim), rand(ctx, num_kv_heads, head_dim)
        contexts.append((k, v))
        for pos in range(ctx - q_len):
            kv_layer[table[pos // block_size], 0, :, pos % block_size] = k[pos]
            kv_layer[table[pos // block_size], 1, :, pos % block_size] = v[pos]
        q_rows.append(rand(q_len, num_q_heads, head_dim))
        k_rows.append(k[ctx - q_len :])
        v_rows.append(v[ctx - q_len :])
    return Case(
        meta=meta,
        q=torch.cat(q_rows),
        k_new=torch.cat(k_rows),
        v_new=torch.cat(v_rows),
        kv_layer=kv_layer,
        contexts=contexts,
        scale=head_dim**-0.5,
    )


def naive_attention(case: Case) -> torch.Tensor:
    """Dense causal attention per sequence and head, in float64, from the contiguous contexts."""
    rows = []
    start = 0
    num_q_heads = case.q.shape[1]
    for q_len, (k, v) in zip(case.meta.query_lens_list, case.contexts, strict=True):
        ctx = k.shape[0]
        group = num_q_heads // k.shape[1]
        q = case.q[start : start + q_len].double()
        out = torch.empty(q_len, num_q_heads, q.shape[2], dtype=torch.float64)
        for h in range(num_q_heads):
            kh, vh = k[:, h // group].double(), v[:, h // group].double()  # (ctx, D)
            scores = q[:, h] @ kh.T * case.scale  # (q_len, ctx)
            for j in range(q_len):
                scores[j, ctx - q_len + j + 1 :] = float("-inf")  # query j sits at ctx - q_len + j
            out[:, h] = torch.softmax(scores, dim=-1) @ vh
        rows.append(out)
        start += q_len
    return torch.cat(rows)


# (query_lens, seq_lens): prefill chunks after a cached prefix, whole prompts, decodes
MIXED = ([6, 3, 9, 1, 1, 1], [11, 3, 9, 1, 6, 17])
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)], ids=["gqa", "mha", "mqa"])
def test_reference_matches_dense_attention(
    dtype: torch.dtype, block_size: int, heads: tuple[int, int]
) -> None:
    case = make_case(*MIXED, block_size, *heads, head_dim=16, dtype=dtype, seed=block_size)
    attn = TorchAttention()
    attn.write_kv(case.k_new, case.v_new, case.kv_layer, case.meta.slot_mapping)
    out = attn.forward(case.q, case.kv_layer, case.meta, case.scale)
    assert out.dtype == dtype and out.shape == case.q.shape
    torch.testing.assert_close(out.double(), naive_attention(case), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("query_lens, seq_lens", [([5], [5]), ([1, 1], [4, 9]), ([2, 7], [2, 20])])
def test_reference_prefill_only_decode_only(query_lens: list[int], seq_lens: list[int]) -> None:
    case = make_case(query_lens, seq_lens, 4, 4, 2, 16, torch.float32, seed=7)
    attn = TorchAttention()
    attn.write_kv(case.k_new, case.v_new, case.kv_layer, case.meta.slot_mapping)
    out = attn.forward(case.q, case.kv_layer, case.meta, case.scale)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=0)


def test_metadata_slots_and_split() -> None:
    meta = AttentionMetadata.build([3, 1, 1], [6, 5, 1], [[7, 2], [0, 4], [5]], block_size=4)
    # seq 0: positions 3,4,5 -> block 7 off 3, block 2 off 0, block 2 off 1
    # seq 1: position 4 -> block 4 off 0; seq 2: position 0 -> block 5 off 0
    assert meta.slot_mapping.tolist() == [31, 8, 9, 16, 20]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 5]
    assert meta.block_tables.tolist() == [[7, 2], [0, 4], [5, 0]]
    assert (meta.num_prefill_seqs, meta.num_prefill_tokens, meta.num_decode_seqs) == (1, 3, 2)
    with pytest.raises(ValueError, match="before decodes"):
        AttentionMetadata.build([1, 2], [3, 2], [[0], [1]], block_size=4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_write_kv_places_each_token_at_its_block_and_offset(backend: str) -> None:
    block_size, heads, dim = 4, 2, 16
    kv = torch.zeros(6, 2, heads, block_size, dim)
    slots = torch.tensor([9, 3, 20, 4, 23], dtype=torch.int64)  # (block, offset): 2,1 0,3 5,0 1,0 5,3
    tokens = torch.arange(1, 6, dtype=torch.float32)  # token t carries value t+1 (K) and -(t+1) (V)
    k = tokens[:, None, None].expand(5, heads, dim).contiguous()
    get_backend(backend).write_kv(k, -k, kv, slots)
    for t, (blk, off) in enumerate([(2, 1), (0, 3), (5, 0), (1, 0), (5, 3)]):
        assert torch.equal(kv[blk, 0, :, off], torch.full((heads, dim), t + 1.0))
        assert torch.equal(kv[blk, 1, :, off], torch.full((heads, dim), -(t + 1.0)))
    assert int((kv != 0).sum()) == 5 * 2 * heads * dim  # nothing else touched


def test_write_kv_casts_to_pool_dtype() -> None:
    kv = torch.zeros(2, 2, 1, 4, 16, dtype=torch.bfloat16)
    k = torch.full((1, 1, 16), 1.0 + 2**-9)  # a quarter bf16 ulp above 1.0: rounds to 1.0
    TorchAttention().write_kv(k, 2 * k, kv, torch.tensor([5]))
    assert kv[1, 0, 0, 1].tolist() == [1.0] * 16 and kv[1, 1, 0, 1].tolist() == [2.0] * 16


def test_decode_length_groups_bound_padding() -> None:
    from engine.attention import _length_groups

    assert _length_groups([10, 10, 10, 10]) == [[0, 1, 2, 3]]
    # one long context is kept apart from the short ones, which share one padded call
    assert _length_groups([2048, 100, 120, 90, 110]) == [[0], [2, 4, 1, 3]]
    assert _length_groups([17, 1, 6]) == [[0], [2], [1]]
    assert _length_groups([]) == []


def test_reference_decode_rows_split_into_length_groups() -> None:
    # eight decodes with very different contexts: several groups, rows scattered back in order
    lens = [3, 40, 5, 41, 2, 39, 64, 4]
    case = make_case([1] * len(lens), lens, 4, 4, 2, 16, torch.float32, seed=3)
    attn = TorchAttention()
    attn.write_kv(case.k_new, case.v_new, case.kv_layer, case.meta.slot_mapping)
    out = attn.forward(case.q, case.kv_layer, case.meta, case.scale)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=1e-5, rtol=0)
