"""The one-call-per-layer decode step (engine/kernels/cpu_decode.py) against the model's own forward:
the same hidden states and the same KV cache, bit for bit, for dense fp32 weights and for GGUF
weights multiplied natively (fused q/k/v and gate/up, and unfused where the parts' types differ),
with several sequences of different lengths in one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.kernels.native import compiler
from engine.model import Model, load_model
from engine.quant import cpu_kernels
from tests.helpers_checkpoints import make_checkpoint
from tests.helpers_gguf import GGUF_DIMS, write_gguf

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        compiler() is None or not cpu_kernels.available(), reason="the C kernels cannot build here"
    ),
]

B = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("plan-src"), **GGUF_DIMS)


def _step(
    model: Model, kv: torch.Tensor, lens: list[int], tables: list[list[int]], ids: list[int]
) -> torch.Tensor:
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, B)
    return model.forward(torch.tensor(ids), torch.tensor([n - 1 for n in lens]), kv, meta)


@pytest.mark.parametrize("kind", ["fp32", "Q4_1", "mixed"])
def test_decode_plan_equals_the_forward_bit_for_bit(kind: str, source: Path, tmp_path: Path) -> None:
    if kind == "fp32":
        path = source
    else:  # mixed: attn_k / ffn_up in another type, so q/k/v and gate/up are not fused
        types = {"attn_k": "Q6_K", "ffn_up": "Q8_0"} if kind == "mixed" else None
        path = write_gguf(tmp_path / f"{kind}.gguf", source, "Q4_1", types=types)
    model = load_model(path)
    plan = model.decode_plan
    assert plan is not None
    assert [len(p) for p in plan.kernels[0][::2]] == ([3, 2] if kind == "mixed" else [1, 1])
    lens, tables = [5, 40, 17], [[1], [2, 3, 4], [5, 6]]
    kv = model.kv_layout(B).allocate(8)
    # the prompts' KV through the regular (prefill) forward
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n - 1,), generator=g).tolist() for n in lens]
    for p, t in zip(prompts, tables, strict=True):
        meta = AttentionMetadata.build([len(p)], [len(p)], [t], B)
        model.forward(torch.tensor(p), torch.arange(len(p)), kv, meta)
    ids = [7, 99, 250]
    kv_plan = kv.clone()
    got = _step(model, kv_plan, lens, tables, ids).clone()
    model.decode_plan = None  # the torch-driven forward over the same kernels
    want = _step(model, kv, lens, tables, ids)
    assert torch.equal(got, want)
    assert torch.equal(kv_plan, kv)
    model.decode_plan = plan  # one sequence alone: its row is the same (batch invariance)
    alone = _step(model, kv_plan.clone(), lens[1:2], tables[1:2], ids[1:2])
    assert torch.equal(alone[0], want[1])


def test_no_plan_where_a_part_is_not_a_c_kernel(source: Path) -> None:
    assert load_model(source, linear_backend="torch").decode_plan is None
    assert load_model(source, attn_backend="torch").decode_plan is None
