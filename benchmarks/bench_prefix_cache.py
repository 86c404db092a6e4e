"""``tandem bench prefix-cache``: time to first token of a request whose long prefix is cached in
G1, G2 (host) or G3 (disk), against the same request with nothing cached — in one run.

One engine, one 2,000-token shared prefix. Each case uses a fresh suffix, so only the prefix can be
reused; before each case the prefix is pushed down to the tier being measured:

    uncached  prefix never seen (prefix caching on, tiers empty)      -> full prefill
    G1        prefix still in the device pool                          -> no copy
    G2        G1 copies evicted (offloaded to host)                    -> onboard = host->G1 copies
    G3        G1 evicted, G2 spilled to disk and emptied               -> onboard = disk reads
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(slots=True)
class Case:
    case: str
    ttft_ms: float
    cached_tokens: int
    speedup: float  # uncached TTFT / this TTFT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir (default: the 'bench' preset)")
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--suffix-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="rounds; the median TTFT per case is reported")
    p.add_argument("--disk-dir", default=None, help="G3 directory (default: a temporary one)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true")


def _ttft(engine, prompt: list[int]) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    from engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    rid = engine.add_request(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while True:
        for out in engine.step():
            if out.request_id == rid:
                return (time.perf_counter() - t0) * 1e3, out.num_cached_tokens


def run(args: argparse.Namespace) -> int:
    from engine.config import ModelConfig
    from engine.demo import bench_model_dir
    from engine.llm_engine import EngineConfig, LLMEngine
    from memory_tiers.engine_tiers import EngineTiers
    from memory_tiers.tier_store import TierConfig

    model_dir = Path(args.model) if args.model else bench_model_dir()
    cfg = ModelConfig.from_pretrained(model_dir, args.dtype)
    layout = cfg.kv_layout(16)
    prefix_blocks = layout.blocks_for(args.prefix_tokens + args.suffix_tokens)
    rng = random.Random(0)
    tmp = tempfile.TemporaryDirectory(prefix="tandem-g3-") if args.disk_dir is None else None
    disk_dir = args.disk_dir or tmp.name  # type: ignore[union-attr]
    tiers = EngineTiers(
        TierConfig(
            host_blocks=2 * prefix_blocks,
            disk_dir=disk_dir,
            disk_bytes=4 * prefix_blocks * layout.block_bytes,
        )
    )
    engine = LLMEngine(
        EngineConfig(
            model=model_dir, dtype=args.dtype, max_num_batched_tokens=args.prefix_tokens + args.suffix_tokens
        ),
        tiers=tiers,
    )
    store = tiers.store
    assert store is not None
    print(
        f"model {model_dir}; prefix {args.prefix_tokens} tokens = {args.prefix_tokens // 16} blocks of "
        f"{layout.block_bytes / 2**10:.0f} KiB; G3 in {disk_dir}",
        file=sys.stderr,
    )
    results: dict[str, list[tuple[float, int]]] = {"uncached": [], "G1": [], "G2": [], "G3": []}

    def vocab_tokens(n: int) -> list[int]:
        return [rng.randrange(4, cfg.vocab_size) for _ in range(n)]

    _ttft(engine, vocab_tokens(32))  # warm-up
    for r in range(args.repeat):
        prefix = vocab_tokens(args.prefix_tokens)
        results["uncached"].append(_ttft(engine, prefix + vocab_tokens(args.suffix_tokens)))
        results["G1"].append(_ttft(engine, prefix + vocab_tokens(args.suffix_tokens)))
        engine.block_manager.evict_cached()  # G1 -> G2 (offload on evict)
        results["G2"].append(_ttft(engine, prefix + vocab_tokens(args.suffix_tokens)))
        engine.block_manager.evict_cached()
        store.spill_all()  # G2 -> G3, G2 emptied
        store.flush()
        results["G3"].append(_ttft(engine, prefix + vocab_tokens(args.suffix_tokens)))
        engine.block_manager.evict_cached()
        store.spill_all()
        store.flush()
        print(f"  round {r + 1}/{args.repeat} done", file=sys.stderr)
    engine.close()
    if tmp is not None:
        tmp.cleanup()

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    base = median([t for t, _ in results["uncached"]])
    rows = [
        Case(name, median([t for t, _ in rs]), rs[-1][1], base / median([t for t, _ in rs]))
        for name, rs in results.items()
    ]
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print(f"{'case':<10} {'TTFT ms':>10} {'cached tokens':>14} {'speedup vs uncached':>20}")
        for row in rows:
            print(f"{row.case:<10} {row.ttft_ms:>10.1f} {row.cached_tokens:>14} {row.speedup:>19.1f}x")
    return 0
