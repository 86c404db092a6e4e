"""``tandem bench guidellm`` (``make bench-http``): a real benchmark client, guidellm, unmodified,
against ``tandem serve``'s OpenAI HTTP API; its report, and whether its token counts agree with
Tandem's.

guidellm is not one of Tandem's dependencies (it pins its own torch, datasets, httpx, ...): ``make
bench-http`` installs it into a venv of its own (``.venv-bench``) and passes its executable here as
``--client``. This command starts ``tandem serve`` (the Ray pools, the demo checkpoint unless
``--model``; or uses ``--http URL``), reads the server's ``/metrics``, runs guidellm (synthetic
prompts of ``--prompt-tokens`` made with the checkpoint's own tokenizer, ``--output-tokens`` each,
``--streams`` concurrent, ``--requests`` in all), reads ``/metrics`` again, and compares guidellm's
totals (the usage it was sent, per request) with the server's ``tandem:prompt_tokens_total`` and
``tandem:generation_tokens_total``. It writes guidellm's own report (``guidellm-report.json``,
``.csv``), its console (``guidellm.log``) and ``summary.json`` into ``--out``. Bounded: at most
``--requests`` requests and ``--max-seconds``; loopback only; the hub is never asked
(``HF_HUB_OFFLINE``): the tokenizer is the checkpoint directory's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_CLIENT = Path(".venv-bench/bin/guidellm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--client", type=Path, default=None, help=f"the guidellm executable (default: {DEFAULT_CLIENT})"
    )
    p.add_argument(
        "--http", default=None, help="http://127.0.0.1:PORT of a running tandem serve (default: start one)"
    )
    p.add_argument(
        "--model", default=None, help="checkpoint directory (its tokenizer makes the prompts; default: demo)"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results/http"), help="where the reports go")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--streams", type=int, default=4, help="concurrent requests")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-seconds", type=float, default=300.0)


def _metrics(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _total(metrics: dict[str, float], family: str) -> float:
    return sum(v for k, v in metrics.items() if k.split("{")[0] == family)


def _stat(metric: dict[str, Any]) -> dict[str, float]:
    s = metric["successful"]
    return {
        "mean": s["mean"],
        "p50": s["median"],
        "p90": s["percentiles"]["p90"],
        "p99": s["percentiles"]["p99"],
    }


def summarize(report: dict[str, Any], before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """guidellm's figures and the token-count agreement with Tandem's counters."""
    (bench,) = report["benchmarks"]
    ok = bench["requests"]["successful"]
    m = bench["metrics"]
    client = {
        "prompt_tokens": sum(int(r["prompt_tokens"] or 0) for r in ok),
        "completion_tokens": sum(int(r["output_tokens"] or 0) for r in ok),
    }
    server = {
        "prompt_tokens": int(
            _total(after, "tandem:prompt_tokens_total") - _total(before, "tandem:prompt_tokens_total")
        ),
        "completion_tokens": int(
            _total(after, "tandem:generation_tokens_total") - _total(before, "tandem:generation_tokens_total")
        ),
    }
    totals = m["request_totals"]
    return {
        "requests": totals,
        "duration_s": bench["duration"],
        "requests_per_s": m["requests_per_second"]["successful"]["mean"],
        "output_tokens_per_s": m["output_tokens_per_second"]["successful"]["mean"],
        "ttft_ms": _stat(m["time_to_first_token_ms"]),
        "itl_ms": _stat(m["inter_token_latency_ms"]),
        "request_latency_s": _stat(m["request_latency"]),
        "tokens": {"guidellm": client, "tandem": server},
        "tokens_agree": client == server and totals["errored"] == 0 and totals["incomplete"] == 0,
    }


def format_summary(s: dict[str, Any]) -> str:
    t, g = s["tokens"]["tandem"], s["tokens"]["guidellm"]
    rows = [
        f"guidellm: {s['requests']['successful']}/{s['requests']['total']} requests ok in "
        f"{s['duration_s']:.1f} s; {s['requests_per_s']:.2f} req/s, "
        f"{s['output_tokens_per_s']:.1f} output tok/s",
        f"{'':<22}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    for name, key in (
        ("TTFT (ms)", "ttft_ms"),
        ("ITL (ms)", "itl_ms"),
        ("request latency (s)", "request_latency_s"),
    ):
        st = s[key]
        rows.append(f"{name:<22}" + "".join(f"{st[q]:9.2f}" for q in ("mean", "p50", "p90", "p99")))
    rows.append(
        f"tokens: guidellm {g['prompt_tokens']} prompt / {g['completion_tokens']} completion; tandem's "
        f"counters {t['prompt_tokens']} / {t['completion_tokens']}: "
        + ("agree" if s["tokens_agree"] else "DISAGREE")
    )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    client = args.client or DEFAULT_CLIENT
    if shutil.which(str(client)) is None:
        print(
            f"tandem bench guidellm: no guidellm at {client}: `make bench-http` installs it into .venv-bench",
            file=sys.stderr,
        )
        return 2
    if args.http and not args.http.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
        print("tandem bench guidellm: --http must be a loopback URL", file=sys.stderr)
        return 2
    from engine.model_source import resolve_model

    checkpoint = resolve_model(args.model or "demo")
    if not (checkpoint / "tokenizer.json").is_file():
        print(
            f"tandem bench guidellm: {checkpoint} is no checkpoint directory with tokenizer.json",
            file=sys.stderr,
        )
        return 2
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    proc, tmp = None, tempfile.TemporaryDirectory(prefix="tandem-bench-http-")
    try:
        url = args.http
        if url is None:
            from benchmarks.bench_serve import _start_local_server

            proc, _, url = _start_local_server(str(checkpoint), Path(tmp.name) / "serve.log")
            print(f"(tandem serve: {url}, pools, model {checkpoint})", file=sys.stderr)
        model = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=60).read())["data"][0]["id"]
        before = _metrics(url)
        cmd = [
            str(client), "run",
            "--backend", f"kind=openai_http,target={url},model={model},request_format=/v1/completions",
            "--profile", f"kind=concurrent,streams={args.streams}",
            "--constraint", f"kind=max_requests,count={args.requests}",
            "--constraint", f"kind=max_duration,seconds={args.max_seconds}",
            "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
            f"output_tokens={args.output_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={checkpoint}",
            "--output", f"kind=json,path={out / 'guidellm-report.json'}",
            "--output", f"kind=csv,path={out / 'guidellm-report.csv'}",
            "--disable-console-interactive",
        ]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        with open(out / "guidellm.log", "wb") as log:
            done = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.max_seconds + 300
            )
        if done.returncode != 0:
            tail = (out / "guidellm.log").read_text(errors="replace")[-3000:]
            print(f"tandem bench guidellm: guidellm exited with {done.returncode}:\n{tail}", file=sys.stderr)
            return 1
        after = _metrics(url)
    finally:
        if proc is not None:
            from benchmarks.bench_serve import _stop

            _stop(proc)
        tmp.cleanup()
    summary = summarize(json.loads((out / "guidellm-report.json").read_text()), before, after)
    from engine.kernels.native import describe_host

    summary["host"] = describe_host()
    summary["workload"] = {
        k: getattr(args, k) for k in ("prompt_tokens", "output_tokens", "streams", "requests")
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"host: {summary['host']}")
    print(format_summary(summary))
    print(f"reports: {out}/guidellm-report.json, guidellm-report.csv, guidellm.log, summary.json")
    return 0 if summary["tokens_agree"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem bench guidellm", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
