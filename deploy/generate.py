"""``tandem generate``: run one prompt through the in-process engine and stream its text."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo checkpoint)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "cpu", "triton"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="stream from a tandem serve endpoint")


def run(args: argparse.Namespace) -> int:
    if args.server:
        from router.client import run_client

        return run_client(args)
    from engine.demo import demo_model_dir
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as e:
        print(f"tandem generate: {e}", file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        model = demo_model_dir()
        if not args.json:
            print(f"(demo checkpoint: {model})", file=sys.stderr)
    engine = LLMEngine(EngineConfig(model=model, dtype=args.dtype, attn_backend=args.attn_backend))
    try:
        t0 = time.perf_counter()
        try:
            engine.add_request(args.prompt, params, request_id="cli")
        except ValueError as e:
            print(f"tandem generate: {e}", file=sys.stderr)
            return 2
        token_ids: list[int] = []
        text = ""
        reason = None
        ttft = None
        for out in engine.stream():
            if ttft is None:
                ttft = time.perf_counter() - t0
            token_ids += out.new_token_ids
            text += out.text
            if not args.json:
                sys.stdout.write(out.text)
                sys.stdout.flush()
            if out.finished:
                reason = out.finish_reason.value if out.finish_reason else None
        elapsed = time.perf_counter() - t0
        if args.json:
            print(
                json.dumps(
                    {
                        "text": text,
                        "token_ids": token_ids,
                        "finish_reason": reason,
                        "num_tokens": len(token_ids),
                        "ttft_s": round(ttft or 0.0, 4),
                        "elapsed_s": round(elapsed, 4),
                    }
                )
            )
        else:
            sys.stdout.write("\n")
            print(
                f"[{len(token_ids)} tokens, {reason}, {len(token_ids) / max(elapsed, 1e-9):.1f} tok/s]",
                file=sys.stderr,
            )
    finally:
        engine.close()
    return 0
