"""``tandem bench engine --arch A [B ...]``: Tandem's output tokens/s on checkpoints of several
families beside the dense Llama of the same preset (the same hidden size, layers and heads; each
MoE's experts sized so a token's active MLP is about the dense one: engine/make_model_archs.py), on
one workload, the models taking turns (``--repeat`` rounds; the best round of each counts) in one
process. It prints what each costs per token —
active parameters, KV bytes per token (MLA: the latent) — beside what it delivers, and the ratio
of each to the dense model."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class ArchResult:
    arch: str
    params: int
    active_params: int
    kv_bytes_per_token: int
    seconds: float  # the best of the repeats: the least disturbed by a shared machine's other load
    tokens_per_s: float
    vs_dense: float = 0.0
    median_seconds: float = 0.0


def run_archs(args: Any, archs: list[str], make_workload: Any, run_tandem: Any) -> int:
    """``make_workload`` / ``run_tandem``: bench_engine's (passed in: that module dispatches here)."""
    from deploy.memory import active_params, rank_memory
    from engine.config import ModelConfig
    from engine.demo import cached_model_dir
    from engine.kernels.native import describe_host
    from engine.tp_layout import Parallelism

    order = ["llama", *[a for a in archs if a != "llama"]]  # the dense reference first
    dirs = {a: cached_model_dir(args.preset, a) for a in order}
    vocab = ModelConfig.from_pretrained(dirs["llama"]).vocab_size
    w = make_workload(args.num_requests, vocab, args.seed, tuple(args.prompt_len), tuple(args.output_len))
    print(
        f"workload: {len(w.prompts)} requests, {w.output_tokens} output tokens; preset {args.preset}",
        file=sys.stderr,
    )
    runs: list[tuple[str, str, str, Any]] = []  # (name, arch, moe backend, config)
    for arch in order:
        mc = ModelConfig.from_pretrained(dirs[arch], args.dtype)
        for moe in args.moe_backend if mc.moe is not None else ["auto"]:
            name = arch if mc.moe is None or len(args.moe_backend) == 1 else f"{arch} [{moe}]"
            runs.append((name, arch, moe, mc))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for rep in range(args.repeat):  # round robin: a burst of other load hits every model alike
        for name, arch, moe, _ in runs:
            print(f"  {name} ({rep + 1}/{args.repeat})", file=sys.stderr)
            times[name].append(
                run_tandem(
                    dirs[arch], w, args.concurrency, args.dtype, args.attn_backend, args.linear_backend, moe
                )
            )
    rows: list[ArchResult] = []
    for name, _, _, mc in runs:
        whole = rank_memory(mc, Parallelism(), kv_dtype_bytes=mc.kv_layout(1).itemsize)
        best = min(times[name])
        rows.append(
            ArchResult(
                name,
                whole.total,
                active_params(mc),
                mc.kv_bytes_per_token,
                best,
                w.output_tokens / best,
                median_seconds=statistics.median(times[name]),
            )
        )
    for r in rows:
        r.vs_dense = r.tokens_per_s / rows[0].tokens_per_s
    host = describe_host()
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in rows], "preset": args.preset, "host": host}))
        return 0
    print(f"host: {host}")
    print(f"best of {args.repeat} runs per model, round robin (median seconds beside)")
    head = ("arch", "params", "active", "KV B/token", "best s", "median s", "output tok/s", "vs dense")
    print(f"{head[0]:<22} " + " ".join(f"{h:>12}" for h in head[1:]))
    for r in rows:
        cells = (
            f"{r.params / 1e6:.1f}M",
            f"{r.active_params / 1e6:.1f}M",
            f"{r.kv_bytes_per_token:,}",
            f"{r.seconds:.1f}",
            f"{r.median_seconds:.1f}",
            f"{r.tokens_per_s:.1f}",
            f"{r.vs_dense:.2f}x",
        )
        print(f"{r.arch:<22} " + " ".join(f"{c:>12}" for c in cells))
    return 0
