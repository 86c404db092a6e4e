"""``tandem bench serve --protocol http``: the same workload through the OpenAI HTTP API (aiohttp).

Each request is a streamed ``POST /v1/completions`` with the prompt as token ids (exact lengths),
``ignore_eos``, ``stream_options: {include_usage, continuous_usage_stats}`` (so every chunk says how
many tokens it carries: the inter-token gaps are per token, as gRPC's) and Tandem's
``return_timings`` extension (the server's own timings on the finishing chunk, what gRPC's last
message carries). Connections are opened before the clock starts, as the gRPC client's channel is.

Other servers (``tandem bench compare`` drives llama.cpp's and vLLM's with this same client):
``return_timings`` is sent to Tandem only, and a server that reports no running usage (llama.cpp)
streams one token per chunk, so a chunk without usage counts one token; the final usage chunk,
when it comes, gives the exact total. ``concurrency``: at most that many requests in flight (a
request waits for a free one before it is sent, as ``vllm bench serve --max-concurrency``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from benchmarks.serve_report import RequestResult
from benchmarks.serve_workload import BenchRequest


async def _one(
    session: Any,
    url: str,
    model: str,
    req: BenchRequest,
    t0: float,
    deadline: float,
    slots: asyncio.Semaphore | None = None,
    tandem: bool = True,
) -> RequestResult:
    await asyncio.sleep(max(0.0, t0 + req.send_at - time.monotonic()))
    if slots is None:
        return await _send(session, url, model, req, t0, deadline, tandem)
    async with slots:
        return await _send(session, url, model, req, t0, deadline, tandem)


async def _send(
    session: Any, url: str, model: str, req: BenchRequest, t0: float, deadline: float, tandem: bool
) -> RequestResult:
    import aiohttp

    res = RequestResult(req.index, len(req.prompt_token_ids))
    start = time.monotonic()
    res.sent = start - t0
    if start >= deadline:
        res.error = "NOT_SENT"
        return res
    body = {
        "model": model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    if tandem:
        body["return_timings"] = True
    last_t, seen = start, 0
    try:
        timeout = aiohttp.ClientTimeout(total=max(0.1, deadline - start))
        async with session.post(f"{url}/v1/completions", json=body, timeout=timeout) as r:
            if r.status != 200:
                res.error = f"HTTP_{r.status}"
                return res
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = f"HTTP_{event['error'].get('status', 'ERROR')}"
                    return res
                now = time.monotonic()
                usage = event.get("usage") or {}
                if not event["choices"]:
                    n = 0
                elif "completion_tokens" in usage:
                    n = usage["completion_tokens"] - seen
                else:  # no running usage (llama.cpp): one token per chunk, but a bare finishing one
                    c = event["choices"][0]
                    n = 0 if not c.get("text") and c.get("finish_reason") else 1
                seen += n
                if n and math.isnan(res.ttft):
                    res.ttft = now - start
                elif n:
                    res.gaps.extend([(now - last_t) / n] * n)
                if n:
                    last_t = now
                for choice in event["choices"]:
                    t = choice.get("timings")
                    if t is not None:
                        res.server_total, res.backend_time = t["total_time_s"], t["backend_time_s"]
                        res.router_request_time = t["router_request_time_s"]
                        res.router_token_time = t["router_token_time_s"]
                        res.queue_time = t["queue_time_s"]
                if not event["choices"]:  # the usage chunk: the totals
                    details = usage.get("prompt_tokens_details") or {}
                    res.cached_tokens = details.get("cached_tokens", 0) or 0
                    seen = usage.get("completion_tokens", seen)
            res.output_tokens = seen
        res.e2e = time.monotonic() - start
    except (TimeoutError, aiohttp.ClientError) as e:
        res.error = type(e).__name__
    return res


async def run_load_http(
    url: str,
    model: str,
    workload: list[BenchRequest],
    max_duration: float,
    concurrency: int | None = None,
    tandem: bool = True,
) -> tuple[list[RequestResult], float]:
    import aiohttp

    # A connection per request (a loopback connect, ~0.1 ms of each TTFT, for every server alike):
    # llama.cpp's server resets kept-alive connections it has closed. So nothing is left to warm;
    # one request before the clock starts shows the server answers.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{url}/v1/models") as r:
            await r.read()
        slots = asyncio.Semaphore(concurrency) if concurrency else None
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(_one(session, url, model, r, t0, t0 + max_duration, slots, tandem) for r in workload)
        )
        return list(results), time.monotonic() - t0
