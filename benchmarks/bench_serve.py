"""``tandem bench serve``: a bounded load generator against a Tandem server on loopback, through
its gRPC endpoint, its OpenAI HTTP API (``--protocol http``, benchmarks/serve_http.py) or both, one
after the other in one run (``--protocol both``: the same server, the same workload distributions,
side by side; each front door gets its own seeded draw, so the second does not find the first's
prompts in the prefix cache).

Sends a seeded workload (benchmarks/serve_workload.py: fixed or Poisson arrivals, prompt/output length
distributions, optional shared prefixes) with ``ignore_eos`` so output lengths are exact, and
reports throughput plus TTFT, inter-token latency (client-side chunk gaps) and end-to-end latency
p50/p90/p99 as a table, ``--json`` and a ``--plot`` PNG. The router's own overhead comes from the
timings the server reports on each last message (gRPC's Timings; HTTP's ``return_timings``):
``router_request_time_s`` (before the backend: parsing, validation, tokenizing) and
``router_token_time_s`` (backend produced a chunk -> the front door handed it to its transport),
against ``backend_time_s``, the backend's own span. The host's CPU is printed with the figures.

Without ``--server`` it starts ``tandem serve`` (deploy.serve) on a free loopback port for the run
and, as the reference, runs the same prompts offline through an in-process LLMEngine afterwards:
the ratio says what serving costs against the bare engine. Bounded: at most 10,000 requests and
``--max-duration`` seconds; only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.serve_report import RequestResult, format_comparison, format_table, summarize, write_plot
from benchmarks.serve_workload import BenchRequest, make_workload, parse_length

MAX_REQUESTS = 10_000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help="HOST:PORT on loopback (default: start a local server)")
    p.add_argument(
        "--protocol",
        choices=["grpc", "http", "both"],
        default="grpc",
        help="which front door (both: one after the other)",
    )
    p.add_argument(
        "--http-server",
        default=None,
        help="http://HOST:PORT of --server's OpenAI API (with --protocol http/both)",
    )
    p.add_argument(
        "--model", default=None, help="checkpoint for the local server and the reference (default: demo)"
    )
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    p.add_argument(
        "--concurrency", type=int, default=None, help="most requests in flight at once (default: no limit)"
    )
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--prompt-len", default="uniform:16:64", help="fixed:N | uniform:LO:HI | normal:MEAN:STD")
    p.add_argument("--output-len", default="fixed:32")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="tokens of a prefix shared by requests")
    p.add_argument("--num-prefixes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-duration", type=float, default=120.0, help="stop sending and cancel after this (s)")
    p.add_argument("--no-reference", action="store_true", help="skip the in-process engine reference")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests per front door first (0: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of the latency distributions")


async def _one(
    stub: Any, req: BenchRequest, t0: float, deadline: float, slots: asyncio.Semaphore | None = None
) -> RequestResult:
    await asyncio.sleep(max(0.0, t0 + req.send_at - time.monotonic()))
    if slots is None:
        return await _send(stub, req, t0, deadline)
    async with slots:
        return await _send(stub, req, t0, deadline)


async def _send(stub: Any, req: BenchRequest, t0: float, deadline: float) -> RequestResult:
    import grpc

    from router.client import build_request

    res = RequestResult(req.index, len(req.prompt_token_ids))
    start = time.monotonic()
    res.sent = start - t0
    if start >= deadline:
        res.error = "NOT_SENT"
        return res
    msg_req = build_request(req.prompt_token_ids, max_tokens=req.max_tokens, ignore_eos=True)
    last_t = start
    try:
        async for m in stub.Generate(msg_req, timeout=max(0.1, deadline - start)):
            now = time.monotonic()
            n = len(m.token_ids)
            if n and math.isnan(res.ttft):
                res.ttft = now - start
            elif n:
                res.gaps.extend([(now - last_t) / n] * n)
            last_t = now
            res.output_tokens += n
            if m.HasField("timings"):
                t = m.timings
                res.server_total, res.backend_time = t.total_time_s, t.backend_time_s
                res.router_request_time, res.router_token_time = (
                    t.router_request_time_s,
                    t.router_token_time_s,
                )
                res.queue_time, res.cached_tokens = t.queue_time_s, m.usage.cached_tokens
        res.e2e = time.monotonic() - start
    except grpc.aio.AioRpcError as e:
        res.error = e.code().name
    return res


async def run_load(
    address: str, workload: list[BenchRequest], max_duration: float, concurrency: int | None = None
) -> tuple[list[RequestResult], float]:
    import grpc

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.TandemStub(ch)
        # Connect before the clock starts, so the first requests do not pay the TCP/HTTP2 handshake.
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        t0 = time.monotonic()
        slots = asyncio.Semaphore(concurrency) if concurrency else None
        results = await asyncio.gather(*(_one(stub, r, t0, t0 + max_duration, slots) for r in workload))
        return list(results), time.monotonic() - t0


def reference_throughput(model_dir: Path, workload: list[BenchRequest]) -> dict[str, float]:
    """The same prompts offline through an in-process LLMEngine: output tokens/s with no router."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=model_dir))
    result: dict[str, float] = {}

    def offline() -> None:
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up, as the server had
        t = time.perf_counter()
        outs = engine.generate(
            [r.prompt_token_ids for r in workload],
            [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in workload],
        )
        wall = time.perf_counter() - t
        n = sum(len(o.new_token_ids) for o in outs)
        result.update(output_tokens=n, duration_s=wall, output_throughput_tok_s=n / wall)

    # On a worker thread, like EngineBackend's step loop: measured here, the same engine stepping on
    # the main thread ran ~10x slower under CPU contention (torch/OpenMP), which is not the router.
    worker = threading.Thread(target=offline, name="reference-engine")
    try:
        worker.start()
        worker.join()
    finally:
        engine.close()
    if not result:
        raise RuntimeError("the reference engine run failed (see the traceback above)")
    return result


def _check_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"--server must be a loopback address (127.0.0.1, localhost, [::1]), got {address!r}"
        )


def _start_local_server(model: str | None, log_path: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """``python -m deploy.serve --port 0 --http-port 0`` in its own process group; returns it, its gRPC
    address and its HTTP URL once both listen."""
    cmd = [sys.executable, "-m", "deploy.serve", "--port", "0", "--http-port", "0"]
    cmd += ["--model", model] if model else []
    log = open(log_path, "wb")  # noqa: SIM115  (the child keeps writing to it)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        m = re.search(r"listening on (\S+:\d+)", text)
        h = re.search(r"OpenAI-compatible HTTP on (http://\S+:\d+)", text)
        if m and h:
            return proc, m.group(1), h.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    _stop(proc)
    raise RuntimeError(f"local server did not start; log:\n{log_path.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _model_info(address: str) -> Any:
    import grpc

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        return pb_grpc.TandemStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).models[0]


def run(args: argparse.Namespace) -> int:
    try:
        if not 1 <= args.num_requests <= MAX_REQUESTS:
            raise ValueError(f"--num-requests must be in [1, {MAX_REQUESTS}]")
        if not 0 <= args.warmup <= 64:
            raise ValueError("--warmup must be in [0, 64]")
        if args.max_duration <= 0:
            raise ValueError("--max-duration must be > 0")
        if args.concurrency is not None and args.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        prompt_len, output_len = parse_length(args.prompt_len), parse_length(args.output_len)
        if args.server:
            _check_loopback(args.server)
            if args.protocol != "grpc" and not args.http_server:
                raise ValueError("--protocol http/both with --server needs --http-server http://HOST:PORT")
        if args.http_server:
            _check_loopback(args.http_server.removeprefix("http://"))
    except ValueError as e:
        print(f"tandem bench serve: {e}", file=sys.stderr)
        return 2
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="tandem-bench-serve-")
    try:
        address, http_url = args.server, args.http_server
        if address is None:
            # benchmarks run the random "demo" preset unless told otherwise (serve's default is SmolLM2)
            proc, address, http_url = _start_local_server(args.model or "demo", Path(tmp.name) / "serve.log")
            print(f"(local server on {address}, {http_url})", file=sys.stderr)
        info = _model_info(address)
        protocols = ("grpc", "http") if args.protocol == "both" else (args.protocol,)

        def workload_of(n: int, seed: int, rate: float = math.inf) -> list[BenchRequest]:
            return make_workload(
                n, vocab_size=info.vocab_size, prompt_len=prompt_len, output_len=output_len,
                rate=rate, arrival=args.arrival, shared_prefix_len=args.shared_prefix_len,
                num_prefixes=args.num_prefixes, exclude_ids=list(info.eos_token_ids), seed=seed,
            )  # fmt: skip

        # Each front door gets its own draw of the same distributions (seed, seed + 1000): the second
        # run must not find the first one's prompts in the prefix cache.
        workloads = {
            p: workload_of(args.num_requests, args.seed + 1000 * i, args.rate)
            for i, p in enumerate(protocols)
        }
        too_long = [
            r
            for w in workloads.values()
            for r in w
            if len(r.prompt_token_ids) + r.max_tokens > info.max_context_length
        ]
        if too_long:
            print(f"tandem bench serve: {len(too_long)} requests exceed the context length", file=sys.stderr)
            return 2
        # Warm-up, not measured: every front door's connections, and the server's first requests
        # (each one after the other would otherwise pay for the first one's).
        warm = workload_of(args.warmup, args.seed + 1) if args.warmup else []
        runs: dict[str, tuple[list[RequestResult], float]] = {}
        for phase in ("warm-up", "run") if args.warmup else ("run",):
            for protocol in protocols:
                load = warm if phase == "warm-up" else workloads[protocol]
                if protocol == "grpc":
                    runs[protocol] = asyncio.run(run_load(address, load, args.max_duration, args.concurrency))
                else:
                    from benchmarks.serve_http import run_load_http

                    runs[protocol] = asyncio.run(
                        run_load_http(http_url, info.name, load, args.max_duration, args.concurrency)
                    )
    finally:
        if proc is not None:
            _stop(proc)
    summaries = {protocol: summarize(results, wall) for protocol, (results, wall) in runs.items()}
    first = next(iter(summaries))
    results = runs[first][0]
    # one protocol: its summary; both: each under by_protocol (the plot shows the first, gRPC)
    summary: dict[str, Any] = summaries[first] if len(summaries) == 1 else {"by_protocol": summaries}
    from engine.kernels.native import describe_host

    summary["host"] = describe_host()
    summary["protocol"] = args.protocol
    summary["workload"] = {
        k: getattr(args, k)
        for k in (
            "num_requests",
            "rate",
            "arrival",
            "prompt_len",
            "output_len",
            "shared_prefix_len",
            "num_prefixes",
            "concurrency",
        )
    }
    summary["workload"]["rate"] = str(args.rate)
    if not args.no_reference and (args.model or args.server is None):
        from engine.model_source import resolve_model

        for protocol, s in summaries.items():  # each front door's own prompts, offline
            ref = reference_throughput(resolve_model(args.model or "demo"), workloads[protocol])
            s["reference"] = ref
            s["ratio_vs_reference"] = s["output_throughput_tok_s"] / ref["output_throughput_tok_s"]
    tmp.cleanup()
    if args.plot is not None:
        write_plot(args.plot, results, summaries[first])
    if args.json:
        print(
            json.dumps(summary, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
        )
    else:
        print(f"host: {summary['host']}")
        if args.protocol == "both":
            print(format_comparison(summaries))
        else:
            print(f"protocol: {args.protocol}")
            print(format_table(summary))
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return 0 if all(s["ok"] == s["requests"] for s in summaries.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench serve", description="load generator for tandem serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
