"""Penalties: repetition equal to transformers' RepetitionPenaltyLogitsProcessor (prompt + output
tokens), frequency / presence equal to OpenAI's formula (output tokens), logprobs untouched, rows
without penalties untouched; greedy generation with a repetition penalty equals transformers'
``generate(repetition_penalty=...)`` on a tiny random checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.sampler import Sampler, apply_penalties
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

V = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # both signs


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_equals_transformers_processor(penalty: float) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    prompts = [[1, 2, 3, 3], [7], [4, 5]]
    outputs = [[9, 1], [], [5, 5, 8]]
    logits = _logits(3)
    ours = logits.clone()
    apply_penalties(ours, [SamplingParams(repetition_penalty=penalty)] * 3, prompts, outputs)
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    for i in range(3):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = proc(ids, logits[i : i + 1].clone())[0]
        assert torch.equal(ours[i], want)
    assert not torch.equal(ours, logits)


def test_frequency_and_presence_follow_openai() -> None:
    logits = _logits(1)
    prompt, output = [3, 4], [4, 4, 6, 3, 4]
    ours = logits.clone()
    apply_penalties(ours, [SamplingParams(frequency_penalty=0.5, presence_penalty=-1.25)], [prompt], [output])
    want = logits.clone()[0]
    for tok in set(output):  # only output tokens count; the prompt does not
        want[tok] -= 0.5 * output.count(tok) + (-1.25)
    assert torch.allclose(ours[0], want, atol=0, rtol=0)


def test_only_penalized_rows_change_and_logprobs_stay_raw() -> None:
    logits = _logits(2, seed=1)
    top = int(logits[0].argmax())
    params = [SamplingParams(repetition_penalty=50.0, logprobs=2), SamplingParams(logprobs=2)]
    out = Sampler().sample(logits.clone(), params, [0, 0], [3, 3], [([top], []), ([top], [])])
    assert out.token_ids[0] != top  # the penalized row avoids its repeated best token
    assert out.token_ids[1] == int(logits[1].argmax())
    raw = torch.log_softmax(logits, dim=1)
    assert out.logprobs[0] == pytest.approx(float(raw[0, out.token_ids[0]]), abs=1e-6)
    with pytest.raises(ValueError, match="penalties need"):
        Sampler().sample(logits.clone(), params, [0, 0], [3, 3])


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
    ],
)
def test_bad_penalties_are_refused(kw: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_greedy_with_repetition_penalty_equals_transformers_generate(tmp_path: Path) -> None:
    from engine.llm_engine import EngineConfig, LLMEngine
    from tests.helpers_checkpoints import load_reference, make_checkpoint

    path = make_checkpoint(tmp_path / "m")
    ref = load_reference(path)
    prompts = [[5, 9, 9, 17, 3, 5], [100, 101, 5, 100]]
    engine = LLMEngine(EngineConfig(model=path, dtype="float32"))
    try:
        for penalty in (1.5, 0.8):
            params = SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=penalty)
            got = engine.generate(prompts, params)
            for prompt, out in zip(prompts, got, strict=True):
                with torch.no_grad():
                    want = ref.generate(
                        torch.tensor([prompt]),
                        max_new_tokens=12,
                        do_sample=False,
                        repetition_penalty=penalty,
                        eos_token_id=None,
                        pad_token_id=0,
                    )[0, len(prompt) :].tolist()
                assert out.new_token_ids == want, penalty
        plain = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
        assert (
            plain[0].new_token_ids != got[0].new_token_ids or plain[1].new_token_ids != got[1].new_token_ids
        )
    finally:
        engine.close()
