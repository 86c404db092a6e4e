"""``tandem bench step``: what one engine step costs, by what it holds — the figures the scheduler's
time budget is set from.

An in-process engine runs N decoding sequences (their prompts prefilled first); then, for each
prefill size k, steps that carry the N decodes plus a k-token prompt chunk, timed, against decode-only
steps timed between them (the same contexts). Printed per k: the median step time, the prefill
tokens' marginal cost, and the same through the torch-driven forward instead of the one-C-call-per-
layer plan (``--compare-plan``: where the plan applies, a mixed step no longer pays the glue a
decode step does not). Last, the step cost model the engine fitted from every step it ran
(engine/step_cost.py): its coefficients and its error on the steps measured here.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2", help="smollm2 (default), demo, a checkpoint DIR or FILE.gguf"
    )
    p.add_argument("--decodes", type=int, default=16, help="running sequences")
    p.add_argument("--context", type=int, default=256, help="their prompt length")
    p.add_argument("--prefill", default="0,8,16,32,64,128", help="prompt chunk sizes per step")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compare-plan", action="store_true", help="also time the torch-driven forward")


def _engine(model: str, plan: bool) -> Any:
    from engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=model, detokenize=False, max_num_batched_tokens=1024))
    if not plan:
        engine.model.decode_plan = None
    return engine


def _measure(engine: Any, args: argparse.Namespace, sizes: list[int]) -> dict[int, tuple[float, float]]:
    """Per prefill size: (median step time, median decode-only step time), seconds."""
    from engine.sampling_params import SamplingParams

    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(16, vocab) for _ in range(n)]

    long = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    for _ in range(args.decodes):
        engine.add_request(prompt(args.context), long)
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()

    def timed() -> float:
        t = time.perf_counter()
        engine.step()
        return time.perf_counter() - t

    out = {}
    for k in sizes:
        mixed, plain = [], []
        for _ in range(args.repeat):
            plain.append(timed())
            if k:  # a k-token prompt, whole in this step (it samples its one token and ends)
                engine.add_request(prompt(k), SamplingParams(max_tokens=1, ignore_eos=True))
            mixed.append(timed())
        out[k] = (statistics.median(mixed), statistics.median(plain))
    return out


def run(args: argparse.Namespace) -> int:
    from engine.kernels.native import describe_host
    from engine.model_source import resolve_model

    try:
        sizes = [int(x) for x in args.prefill.split(",")]
    except ValueError:
        print("tandem bench step: --prefill takes comma-separated token counts", file=sys.stderr)
        return 2
    model = str(resolve_model(args.model))
    plan_engine = _engine(model, plan=True)
    has_plan = plan_engine.model.decode_plan is not None
    runs = {"plan" if has_plan else "torch-driven": _measure(plan_engine, args, sizes)}
    costs = plan_engine.step_costs
    plan_engine.close()
    if args.compare_plan and has_plan:
        torch_engine = _engine(model, plan=False)
        runs["torch-driven"] = _measure(torch_engine, args, sizes)
        torch_engine.close()
    print(f"host: {describe_host()}")
    print(f"model: {model}; {args.decodes} decodes at context {args.context}; median of {args.repeat}")
    print("| forward | prefill tokens | step ms | decode-only ms | per prefill token ms |")
    print("|---|---|---|---|---|")
    for name, by_k in runs.items():
        for k, (mixed, plain) in by_k.items():
            per = f"{(mixed - plain) / k * 1e3:.2f}" if k else "-"
            print(f"| {name} | {k} | {mixed * 1e3:.1f} | {plain * 1e3:.1f} | {per} |")
    c = costs.coefficients
    print(
        f"step cost model (engine/step_cost.py, {costs.num_steps} steps): {c[0] * 1e3:.2f} ms + "
        f"{c[1] * 1e3:.3f} ms/token + {c[2] * 1e6:.3f} us/attended position + {c[3] * 1e3:.3f} ms/sampled row"
        f"{'' if costs.ready else ' (not ready)'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench step", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
