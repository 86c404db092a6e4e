"""``tandem bench pools``: inter-token latency of running decodes while long prompts keep arriving,
colocated (``never``: decode workers prefill with chunked prefill) vs disaggregated (``always``:
a prefill worker streams KV to a decode worker), in one run, on the same checkpoint and workload.

Each worker is a Ray actor limited to one core (``torch.set_num_threads(1)``, ``num_cpus=1``); both
setups use the same number of workers (default 2), so the comparison is at equal hardware.

Workload (fixed seed): ``--decodes`` short-prompt requests generating ``--decode-tokens`` tokens each
start at t=0; ``--long-count`` prompts of ``--long-prompt`` tokens arrive every ``--long-every``
seconds. ITL = gaps between consecutive tokens of the short requests, stamped by the decode worker
(first token excluded: that is TTFT). Throughput = all output tokens / wall time of the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class ModeResult:
    mode: str
    itl_p50_ms: float
    itl_p99_ms: float
    itl_max_ms: float
    tokens: int
    wall_s: float
    errors: int

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a random one)")
    parser.add_argument(
        "--preset", default="small", help="engine.make_model preset when --model is not given"
    )
    parser.add_argument("--decodes", type=int, default=6, help="concurrent running decodes")
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=160)
    parser.add_argument("--long-prompt", type=int, default=1024)
    parser.add_argument("--long-count", type=int, default=6)
    parser.add_argument("--long-every", type=float, default=0.5, help="seconds between long prompts")
    # 1: a long prompt only adds prefill work. More makes it a long-context decode too, which slows
    # every decode step in both setups alike (the torch attention pads the batch to its longest
    # context), so it blurs what this benchmark isolates: prefill interference.
    parser.add_argument("--long-tokens", type=int, default=1, help="tokens generated for each long prompt")
    parser.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens (the prefill chunk)")
    parser.add_argument("--workers", type=int, default=2, help="workers per setup (one core each)")
    parser.add_argument("--kv-backend", default="nixl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


async def _workload(pools: Any, args: argparse.Namespace, vocab: int) -> tuple[list[float], int, float, int]:
    from engine.sampling_params import SamplingParams
    from router.coordinator import PoolRequest

    rng = random.Random(args.seed)
    itl: list[float] = []
    tokens = errors = 0

    async def run(rid: str, n_prompt: int, n_out: int, record: bool) -> None:
        nonlocal tokens, errors
        prompt = [rng.randrange(4, vocab) for _ in range(n_prompt)]
        params = SamplingParams(max_tokens=n_out, ignore_eos=True, seed=1)
        last = None
        async for c in pools.submit(PoolRequest(rid, prompt, params)):
            tokens += len(c.token_ids)
            errors += bool(c.error)
            if c.token_ids:
                if record and last is not None:
                    itl.append(c.produced_at - last)
                last = c.produced_at

    async def arrivals() -> None:
        longs = []
        for i in range(args.long_count):
            await asyncio.sleep(args.long_every)
            longs.append(asyncio.ensure_future(run(f"long-{i}", args.long_prompt, args.long_tokens, False)))
        await asyncio.gather(*longs)

    t0 = time.monotonic()
    decodes = [run(f"dec-{i}", args.decode_prompt, args.decode_tokens, True) for i in range(args.decodes)]
    await asyncio.gather(*decodes, arrivals())
    return itl, tokens, time.monotonic() - t0, errors


def _run_mode(mode: str, model: Path, args: argparse.Namespace, vocab: int) -> ModeResult:
    from decode_pool.pool import build_decode_pool
    from engine.llm_engine import EngineConfig
    from pool_runtime.actors import PoolSpec, shutdown
    from pool_runtime.config import WorkerConfig
    from prefill_pool.pool import build_prefill_pool
    from router.coordinator import Pools

    cfg = WorkerConfig(
        EngineConfig(model=model, max_num_batched_tokens=args.chunk, kv_cache_bytes=256 << 20),
        kv_backend=args.kv_backend,
        torch_threads=1,
    )
    spec = PoolSpec(replicas=args.workers, num_cpus=1, max_restarts=0)
    if mode == "never":
        prefill, decode = [], build_decode_pool(cfg, spec)
    else:
        prefill = build_prefill_pool(cfg, PoolSpec(replicas=args.workers // 2, num_cpus=1, max_restarts=0))
        decode = build_decode_pool(
            cfg, PoolSpec(replicas=args.workers - args.workers // 2, num_cpus=1, max_restarts=0)
        )
    try:
        pools = Pools(prefill, decode, disaggregation=mode)
        # warm-up (not measured): one request through every path
        warm = argparse.Namespace(
            **{**vars(args), "decodes": 1, "long_count": 1, "long_every": 0.0, "decode_tokens": 4}
        )
        asyncio.run(_workload(pools, warm, vocab))
        itl, tokens, wall, errors = asyncio.run(_workload(pools, args, vocab))
    finally:
        shutdown(prefill + decode)
    ms = [x * 1000 for x in itl]
    return ModeResult(mode, _percentile(ms, 0.5), _percentile(ms, 0.99), max(ms), tokens, wall, errors)


def run(args: argparse.Namespace) -> int:
    import os

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    from engine.config import ModelConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-pools-"))
    model = args.model
    if model is None:
        from engine.make_model import make_model

        model = make_model(tmp / "model", args.preset, seed=args.seed)
    vocab = ModelConfig.from_pretrained(model).vocab_size
    ray.init(address="local", include_dashboard=False, _temp_dir=str(tmp / "ray"), num_cpus=2 * args.workers)
    try:
        results = [_run_mode(mode, model, args, vocab) for mode in ("never", "always")]
    finally:
        ray.shutdown()
    col, dis = results
    print(
        f"workload: {args.decodes} decodes x {args.decode_tokens} tokens (prompt {args.decode_prompt}), "
        f"{args.long_count} prompts of {args.long_prompt} tokens every {args.long_every}s, "
        f"chunk {args.chunk}, {args.workers} one-core workers per setup"
    )
    print(f"{'mode':<24} {'ITL p50 ms':>10} {'ITL p99 ms':>10} {'ITL max ms':>10} {'tok/s':>8} {'errors':>6}")
    for r, name in ((col, "colocated (never)"), (dis, "disaggregated (always)")):
        print(
            f"{name:<24} {r.itl_p50_ms:>10.1f} {r.itl_p99_ms:>10.1f} {r.itl_max_ms:>10.1f} "
            f"{r.throughput:>8.1f} {r.errors:>6}"
        )
    print(
        f"disaggregated / colocated: ITL p99 x{dis.itl_p99_ms / col.itl_p99_ms:.2f} (target <= 0.33), "
        f"throughput x{dis.throughput / col.throughput:.2f} (target >= 0.90)"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps([asdict(r) | {"throughput": r.throughput} for r in results], indent=2)
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
