"""``tandem bench quant``: a GGUF model's decode speed with its weights multiplied natively (packed
GGUF blocks, dequantized in the kernel) and dequantized at load (fp32), at 1 and 16 streams, against
the read roofline and, given ``--llama-server``, llama.cpp's server on the same file, in one run.

Per (weights, streams): the same random prompts (token ids) and output length, EOS ignored, greedy.
- decode tok/s: tokens of the steps after every stream has its first token, over their time
  (llama.cpp: each stream's own ``predicted_per_second``, summed: its streams decode together);
- output tok/s: all output tokens over the wall time of the batch, prompts included, for both;
- weight MB/token: the bytes the kernels read per decode step (packed panels as multiplied; the
  whole matrix every step), divided by the streams sharing the step; KV MB/token: the K/V a
  token's attention reads at the run's mean context;
- roofline: those bytes over the read bandwidth measured here (``torch.sum`` over a buffer of the
  weights' size, the same threads), and the share of it a run reaches.

Rounds alternate the configurations (``--rounds``); each figure is the median of its rounds (the
machines are shared: rerun before trusting small differences).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def read_bandwidth(nbytes: int, threads: int) -> float:
    """Bytes/s that ``torch.sum`` reads from a buffer of ``nbytes`` (best of 5) with ``threads``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(max(nbytes // 4, 1 << 20))
        x.sum()
        best = min(_timed(x.sum) for _ in range(5))
    finally:
        torch.set_num_threads(saved)
    return x.numel() * 4 / best


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model: Any) -> int:
    """Bytes the kernels read for one decode step: every projection's packed matrix and the LM head."""
    from engine.quant.weight import weight_nbytes

    def size(lin: Any, w: Any) -> int:
        packed = getattr(lin, "packed", None)
        return packed.numel() * packed.element_size() if packed is not None else weight_nbytes(w)

    total = 0
    for kernels, w in zip(model.layer_kernels, model.weights.layers, strict=True):
        if kernels is None:  # torch linears: the weights themselves
            total += sum(weight_nbytes(getattr(w, f)) for f in ("q_proj", "k_proj", "v_proj", "o_proj"))
            total += sum(weight_nbytes(getattr(w, f)) for f in ("gate_proj", "up_proj", "down_proj"))
            continue
        qkv, o, gate_up, down = kernels
        total += sum(size(k, None) for k in (*qkv, o, *gate_up, down))
    return total + size(model.lm_head, model.weights.lm_head)


def run_tandem(engine: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    started: set[str] = set()
    produced, decode_tokens, decode_steps, t_decode = 0, 0, 0, 0.0
    while engine.has_unfinished():
        ts = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - ts
        if len(started) == len(prompts):  # every request past its first token: a pure decode step
            decode_tokens += len(outs)
            decode_steps += 1
            t_decode += dt
        for o in outs:
            produced += len(o.new_token_ids)
            started.add(o.request_id)
    wall = time.perf_counter() - t0
    return {
        "decode_tok_s": decode_tokens / t_decode,
        "output_tok_s": produced / wall,
        "ms_per_step": 1000 * t_decode / decode_steps,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="a GGUF file, or smollm2 (default)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    p.add_argument("--llama-server", default=None, metavar="PATH", help="llama.cpp's llama-server binary")
    p.add_argument("--modes", nargs="+", default=["native", "dequantize"], choices=["native", "dequantize"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from engine.kernels.native import describe_host
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.model_source import resolve_model

    path = resolve_model(args.model)
    if not path.is_file():
        print(f"tandem bench quant: --model must be a GGUF file, got {path}", file=sys.stderr)
        return 2
    if args.llama_server and not Path(args.llama_server).is_file():
        print(f"tandem bench quant: --llama-server {args.llama_server}: no such file", file=sys.stderr)
        return 2
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    streams = sorted(set(args.streams))
    engines = {
        m: LLMEngine(EngineConfig(model=path, quantized_weights=m, max_num_seqs=max(streams)))
        for m in args.modes
    }
    mc = next(iter(engines.values())).model_config
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(4, mc.vocab_size) for _ in range(args.prompt_len)] for _ in range(max(streams))]
    for e in engines.values():  # warm-up: kernels built, pages touched
        run_tandem(e, prompts[:1], 4)
    peer = None
    if args.llama_server:
        from benchmarks.llama_peer import LlamaServer

        peer = LlamaServer(
            args.llama_server, path, threads, max(streams), args.prompt_len + args.output_len + 16
        )
        peer.start()
        peer.run(prompts[:1], 4)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for r in range(args.rounds):
            for n in streams:
                for mode, engine in engines.items():
                    runs.setdefault((mode, n), []).append(run_tandem(engine, prompts[:n], args.output_len))
                if peer is not None:
                    pr = peer.run(prompts[:n], args.output_len)
                    one = {"decode_tok_s": pr.decode_tok_s, "output_tok_s": pr.output_tok_s}
                    runs.setdefault(("llama.cpp", n), []).append(one)
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        if peer is not None:
            peer.close()
    return _report(args, path, engines, runs, streams, threads, mc, describe_host())


def _report(
    args: argparse.Namespace,
    path: Path,
    engines: dict[str, Any],
    runs: dict[tuple[str, int], list[dict[str, float]]],
    streams: list[int],
    threads: int,
    mc: Any,
    host: str,
) -> int:
    from engine.quant.ggml import GGMLWeight

    ctx = args.prompt_len + args.output_len / 2  # mean context while decoding
    kv_per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * 4 * ctx  # fp32 K and V read
    wbytes = {m: weight_bytes(e.model) for m, e in engines.items()}
    if "native" in engines:
        wbytes["llama.cpp"] = wbytes["native"]  # the same blocks, as stored in the file
    bw = {m: read_bandwidth(b, threads) for m, b in wbytes.items() if m != "llama.cpp"}
    bw["llama.cpp"] = bw.get("native", 0.0)
    kinds = sorted({w.qtype for w in vars_of(engines.get("native")) if isinstance(w, GGMLWeight)})
    rows = []
    for (name, n), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tok_s = statistics.median(r["decode_tok_s"] for r in rs)
        per_token = wbytes[name] / n + kv_per_token
        roof_ms = 1000 * per_token / bw[name] if bw[name] else float("nan")
        ms = 1000 / tok_s  # per token of the step's n: a step of n streams takes n times this
        rows.append(
            {
                "engine": name,
                "streams": n,
                "tok_s": tok_s,
                "tok_s_runs": [round(r["decode_tok_s"], 2) for r in rs],
                "output_tok_s": statistics.median(r["output_tok_s"] for r in rs),
                "ms_per_token": ms,
                "weight_mb_per_token": wbytes[name] / n / 1e6,
                "kv_mb_per_token": kv_per_token / 1e6,
                "roofline_ms": roof_ms,
                "of_roofline": roof_ms / ms,
            }
        )
    ratios = {}
    for n in streams:
        by = {r["engine"]: r["tok_s"] for r in rows if r["streams"] == n}
        if "llama.cpp" in by and "native" in by:
            ratios[f"native/llama.cpp@{n}"] = by["native"] / by["llama.cpp"]
        if "native" in by and "dequantize" in by:
            ratios[f"native/dequantize@{n}"] = by["native"] / by["dequantize"]
    bandwidth = {m: round(b / 1e9, 2) for m, b in bw.items()}
    if args.json:
        print(
            json.dumps(
                {"host": host, "model": str(path), "rows": rows, "ratios": ratios, "read_gb_s": bandwidth}
            )
        )
        return 0
    print(f"host: {host}")
    blocks = ", ".join(kinds) or "no GGML blocks kept"
    print(f"model: {path.name} ({blocks}); prompt {args.prompt_len}, output {args.output_len} tokens;")
    print(f"       {threads} threads; median of {args.rounds} rounds")
    print("read bandwidth (torch.sum, a buffer of the weights' size): ", end="")
    print(", ".join(f"{m} {b} GB/s" for m, b in bandwidth.items()))
    head = f"{'engine':<11} {'streams':>7} {'decode tok/s':>12} {'ms/tok':>7} {'output tok/s':>12}"
    print(head + f" {'weight MB/tok':>13} {'KV MB/tok':>9} {'roofline ms':>11} {'of roofline':>11}")
    for r in rows:
        print(
            f"{r['engine']:<11} {r['streams']:>7} {r['tok_s']:>12.1f} {r['ms_per_token']:>7.2f} "
            f"{r['output_tok_s']:>12.1f} {r['weight_mb_per_token']:>13.1f} {r['kv_mb_per_token']:>9.2f} "
            f"{r['roofline_ms']:>11.2f} {r['of_roofline']:>10.0%}"
        )
    print("ms/tok and roofline ms: per token of a step (a step of n streams takes n times as long)")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    return 0


def vars_of(engine: Any) -> list[Any]:
    """Every projection weight and the LM head of an engine's model (none for None)."""
    if engine is None:
        return []
    w = engine.model.weights
    fields = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [getattr(lw, f) for lw in w.layers for f in fields] + [w.lm_head]
