"""``tandem bench compare``: Tandem's serving setups side by side, and beside llama.cpp's and vLLM's
servers when their programs are given, through one client at several concurrencies, in one run.

Each server starts for its turn (benchmarks/compare_servers.py), gets a short warm-up, then for every
concurrency C a seeded workload of streamed ``/v1/completions`` requests (prompts as token ids of
``--input-len``, exactly ``--output-len`` tokens out, greedy, EOS ignored) with at most C in flight
(benchmarks/serve_http.py: the same client for every server); then it stops. Every server gets the
same prompts at a given C. Printed: output tokens/s, TTFT p50, inter-token latency p50 / p99 per
(server, C), each Tandem setup's throughput as a ratio of the engine's and its TTFT p50 against the
engine's (in decode steps of the engine at that C), and the best peer's ITL p99 beside Tandem's.

The peers run the same weights: llama.cpp an F32 GGUF written from the model's GGUF (``--llama-f32``,
the default; ``--llama-gguf`` serves the original file too), vLLM a Hugging Face checkpoint of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.compare_servers import (
    TANDEM_SETUPS,
    Server,
    f32_gguf,
    hf_checkpoint,
    llama_server,
    served_model,
    set_autogroup_nice,
    tandem_server,
    vllm_server,
)
from benchmarks.serve_report import summarize
from benchmarks.serve_workload import make_workload, parse_length


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2", help="smollm2 (default), demo, a checkpoint DIR or FILE.gguf"
    )
    p.add_argument(
        "--setups", default="engine,never,always", help=f"Tandem setups, of {','.join(TANDEM_SETUPS)}"
    )
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated most-in-flight levels")
    p.add_argument(
        "--requests", default="8,64,128", help="requests per level (one per level, or one for all)"
    )
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (a peer)")
    p.add_argument("--llama-gguf", action="store_true", help="also serve the model's own GGUF with llama.cpp")
    p.add_argument("--vllm", default=None, help="vLLM's `vllm` command (a peer, its CPU build)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests per server first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-duration", type=float, default=1200.0, help="per level (s)")
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra tandem serve argument (repeatable)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write every summary here")
    p.add_argument(
        "--log-dir", type=Path, default=None, help="keep each server's log here (else removed at the end)"
    )
    p.add_argument(
        "--autogroup-nice", type=int, default=None, help="scheduler weight of the servers' and this session"
    )


def _levels(args: argparse.Namespace) -> list[tuple[int, int]]:
    conc = [int(c) for c in args.concurrency.split(",")]
    reqs = [int(r) for r in args.requests.split(",")]
    if len(reqs) == 1:
        reqs = reqs * len(conc)
    if len(reqs) != len(conc) or min(conc) < 1 or min(reqs) < 1:
        raise ValueError("--requests needs one count, or one per --concurrency level, all >= 1")
    return list(zip(conc, reqs, strict=True))


def _servers(args: argparse.Namespace, tmp: Path, max_conc: int) -> list[Server]:
    from engine.model_source import resolve_model

    servers = [
        tandem_server(s, args.model, list(args.serve_arg), home=tmp / f"home-{s}")
        for s in args.setups.split(",")
        if s
    ]
    if args.llama_server or args.vllm:
        src = Path(resolve_model(args.model))
        if not src.is_file():
            raise ValueError("the peers need a GGUF model (--model smollm2 or FILE.gguf)")
        if args.llama_server:
            servers.append(
                llama_server(args.llama_server, f32_gguf(src, tmp / (src.stem + ".F32.gguf")), max_conc)
            )
            if args.llama_gguf:
                servers.append(llama_server(args.llama_server, src, max_conc))
        if args.vllm:
            servers.append(vllm_server(args.vllm, hf_checkpoint(src, tmp / "hf"), max_conc))
    return servers


def _measure(server: Server, args: argparse.Namespace, levels: list[tuple[int, int]], vocab: int) -> dict:
    from benchmarks.serve_http import run_load_http

    model = server.model or served_model(server)
    plen, olen = parse_length(f"fixed:{args.input_len}"), parse_length(f"fixed:{args.output_len}")

    def load(n: int, seed: int) -> list[Any]:
        return make_workload(n, vocab_size=vocab, prompt_len=plen, output_len=olen, seed=seed)

    if args.warmup:
        asyncio.run(
            run_load_http(server.url, model, load(args.warmup, args.seed + 99), 300, None, server.tandem)
        )
    out = {}
    for i, (conc, n) in enumerate(levels):
        results, wall = asyncio.run(
            run_load_http(server.url, model, load(n, args.seed + i), args.max_duration, conc, server.tandem)
        )
        out[conc] = summarize(results, wall)
        s = out[conc]
        print(
            f"  {server.name} C={conc}: {s['output_throughput_tok_s']:.1f} tok/s, TTFT p50 "
            f"{s['ttft_s']['p50'] * 1e3:.0f} ms, ITL p50/p99 {s['itl_s']['p50'] * 1e3:.0f}/"
            f"{s['itl_s']['p99'] * 1e3:.0f} ms, {s['ok']}/{s['requests']} ok",
            file=sys.stderr,
        )
    return out


def format_compare(runs: dict[str, dict], levels: list[tuple[int, int]], tandem: set[str]) -> str:
    """One row per (server, C); Tandem's setups against the engine, and the best peer's ITL p99."""
    lines = [
        "| server | C | output tok/s | vs engine | TTFT p50 ms | TTFT p50 - engine's (engine ITL p50s) "
        "| ITL p50 ms | ITL p99 ms | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for conc, _ in levels:
        eng = runs.get("engine", {}).get(conc)
        for name, by_c in runs.items():
            s = by_c.get(conc)
            if s is None:
                continue
            tput, ttft, itl = s["output_throughput_tok_s"], s["ttft_s"]["p50"], s["itl_s"]
            ratio = delta = "-"
            if eng is not None and name in tandem:
                ratio = f"{tput / eng['output_throughput_tok_s']:.2f}"
                d = ttft - eng["ttft_s"]["p50"]
                delta = f"{d * 1e3:+.0f} ({d / eng['itl_s']['p50']:+.1f})"
            lines.append(
                f"| {name} | {conc} | {tput:.1f} | {ratio} | {ttft * 1e3:.0f} | {delta} | "
                f"{itl['p50'] * 1e3:.0f} | {itl['p99'] * 1e3:.0f} | {s['ok']}/{s['requests']} |"
            )
        peers = [by_c[conc]["itl_s"]["p99"] for n, by_c in runs.items() if n not in tandem and conc in by_c]
        if peers:
            lines.append(f"| best peer ITL p99 at C={conc} | | | | | | | {min(peers) * 1e3:.0f} | |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        levels = _levels(args)
        unknown = [s for s in args.setups.split(",") if s and s not in TANDEM_SETUPS]
        if unknown:
            raise ValueError(f"unknown setup(s) {unknown}: use {','.join(TANDEM_SETUPS)}")
    except ValueError as e:
        print(f"tandem bench compare: {e}", file=sys.stderr)
        return 2
    from engine.config import ModelConfig
    from engine.kernels.native import describe_host
    from engine.model_source import resolve_model

    vocab = ModelConfig.from_pretrained(resolve_model(args.model)).vocab_size
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-compare-") as tmp:
        try:
            servers = _servers(args, Path(tmp), max(c for c, _ in levels))
        except ValueError as e:
            print(f"tandem bench compare: {e}", file=sys.stderr)
            return 2
        if args.autogroup_nice is not None:
            set_autogroup_nice(os.getpid(), args.autogroup_nice)
        logs = Path(tmp)
        if args.log_dir is not None:
            logs = args.log_dir
            logs.mkdir(parents=True, exist_ok=True)
        for server in servers:
            print(f"(starting {server.name})", file=sys.stderr)
            server.start(logs, args.autogroup_nice)
            try:
                runs[server.name] = _measure(server, args, levels, vocab)
            finally:
                server.stop()
    tandem = {s for s in args.setups.split(",") if s}
    print(f"host: {describe_host()}")
    print(f"workload: {args.input_len} prompt tokens, {args.output_len} output tokens, greedy, EOS ignored")
    print(format_compare(runs, levels, tandem))
    if args.json is not None:
        args.json.write_text(json.dumps({"host": describe_host(), "runs": runs}, indent=1, default=str))
    ok = all(s["ok"] == s["requests"] for by_c in runs.values() for s in by_c.values())
    return (
        0
        if ok and all(not math.isnan(s["output_throughput_tok_s"]) for r in runs.values() for s in r.values())
        else 1
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
