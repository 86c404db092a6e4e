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
            for h in holders:
                h.cancel()
            holder_codes = [(await h.code()).name for h in holders]
            results = list(await asyncio.gather(*outs))
            blocks = await harness.worker_blocks(s)
            harness.counted(fig, s)
            await harness.assert_still_serving(s, reference)
            assert refused >= STREAMS - QUEUE
            return results, http_status, blocks, holder_codes

    results, http_status, blocks, holder_codes = asyncio.run(main())
    shed = [o for o in results if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    ok = [(i, o) for i, o in enumerate(results) if o.code == grpc.StatusCode.OK]
    assert len(shed) == STREAMS - QUEUE and len(ok) == QUEUE, harness.tally(results)
    assert all(o.ids == [] and "overloaded" in o.details for o in shed)
    for i, o in ok:
        assert o.ids == reference[PROMPTS[i % 4]], i
    assert http_status == 429
    fig.faults = len(shed) + 1
    # a refusal survived when the admitted streams all got exactly their tokens
    fig.survived = fig.faults if all(o.ids == reference[PROMPTS[i % 4]] for i, o in ok) else 0
    fig.outcome = {**harness.tally(results), f"HTTP {http_status}": 1}
    for code in holder_codes:
        fig.outcome[f"holders {code}"] = fig.outcome.get(f"holders {code}", 0) + 1
    harness.finish(fig, blocks, t0)
