"""Greedy output against the transformers reference, stated so that it cannot flake by host.

fp32: token for token, always. bf16 / fp16: a different kernel (another CPU's native bf16
instructions, a batched instead of a one-sequence matmul, a chunked prefill) rounds differently,
and where the reference's top two logits are a near tie that can flip the argmax. So there the
outputs must agree up to the first token that differs, and at that token the reference's own
logits must show the near tie: ``logit[reference's token] - logit[our token]`` at most
``MARGIN_ULPS`` units in the last place of the dtype at the top logit's magnitude. Past that
token the two continuations legitimately differ and are not compared. A larger margin, or any
difference in fp32, is a failure.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MARGIN_ULPS = 2
_MANTISSA_BITS = {"bfloat16": 7, "float16": 10}


def ulp(dtype: str, value: float) -> float:
    """The spacing of ``dtype``'s floats at ``value`` (normal range)."""
    return 2.0 ** (math.floor(math.log2(max(abs(value), 1e-30))) - _MANTISSA_BITS[dtype])


def assert_greedy_matches(
    ref: Any, prompts: list[list[int]], expected: list[list[int]], got: list[list[int]], dtype: str
) -> list[tuple[int, int, float, float]]:
    """Check ``got`` against ``expected`` (the reference model ``ref``'s greedy tokens) by the rule
    above; returns the accepted near ties as (prompt index, token index, margin, bound)."""
    assert len(got) == len(expected)
    if dtype == "float32":
        assert got == expected
        return []
    ties = []
    for i, (prompt, want, have) in enumerate(zip(prompts, expected, got, strict=True)):
        if want == have:
            continue
        j = next((j for j, (a, b) in enumerate(zip(want, have, strict=False)) if a != b), None)
        assert j is not None, f"prompt {i}: {len(have)} tokens where the reference made {len(want)}"
        with torch.inference_mode():
            logits = ref(torch.tensor([prompt + want[:j]])).logits[0, -1].float()  # (vocab,)
        margin = float(logits[want[j]] - logits[have[j]])
        bound = MARGIN_ULPS * ulp(dtype, float(logits[want[j]]))
        assert margin <= bound, (
            f"prompt {i}, token {j}: {have[j]} where the reference chose {want[j]} by a margin of "
            f"{margin:.4g} in its logits, more than {MARGIN_ULPS} {dtype} ulps ({bound:.4g}): not a near tie"
        )
        ties.append((i, j, margin, bound))
    return ties
