"""``tandem bench engine``: output tokens/s of Tandem's engine against transformers ``generate``.

Workload (fixed seed): N requests, prompt lengths uniform in [16, 512], output lengths uniform in
[16, 256], random token ids, EOS ignored. The reference runs them as its users do — static batches of
``concurrency`` with left padding, each batch generating until its longest request is done; Tandem
runs them with continuous batching at the same concurrency. Both count only the requested output
tokens, in one process, one after the other, on the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(
    n: int, vocab: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]
) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    outs = [rng.randint(*output_range) for _ in range(n)]
    return Workload(prompts, outs)


def run_tandem(
    model_dir: Path,
    w: Workload,
    concurrency: int,
    dtype: str,
    backend: str,
    linear_backend: str = "auto",
    moe_backend: str = "auto",
) -> float:
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=dtype,
            attn_backend=backend,
            linear_backend=linear_backend,
            moe_backend=moe_backend,
            max_num_seqs=concurrency,
        )
    )
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in w.output_lens]
    # warm-up: one short request, not timed
    engine.generate([w.prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True))
    t0 = time.perf_counter()
    for p, sp in zip(w.prompts, params, strict=True):
        engine.add_request(p, sp)
    done, produced, last = 0, 0, t0
    while engine.has_unfinished():
        for out in engine.step():
            produced += len(out.new_token_ids)
            done += out.finished
        now = time.perf_counter()
        if now - last > 5:
            print(f"  tandem: {done}/{len(w.prompts)} requests, {produced} tokens", file=sys.stderr)
            last = now
    elapsed = time.perf_counter() - t0
    assert produced == w.output_tokens, (produced, w.output_tokens)
    engine.close()
    return elapsed


def run_transformers(model_dir: Path, w: Workload, batch: int, dtype: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype)
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run_batch(prompts: list[list[int]], max_new: int) -> None:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad,
            )
        assert out.shape[1] == width + max_new

    run_batch([w.prompts[0][:16]], 4)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(w.prompts), batch):
        run_batch(w.prompts[i : i + batch], max(w.output_lens[i : i + batch]))
        print(f"  transformers: {min(i + batch, len(w.prompts))}/{len(w.prompts)} requests", file=sys.stderr)
    return time.perf_counter() - t0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint dir (default: the 'bench' preset, made on first use)"
    )
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    p.add_argument("--linear-backend", default="auto", choices=["auto", "torch", "onednn", "cpu"])
    p.add_argument("--skip-reference", action="store_true", help="time Tandem only")
    p.add_argument("--json", action="store_true")
    from engine.make_model import ARCHS, PRESETS

    p.add_argument(
        "--arch",
        nargs="+",
        default=None,
        choices=sorted(ARCHS),
        help="Tandem on these families' checkpoints of --preset beside the dense llama of the same size "
        "(benchmarks/bench_archs.py; no transformers run)",
    )
    p.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="the size --arch compares at")
    p.add_argument(
        "--moe-backend",
        nargs="+",
        default=["auto"],
        choices=["auto", "cpu", "grouped", "triton"],
        help="the routed experts' backend(s): with --arch, each MoE family runs once per backend",
    )
    p.add_argument("--repeat", type=int, default=1, help="with --arch: rounds over the models (best counts)")


def run(args: argparse.Namespace) -> int:
    from engine.config import ModelConfig
    from engine.demo import bench_model_dir
    from engine.kernels.native import describe_host

    if args.arch:
        from benchmarks.bench_archs import run_archs

        return run_archs(args, list(args.arch), make_workload, run_tandem)

    model_dir = Path(args.model) if args.model else bench_model_dir()
    cfg = ModelConfig.from_pretrained(model_dir, args.dtype)
    w = make_workload(
        args.num_requests, cfg.vocab_size, args.seed, tuple(args.prompt_len), tuple(args.output_len)
    )
    print(
        f"workload: {len(w.prompts)} requests, {sum(map(len, w.prompts))} prompt tokens, "
        f"{w.output_tokens} output tokens; model {model_dir}",
        file=sys.stderr,
    )
    t_tandem = run_tandem(model_dir, w, args.concurrency, args.dtype, args.attn_backend, args.linear_backend)
    t_ref = None if args.skip_reference else run_transformers(model_dir, w, args.concurrency, args.dtype)
    rows = [Result("tandem (continuous batching)", t_tandem, w.output_tokens / t_tandem)]
    if t_ref is not None:
        rows.append(
            Result(f"transformers (static batches of {args.concurrency})", t_ref, w.output_tokens / t_ref)
        )
    ratio = (rows[0].tokens_per_s / rows[1].tokens_per_s) if t_ref is not None else None
    host = describe_host()
    if args.json:
        results = [asdict(r) for r in rows]
        print(json.dumps({"results": results, "ratio": ratio, "model": str(model_dir), "host": host}))
    else:
        print(f"host: {host}")
        print(f"{'engine':<40} {'seconds':>9} {'output tok/s':>13}")
        for r in rows:
            print(f"{r.name:<40} {r.seconds:>9.1f} {r.tokens_per_s:>13.1f}")
        if ratio is not None:
            print(f"ratio tandem / transformers: {ratio:.2f}x")
    return 0


@dataclass(slots=True)
class Result:
    name: str
    seconds: float
    tokens_per_s: float
