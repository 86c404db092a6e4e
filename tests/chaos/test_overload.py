"""Chaos 6: 200 concurrent gRPC streams against max_concurrency 8 and an admission queue of 50: the
excess is refused at once with RESOURCE_EXHAUSTED (and HTTP 429 on the other front door), every
admitted stream completes with the exact tokens, nothing is leaked, the server still serves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from router.client import build_request
from tests.chaos import harness
from tests.chaos.harness import PROMPTS, Figures, served, stream, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300)]

STREAMS, CONCURRENCY, QUEUE = 200, 8, 50


def test_200_streams_against_a_queue_of_50(workers, checkpoint: Path, reference) -> None:
    fig = Figures("overload", f"{STREAMS} concurrent streams, max_concurrency {CONCURRENCY}, queue {QUEUE}")
    t0 = time.monotonic()

    async def main() -> tuple[list[harness.Outcome], int, list, int]:
        async with served(workers, checkpoint, max_concurrency=CONCURRENCY, max_queue=QUEUE, http=True) as s:
            # hold every slot and the whole queue first, so the refusals are certain, not a race
            holders = [
                s.stub.Generate(build_request(PROMPTS[0], max_tokens=1500, ignore_eos=True), timeout=120)
                for _ in range(CONCURRENCY)
            ]
            for h in holders:
                await h.read()
            outs = [asyncio.ensure_future(stream(s.stub, PROMPTS[i % 4])) for i in range(STREAMS)]
            await wait_for(lambda: s.server.admission.queued == QUEUE, "the queue full")
            refused = await wait_for(
                lambda: (
                    sum(1 for o in outs if o.done()) >= STREAMS - QUEUE and sum(1 for o in outs if o.done())
                ),
                "the excess refused",
            )
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
                http.post(f"{s.http_url}/v1/completions", json={"prompt": "x", "max_tokens": 4}) as r,
            ):
                http_status = r.status
            peak = s.server.admission.in_flight + s.server.admission.queued
            for h in holders:
                h.cancel()
            results = list(await asyncio.gather(*outs))
            blocks = await harness.worker_blocks(s)
            await harness.assert_still_serving(s, reference)
            assert refused >= STREAMS - QUEUE
            return results, http_status, blocks, peak

    results, http_status, blocks, peak = asyncio.run(main())
    shed = [o for o in results if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    ok = [(i, o) for i, o in enumerate(results) if o.code == grpc.StatusCode.OK]
    assert len(shed) == STREAMS - QUEUE and len(ok) == QUEUE, harness.tally(results)
    assert all(o.ids == [] and "overloaded" in o.details for o in shed)
    for i, o in ok:
        assert o.ids == reference[PROMPTS[i % 4]], i
    assert http_status == 429
    fig.requests = STREAMS + CONCURRENCY + 1
    fig.streams_held = peak
    fig.faults = len(shed) + 1
    fig.survived = fig.faults
    fig.outcome = {**harness.tally(results), "HTTP 429": 1, "holders CANCELLED": CONCURRENCY}
    harness.finish(fig, blocks, t0)
