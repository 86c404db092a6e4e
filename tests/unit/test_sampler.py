"""Sampler: greedy = argmax, (seed, position)-keyed draws, exact filtering, distribution, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import Sampler, exponential_noise, filter_logits, mix_seed
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

HAND_PROBS = torch.tensor([0.5, 0.25, 0.15, 0.10])  # a hand-made distribution
HAND_LOGITS = HAND_PROBS.log().unsqueeze(0)  # (1, 4)


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def _filter(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    rows = logits.shape[0]
    return filter_logits(
        logits,
        torch.full((rows,), temperature),
        torch.full((rows,), top_k, dtype=torch.int64),
        torch.full((rows,), top_p),
        torch.full((rows,), min_p),
    )


def test_greedy_equals_argmax_with_ties_to_lowest_id() -> None:
    logits = _logits(6, 50)
    logits[2, 7] = logits[2, 30] = 100.0  # a tie: the lowest id wins
    out = Sampler().sample(logits, [SamplingParams()] * 6, [0] * 6, list(range(6)))
    assert out.token_ids == logits.argmax(dim=1).tolist()
    assert out.token_ids[2] == 7
    assert out.logprobs == [None] * 6 and out.top_logprobs == [None] * 6


def test_mix_seed_is_stable_and_separates_inputs() -> None:
    # Frozen values: a change here would silently change every seeded request's output.
    assert mix_seed(0, 0) == 0x2848D6A4A7B28BC1
    assert mix_seed(1234, 7) == 0x5AFF033EE7A6D19C
    seeds = {mix_seed(s, p) for s in range(20) for p in range(20)}
    assert len(seeds) == 400


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, top_k=100, top_p=0.95),
        SamplingParams(temperature=1.1, top_p=0.9),
        SamplingParams(temperature=1.5, min_p=0.01),
    ],
    ids=["top_k+top_p", "top_p", "min_p"],
)
def test_seeded_draw_is_reproducible_and_independent_of_batch(params: SamplingParams) -> None:
    vocab = 300
    target = _logits(1, vocab, seed=5)
    sampler = Sampler()
    alone = [sampler.sample(target, [params], [11], [pos]).token_ids[0] for pos in range(25)]
    again = [sampler.sample(target, [params], [11], [pos]).token_ids[0] for pos in range(25)]
    assert alone == again
    assert len(set(alone)) > 5  # really random across positions

    others = [
        SamplingParams(),
        SamplingParams(temperature=1.3, min_p=0.1),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.5),
    ]
    for pos in range(25):
        for row in (0, 2, 4):  # the target row at different places in a batch of 5
            batch = list(_logits(4, vocab, seed=100 + pos))
            batch.insert(row, target[0])
            ps = others[:row] + [params] + others[row:]
            seeds = [3, 4, 5, 6]
            seeds.insert(row, 11)
            positions = [pos + 17, 2, 9, pos]
            positions.insert(row, pos)
            out = sampler.sample(torch.stack(batch), ps, seeds, positions)
            assert out.token_ids[row] == alone[pos]


def test_different_seed_or_position_changes_noise() -> None:
    assert torch.equal(exponential_noise(1, 2, 64), exponential_noise(1, 2, 64))
    assert not torch.equal(exponential_noise(1, 2, 64), exponential_noise(1, 3, 64))
    assert not torch.equal(exponential_noise(1, 2, 64), exponential_noise(2, 2, 64))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=2.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
    ],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    logits = _logits(64, 200, seed=3)
    out = Sampler().sample(logits, [params] * 64, list(range(64)), [9] * 64)
    assert out.token_ids == logits.argmax(dim=1).tolist()


def test_min_p_filter_exact() -> None:
    # threshold = 0.4 * 0.5 = 0.2: keeps 0.5 and 0.25, drops 0.15 and 0.10.
    probs = torch.softmax(_filter(HAND_LOGITS, min_p=0.4), dim=1)[0]
    torch.testing.assert_close(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    # threshold = 0.25 * 0.5 = 0.125: keeps three.
    probs = torch.softmax(_filter(HAND_LOGITS, min_p=0.25), dim=1)[0]
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9)
    # And the sampler draws only kept tokens, both of them.
    p = SamplingParams(temperature=1.0, min_p=0.4)
    out = Sampler().sample(HAND_LOGITS.expand(400, 4).contiguous(), [p] * 400, [1] * 400, list(range(400)))
    assert set(out.token_ids) == {0, 1}


def test_top_k_and_top_p_filters_exact() -> None:
    probs = torch.softmax(_filter(HAND_LOGITS, top_k=2), dim=1)[0]
    torch.testing.assert_close(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    # top_p=0.7: 0.5 < 0.7 so the second token is needed; the mass before the third is 0.75.
    probs = torch.softmax(_filter(HAND_LOGITS, top_p=0.7), dim=1)[0]
    torch.testing.assert_close(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    probs = torch.softmax(_filter(HAND_LOGITS, top_p=0.8), dim=1)[0]
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9)
    # top-p applies to the top-k renormalized distribution: [2/3, 1/3] with top_p=0.6 keeps one.
    probs = torch.softmax(_filter(HAND_LOGITS, top_k=2, top_p=0.6), dim=1)[0]
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # Temperature applies first: T=0.5 squares the probabilities before min-p compares them.
    probs = torch.softmax(_filter(HAND_LOGITS, temperature=0.5, min_p=0.2), dim=1)[0]
    sq = torch.tensor([0.25, 0.0625, 0.0, 0.0])  # 0.0225 and 0.01 fall under 0.2 * 0.25
    torch.testing.assert_close(probs, sq / sq.sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_frequencies_match_softmax(temperature: float) -> None:
    """Chi-square over 20 000 deterministic draws (fixed seeds: the statistic is a fixed number)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0]])
    n = 20_000
    p = SamplingParams(temperature=temperature)
    out = Sampler().sample(logits.expand(n, 6).contiguous(), [p] * n, [42] * n, list(range(n)))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=0) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.52  # 5 degrees of freedom, p = 0.001
    # And a wrong distribution (no temperature applied / uniform) is rejected by the same check.
    wrong = torch.full((6,), n / 6.0, dtype=torch.float64)
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 1000


def test_logprobs_equal_log_softmax() -> None:
    logits = _logits(4, 100, seed=9)
    params = [
        SamplingParams(logprobs=3),
        SamplingParams(temperature=0.8, logprobs=0, seed=1),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.2, top_k=5, logprobs=5),
    ]
    out = Sampler().sample(logits, params, [1, 1, 2, 3], [0, 5, 5, 5])
    lsm = torch.log_softmax(logits, dim=1)
    for row in (0, 1, 3):
        assert math.isclose(out.logprobs[row], float(lsm[row, out.token_ids[row]]), abs_tol=1e-6)
    assert out.logprobs[2] is None and out.top_logprobs[2] is None
    assert out.top_logprobs[1] == []
    for row, k in ((0, 3), (3, 5)):
        top = out.top_logprobs[row]
        assert [t for t, _ in top] == lsm[row].argsort(descending=True)[:k].tolist()
        for tok, lp in top:
            assert math.isclose(lp, float(lsm[row, tok]), abs_tol=1e-6)
    assert out.top_logprobs[0][0][0] == out.token_ids[0]  # greedy picks the top logprob
