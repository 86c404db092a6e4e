"""Turning one row of logits per sequence into the next token (greedy or seeded random), with logprobs.

Reproducibility is the point of this module's design: a random row's draw depends only on
``(seed, position)`` — never on the batch it was sampled in, its row index or the worker — so a
request that moves from the prefill worker to a decode worker, or is preempted and resumed in another
batch, continues with exactly the same tokens. Each random row gets its own ``torch.Generator``
seeded with a stable mix of (seed, position), draws exponential noise ``E`` over the vocabulary and
takes ``argmax(p / E)`` (the exponential-race form of the Gumbel-max trick: it samples from ``p``).

Order (per row): penalties (:func:`apply_penalties`: repetition over prompt + output tokens, then
frequency / presence over output tokens), temperature, top-k, top-p on the renormalized remainder,
min-p (relative to the largest remaining probability). Greedy rows take the argmax after the
penalties. Logprobs are always those of the raw logits (before penalties, temperature and
filtering), as vLLM reports them by default. Penalties depend only on the sequence's own tokens, so
a request gets the same ones on whichever worker samples it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # logprob of the sampled token when requested
    top_logprobs: list[list[tuple[int, float]] | None]  # top-k (id, logprob) when requested


def mix_seed(seed: int, position: int) -> int:
    """A stable 63-bit seed from (seed, position): splitmix64 finalizer over both (not Python's hash)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def exponential_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """(V,) float32 Exp(1) noise that depends only on (seed, position, vocab_size)."""
    return -torch.log(_uniform(seed, position, vocab_size))


def _uniform(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    # uniform_ is several times cheaper than exponential_ on CPU; the log is batched by the caller.
    gen = torch.Generator().manual_seed(mix_seed(seed, position))
    return torch.empty(vocab_size, dtype=torch.float32).uniform_(generator=gen)  # (V,) in [0, 1)


def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """Apply temperature and top-k/top-p/min-p to (S, V) logits; removed entries become -inf.

    temperature (S,) > 0; top_k (S,) int, 0 = off; top_p (S,) in (0, 1]; min_p (S,) in [0, 1].
    """
    x = logits.float() / temperature.unsqueeze(1)  # (S, V)
    use_k, use_p = top_k > 0, top_p < 1.0
    rows = (use_k | use_p).nonzero().squeeze(1)
    if rows.numel():
        x[rows] = _top_k_top_p(x[rows], top_k[rows], top_p[rows])
    if bool((min_p > 0).any()):
        probs = torch.softmax(x, dim=1)  # (S, V)
        threshold = min_p.unsqueeze(1) * probs.max(dim=1, keepdim=True).values  # (S, 1)
        x = x.masked_fill(probs < threshold, float("-inf"))
    return x


_TOP_P_CANDIDATES = 128  # top-p first tries this many candidates per row before a full sort


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top-k then top-p on (R, V) rows that use at least one of them."""
    vocab = x.shape[1]
    use_k, use_p = top_k > 0, top_p < 1.0
    # Only candidates can survive, so work on the top `cand` of each row instead of sorting the
    # vocabulary (a CPU sort of (64, 4096) costs as much as ~50 argmaxes). Rows with a k need their k;
    # rows with only top-p need enough candidates to hold top_p of their mass, else a full sort.
    k_max = int(top_k.max())
    cand = min(vocab, max(k_max, _TOP_P_CANDIDATES) if bool((~use_k).any()) else k_max)
    vals, idx = torch.topk(x, cand, dim=1, sorted=True)  # (R, C) descending
    lse_full = torch.logsumexp(x, dim=1)  # (R,) normalizer of rows without top-k
    p_only = use_p & ~use_k
    if cand < vocab and bool(p_only.any()):
        mass = torch.exp(torch.logsumexp(vals, dim=1) - lse_full)  # (R,) mass of the candidates
        if bool((mass[p_only] <= top_p[p_only] + 1e-4).any()):
            cand = vocab
            vals, idx = torch.topk(x, cand, dim=1, sorted=True)  # (R, V)
    rank = torch.arange(cand, device=x.device).unsqueeze(0)  # (1, C)
    k = torch.where(use_k, top_k.clamp(max=cand), torch.full_like(top_k, cand))  # (R,)
    remove = rank >= k.unsqueeze(1)  # (R, C)
    if bool(use_p.any()):
        kept = vals.masked_fill(remove, float("-inf"))  # (R, C)
        norm = torch.where(use_k, torch.logsumexp(kept, dim=1), lse_full)  # (R,) top-k renormalizes
        probs = torch.exp(kept - norm.unsqueeze(1))  # (R, C)
        # Exclusive cumulative mass: a token stays while the mass before it is < top_p, so the
        # most likely token always survives and the kept set is the smallest reaching top_p.
        # Rows with top_p == 1 are skipped outright: rounding can push the cumsum past 1.0.
        before = torch.cumsum(probs, dim=1) - probs  # (R, C)
        remove |= (before >= top_p.unsqueeze(1)) & use_p.unsqueeze(1)
        remove[:, 0] = False
    out = torch.full_like(x, float("-inf"))  # (R, V)
    return out.scatter_(1, idx, vals.masked_fill(remove, float("-inf")))


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
) -> None:
    """Penalize (S, V) float32 logits in place, row by row, for the rows whose params ask for it.

    Repetition (transformers' ``RepetitionPenaltyLogitsProcessor``): every token of prompt + output,
    logit / p when positive, logit * p when negative. Frequency and presence (OpenAI's): over the
    output tokens, logit -= f * count(token) + p * (count(token) > 0)."""
    vocab = logits.shape[1]
    dev = logits.device
    for i, p in enumerate(params):
        if not p.penalized:
            continue
        row = logits[i]  # (V,) a view: written in place
        if p.repetition_penalty != 1.0 and (prompts[i] or outputs[i]):
            seen = torch.tensor([*prompts[i], *outputs[i]], dtype=torch.int64, device=dev)  # (N,)
            score = row.gather(0, seen)
            score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
            row.scatter_(0, seen, score)  # repeated ids write the same value
        if (p.frequency_penalty or p.presence_penalty) and outputs[i]:
            out = torch.tensor(list(outputs[i]), dtype=torch.int64, device=dev)
            counts = torch.bincount(out, minlength=vocab).to(row.dtype)  # (V,)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


class Sampler:
    """Stateless: everything a draw depends on comes in through ``sample``'s arguments."""

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        seeds: list[int],
        positions: list[int],
        histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
    ) -> SampleOutput:
        """logits (S, V) float32, one row per sequence; seeds/positions per row (position = index
        of the token being sampled in its sequence); histories per row, (prompt ids, output ids so
        far), needed when a row's params ask for penalties."""
        num_rows, vocab = logits.shape
        if not (len(params) == len(seeds) == len(positions) == num_rows):
            raise ValueError("params, seeds and positions need one entry per logits row")
        logits = logits.float()
        dev = logits.device
        token_ids = [0] * num_rows
        scores = logits  # what tokens are chosen from; logprobs stay those of the raw logits
        if any(p.penalized for p in params):
            if histories is None or len(histories) != num_rows:
                raise ValueError("penalties need each row's (prompt, output) token ids")
            scores = logits.clone()
            apply_penalties(scores, params, [h[0] for h in histories], [h[1] for h in histories])

        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if greedy_rows:
            rows = scores if len(greedy_rows) == num_rows else scores[torch.tensor(greedy_rows, device=dev)]
            # torch.argmax returns the first maximal index: ties go to the lowest id.
            for row, tok in zip(greedy_rows, rows.argmax(dim=1).tolist(), strict=True):
                token_ids[row] = tok
        if random_rows:
            idx = torch.tensor(random_rows, device=dev)
            rp = [params[i] for i in random_rows]
            x = filter_logits(
                scores[idx],
                torch.tensor([p.temperature for p in rp], dtype=torch.float32, device=dev),
                torch.tensor([p.top_k for p in rp], dtype=torch.int64, device=dev),
                torch.tensor([p.top_p for p in rp], dtype=torch.float32, device=dev),
                torch.tensor([p.min_p for p in rp], dtype=torch.float32, device=dev),
            )  # (R, V)
            probs = torch.softmax(x, dim=1)  # (R, V); filtered entries are exactly 0
            # Noise is drawn on the CPU whatever the device, so a GPU and a CPU worker draw the same.
            uniform = torch.stack([_uniform(seeds[i], positions[i], vocab) for i in random_rows])  # (R, V)
            uniform = uniform.to(dev, non_blocking=True)
            noise = uniform.log_().neg_()  # (R, V) Exp(1); u = 0 gives inf, which only makes a token lose
            # Exponential race: argmax p_i / E_i is distributed as p. A zero-probability token can
            # never win (0 / E = 0 < any kept p / E), and E > 0 almost surely.
            choice = probs.div_(noise).argmax(dim=1).tolist()
            for row, tok in zip(random_rows, choice, strict=True):
                token_ids[row] = tok

        logprobs: list[float | None] = [None] * num_rows
        top_logprobs: list[list[tuple[int, float]] | None] = [None] * num_rows
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_rows:
            idx = torch.tensor(lp_rows, device=dev)
            lsm = torch.log_softmax(logits[idx], dim=1)  # (L, V) raw-logit logprobs
            chosen = (
                lsm.gather(1, torch.tensor([[token_ids[i]] for i in lp_rows], device=dev)).squeeze(1).tolist()
            )
            max_k = min(vocab, max(params[i].logprobs or 0 for i in lp_rows))
            top_vals, top_ids = lsm.topk(max_k, dim=1) if max_k else (None, None)  # (L, max_k)
            for j, row in enumerate(lp_rows):
                logprobs[row] = chosen[j]
                k = min(vocab, params[row].logprobs or 0)
                if k and top_vals is not None and top_ids is not None:
                    top_logprobs[row] = list(
                        zip(top_ids[j, :k].tolist(), top_vals[j, :k].tolist(), strict=True)
                    )
                else:
                    top_logprobs[row] = []
        return SampleOutput(token_ids, logprobs, top_logprobs)
