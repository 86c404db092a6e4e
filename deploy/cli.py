"""The ``tandem`` command line: one dispatcher; commands live in deploy/, benchmarks in benchmarks/.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their subcommand runs, so ``tandem make-model`` never loads UCX or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-model": (
        "deploy.make_model",
        "write a random-weight Hugging Face checkpoint with a real BPE tokenizer",
    ),
    "generate": ("deploy.generate", "generate text in-process (or from a server with --server)"),
    "bench engine": ("benchmarks.bench_engine", "output tokens/s of Tandem vs transformers generate"),
    "bench quant": (
        "benchmarks.bench_quant",
        "a GGUF model natively vs dequantized at 1 and 16 streams, the read roofline, llama.cpp's server",
    ),
    "bench kv-quant": (
        "benchmarks.bench_kv_quant",
        "a quantized KV cache (fp8_e4m3, int8) against the fp32 one: greedy agreement, mean KL, bytes",
    ),
    "bench kernels": (
        "benchmarks.bench_kernels",
        "the model's projections per linear backend (C kernel, oneDNN, torch) at decode and prefill rows",
    ),
    "bench prefix-cache": (
        "benchmarks.bench_prefix_cache",
        "time to first token with a 2,000-token prefix cached in G1 / G2 / G3 vs uncached",
    ),
    "kv-bench": ("benchmarks.bench_kv_transfer", "paged-KV transfer microbenchmark over NIXL and ucxx"),
    "tier-bench": ("benchmarks.bench_tiers", "G2 / G3 block store throughput against their ceilings"),
    "serve": (
        "deploy.serve",
        "serve gRPC (127.0.0.1:50051) and the OpenAI HTTP API (127.0.0.1:8000), SmolLM2 by default",
    ),
    "fetch-model": ("deploy.fetch_model", "fetch the default model (SmolLM2-135M-Instruct) into the cache"),
    "bench pools": (
        "benchmarks.bench_pools",
        "inter-token latency of running decodes: colocated (never) vs disaggregated (always) pools",
    ),
    "launch": ("deploy.launch", "start (or update) the pools and router on a running Ray cluster"),
    "status": ("deploy.status", "pools, workers, their nodes, load and G1 occupancy of a launch"),
    "stop": ("deploy.stop", "drain the launched router and stop it and the pools"),
    "bench serve": (
        "benchmarks.bench_serve",
        "load generator against tandem serve (gRPC, HTTP or both): throughput, TTFT, ITL, latency",
    ),
    "bench compare": (
        "benchmarks.bench_compare",
        "Tandem's setups (engine, pools) and llama.cpp / vLLM servers at several concurrencies, one client",
    ),
    "bench step": (
        "benchmarks.bench_step",
        "one engine step's time by what it holds (decodes + a prompt chunk), and the fitted step cost model",
    ),
    "bench token-channel": (
        "benchmarks.bench_token_channel",
        "a decode worker's tokens to the router: one Ray stream vs a Ray call per request (vs ZeroMQ)",
    ),
    "bench guidellm": (
        "benchmarks.bench_guidellm",
        "guidellm (make bench-http installs it apart) against tandem serve's OpenAI API; tokens checked",
    ),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: tandem <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "tandem <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = None
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        name, rest = f"{argv[0]} {argv[1]}", argv[2:]
    elif argv and argv[0] in COMMANDS:
        name, rest = argv[0], argv[1:]
    if name is None:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"tandem {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from engine.arch import CheckpointError  # torch-free

    try:
        return int(module.run(args) or 0)
    except CheckpointError as e:  # whichever command loaded it: one line naming the key, status 2
        print(f"tandem {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
