"""``tandem bench kv-quant``: what a quantized KV cache (fp8_e4m3, int8: engine/kv_quant.py) costs in
accuracy and saves in bytes, against the run dtype's cache, on a fixed prompt set.

For each prompt the fp32-cache engine generates greedily; then each cache dtype runs the prompt and
that continuation teacher-forced (one forward: the quantized rows a prefill writes are the ones a
decode would write, row by row), and at every generated position compares the next-token
distributions: greedy agreement (the same argmax) and KL(p_fp32 || p_quantized), mean and max.
Bytes per token are one token's K and V over all layers, as the pool stores them (scales included).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
    "import numpy as np\nx = np.",
    "The quick brown fox jumps over",
)


@dataclass(slots=True)
class KVAccuracy:
    kv_dtype: str
    positions: int
    greedy_agreement: float  # share of positions whose argmax equals the reference's
    mean_kl: float  # nats, KL(reference || this)
    max_kl: float
    bytes_per_token: int  # K and V of one token over all layers, scales included


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    from engine.attention import AttentionMetadata

    layout = model.kv_layout(16)
    kv = layout.allocate(layout.blocks_for(len(ids)) + 1)
    meta = AttentionMetadata.build(
        [len(ids)], [len(ids)], [list(range(1, layout.blocks_for(len(ids)) + 1))], 16
    )
    hidden = model.forward(torch.tensor(ids), torch.arange(len(ids)), kv, meta)
    return model.compute_logits(hidden)  # (T, V) fp32


def measure(
    path: Path, kv_dtypes: list[str], prompts: tuple[str, ...] = PROMPTS, max_new: int = 32
) -> list[KVAccuracy]:
    """Accuracy of each KV dtype against the run dtype's cache (``auto``), fp32, greedy."""
    import torch

    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.model import load_model
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=path, max_num_seqs=len(prompts)))
    tok = engine.tokenizer
    assert tok is not None, "kv-quant needs a checkpoint with a tokenizer"
    ids = [tok.encode(p) for p in prompts]
    outs = engine.generate(ids, SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True))
    engine.close()
    seqs = [p + o.new_token_ids for p, o in zip(ids, outs, strict=True)]
    reference = engine.model  # the run dtype's cache
    refs = [_logits(reference, s)[len(p) - 1 : -1] for p, s in zip(ids, seqs, strict=True)]  # (n, V) each
    results = []
    for kind in ["auto", *kv_dtypes]:
        model = reference if kind == "auto" else load_model(path, kv_cache_dtype=kind)
        agree, kls = 0, []
        for p, s, ref in zip(ids, seqs, refs, strict=True):
            got = _logits(model, s)[len(p) - 1 : -1]
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            logp, logq = ref.log_softmax(-1), got.log_softmax(-1)
            kls.append((logp.exp() * (logp - logq)).sum(-1))  # (n,)
        kl = torch.cat(kls)
        layout = model.kv_layout(16)
        results.append(
            KVAccuracy(
                layout.cache_dtype,
                kl.numel(),
                agree / kl.numel(),
                float(kl.mean()),
                float(kl.max()),
                layout.layer_block_bytes * layout.num_layers // layout.block_size,
            )
        )
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="a checkpoint with a tokenizer (default smollm2)")
    p.add_argument("--kv-dtypes", nargs="+", default=["fp8_e4m3", "int8"], choices=["fp8_e4m3", "int8"])
    p.add_argument("--max-new", type=int, default=32, help="generated tokens per prompt")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from engine.kernels.native import describe_host
    from engine.model_source import resolve_model

    path = resolve_model(args.model)
    rows = measure(path, list(args.kv_dtypes), max_new=args.max_new)
    if args.json:
        print(json.dumps({"host": describe_host(), "model": str(path), "rows": [asdict(r) for r in rows]}))
        return 0
    print(f"host: {describe_host()}")
    print(f"model: {path.name}; {len(PROMPTS)} prompts x {args.max_new} greedy tokens, fp32 activations")
    base = rows[0].bytes_per_token
    head = f"{'KV cache':<10} {'positions':>9} {'greedy agree':>12} {'mean KL':>10} {'max KL':>9}"
    print(head + f" {'bytes/token':>11} {'vs run dtype':>12}")
    for r in rows:
        print(
            f"{r.kv_dtype:<10} {r.positions:>9} {r.greedy_agreement:>11.1%} {r.mean_kl:>10.2e} "
            f"{r.max_kl:>9.2e} {r.bytes_per_token:>11} {r.bytes_per_token / base:>11.2f}x"
        )
    print(
        "KL(run dtype's cache || this one) in nats, at every generated position, teacher-forced",
        file=sys.stderr,
    )
    return 0
