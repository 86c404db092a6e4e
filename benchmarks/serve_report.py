"""Results of ``tandem bench serve``: per-request records, the summary, the table and the PNG plot.

A :class:`RequestResult` holds what the client saw (send time, TTFT, per-token gaps, end-to-end)
next to what the server reported on the last message (total, backend, router and queue times).
:func:`summarize` turns a run into one JSON-able dict; :func:`format_table` and :func:`write_plot`
render it. Pure apart from matplotlib (Agg backend, imported only when plotting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serve_workload import percentile


@dataclass(slots=True)
class RequestResult:
    index: int
    prompt_tokens: int
    output_tokens: int = 0
    sent: float = 0.0  # seconds after the start
    ttft: float = math.nan
    e2e: float = math.nan
    gaps: list[float] = field(default_factory=list)  # between successive chunks, per token
    error: str = ""
    server_total: float = math.nan
    backend_time: float = math.nan
    router_request_time: float = math.nan
    router_token_time: float = math.nan
    queue_time: float = math.nan
    cached_tokens: int = 0


def _stats(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if not math.isnan(v)]
    mean = sum(vals) / len(vals) if vals else math.nan
    return {
        "mean": mean,
        "p50": percentile(vals, 50),
        "p90": percentile(vals, 90),
        "p99": percentile(vals, 99),
    }


def summarize(results: list[RequestResult], wall: float) -> dict[str, Any]:
    ok = [r for r in results if not r.error]
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    tokens = max(1, out_tokens)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": errors,
        "duration_s": wall,
        "request_throughput": len(ok) / wall if wall > 0 else math.nan,
        "output_tokens": out_tokens,
        "output_throughput_tok_s": out_tokens / wall if wall > 0 else math.nan,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "ttft_s": _stats([r.ttft for r in ok]),
        "itl_s": _stats([g for r in ok for g in r.gaps]),
        "e2e_s": _stats([r.e2e for r in ok]),
        "queue_time_s": _stats([r.queue_time for r in ok]),
        "router_overhead": {
            "per_request_s": _stats([r.router_request_time for r in ok]),
            "per_token_s": sum(r.router_token_time for r in ok) / tokens,
            "network_and_client_per_request_s": _stats([r.e2e - r.server_total for r in ok]),
        },
    }


_ROWS = (
    ("time to first token", lambda s: s["ttft_s"]),
    ("inter-token latency", lambda s: s["itl_s"]),
    ("end-to-end latency", lambda s: s["e2e_s"]),
    ("queue time (server)", lambda s: s["queue_time_s"]),
    ("router, per request", lambda s: s["router_overhead"]["per_request_s"]),
    ("network + client", lambda s: s["router_overhead"]["network_and_client_per_request_s"]),
)


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """Several runs of one workload (``{"grpc": summary, "http": summary}``) side by side."""
    ms = lambda v: f"{v * 1e3:8.2f}"  # noqa: E731
    names = list(summaries)
    head = f"{'latency (ms)':<22}" + "".join(
        f"{n + ' p50':>10}{n + ' p90':>10}{n + ' p99':>10}" for n in names
    )
    lines = [head]
    for label, get in _ROWS:
        row = f"{label:<22}"
        for n in names:
            st = get(summaries[n])
            row += f"{ms(st['p50']):>10}{ms(st['p90']):>10}{ms(st['p99']):>10}"
        lines.append(row)
    lines.append("")
    for n in names:
        s = summaries[n]
        ro = s["router_overhead"]
        line = (
            f"{n}: {s['ok']}/{s['requests']} ok, errors {s['errors'] or 'none'}; "
            f"{s['request_throughput']:.2f} req/s, {s['output_throughput_tok_s']:.1f} output tok/s "
            f"({s['output_tokens']} tokens); router per request p50 "
            f"{ro['per_request_s']['p50'] * 1e3:.3f} ms, per token {ro['per_token_s'] * 1e3:.3f} ms"
        )
        if "ratio_vs_reference" in s:
            line += f"; served / reference {s['ratio_vs_reference']:.2f}"
        lines.append(line)
    return "\n".join(lines)


def format_table(s: dict[str, Any]) -> str:
    ms = lambda v: f"{v * 1e3:9.2f}"  # noqa: E731
    lines = [
        f"requests {s['ok']}/{s['requests']} ok in {s['duration_s']:.2f} s, errors {s['errors'] or 'none'}",
        f"throughput: {s['request_throughput']:.2f} req/s, {s['output_throughput_tok_s']:.1f} output tok/s "
        f"({s['output_tokens']} tokens; cached prompt tokens "
        f"{s['cached_prompt_tokens']}/{s['prompt_tokens']})",
        "",
        f"{'latency (ms)':<26}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    rows = [
        ("time to first token", s["ttft_s"]),
        ("inter-token latency", s["itl_s"]),
        ("end-to-end latency", s["e2e_s"]),
        ("queue time (server)", s["queue_time_s"]),
        ("router, per request", s["router_overhead"]["per_request_s"]),
        ("network + client", s["router_overhead"]["network_and_client_per_request_s"]),
    ]
    for name, st in rows:
        lines.append(f"{name:<26}{ms(st['mean'])}{ms(st['p50'])}{ms(st['p90'])}{ms(st['p99'])}")
    ro = s["router_overhead"]
    lines.append(f"router per token (backend produced -> handed to gRPC): {ro['per_token_s'] * 1e3:.3f} ms")
    if "reference" in s:
        ref = s["reference"]
        lines.append(
            f"reference (in-process engine, offline): {ref['output_throughput_tok_s']:.1f} tok/s; "
            f"served / reference = {s['ratio_vs_reference']:.2f}"
        )
    return "\n".join(lines)


def write_plot(path: Path, results: list[RequestResult], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.error]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, vals) in zip(
        axes.flat[:3],
        [
            ("time to first token (ms)", [r.ttft * 1e3 for r in ok]),
            ("inter-token latency (ms)", [g * 1e3 for r in ok for g in r.gaps]),
            ("end-to-end latency (ms)", [r.e2e * 1e3 for r in ok]),
        ],
        strict=True,
    ):
        xs = sorted(vals)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))] if xs else [])
        ax.set_title(title)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    ax.scatter([r.sent for r in ok], [r.e2e * 1e3 for r in ok], s=8, label="end-to-end")
    ax.scatter([r.sent for r in ok], [r.ttft * 1e3 for r in ok], s=8, label="TTFT")
    ax.set_xlabel("sent at (s)")
    ax.set_ylabel("ms")
    ax.set_title("latency over the run")
    ax.legend()
    fig.suptitle(
        f"tandem bench serve: {summary['ok']} requests, {summary['output_throughput_tok_s']:.1f} tok/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
