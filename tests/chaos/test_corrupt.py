"""Chaos 3: a corrupted KV payload. The decode worker's receiver flips one byte of an arriving
payload in its pool before the digest check (the test seam ``corrupt_next_payload``: as if the bytes
were damaged on the wire). The per-message digest catches it, the handoff fails and is retried, and
the client gets exactly the engine's tokens; a payload corrupted on every attempt ends the request
with a clear error, after only exact tokens (the first tokens, sampled by the prefill workers from
their own KV, stream while each handoff completes). Nothing is leaked; the server still serves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from tests.chaos import harness
from tests.chaos.harness import PROMPTS, Figures, served, stream

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300)]


async def _faults(decode: list) -> dict[str, int]:
    total = {"corrupted": 0, "digest_mismatches": 0}
    for h in decode:
        for k, v in (await h.actor.transfer_faults.remote()).items():
            total[k] += v
    return total


def test_corrupted_payload_is_caught_and_never_served(workers, checkpoint: Path, reference) -> None:
    fig = Figures("corrupt-kv", "one byte flipped in arriving KV payloads (before the digest check)")
    t0 = time.monotonic()

    async def main() -> tuple[list[harness.Outcome], harness.Outcome, dict, dict, list]:
        async with served(workers, checkpoint) as s:
            decode = s.backend.pools.decode
            before = await _faults(decode)
            # once: each of 6 requests has its first payload damaged, wherever it lands
            rids = [f"corrupt-once-{i}" for i in range(6)]
            for h in decode:
                for rid in rids:
                    await h.actor.corrupt_next_payload.remote(rid, 1)
            others = [stream(s.stub, PROMPTS[i % 4], disaggregation="always") for i in range(6)]
            once = await asyncio.gather(
                *(
                    stream(s.stub, PROMPTS[i % 4], disaggregation="always", request_id=r)
                    for i, r in enumerate(rids)
                ),
                *others,
            )
            # always: every payload of one request is damaged, on every attempt
            for h in decode:
                await h.actor.corrupt_next_payload.remote("corrupt-always", 1000)
            always = await stream(s.stub, PROMPTS[3], disaggregation="always", request_id="corrupt-always")
            for h in decode:
                for rid in [*rids, "corrupt-always"]:
                    await h.actor.corrupt_next_payload.remote(rid, 0)
            after = await _faults(decode)
            blocks = await harness.worker_blocks(s)
            harness.counted(fig, s)
            await harness.assert_still_serving(s, reference)
            return list(once), always, before, after, blocks

    once, always, before, after, blocks = asyncio.run(main())
    corrupted = after["corrupted"] - before["corrupted"]
    caught = after["digest_mismatches"] - before["digest_mismatches"]
    fig.faults, fig.survived = corrupted, caught  # a damaged payload survived: the digest refused it
    fig.outcome = {**harness.tally(once), f"{always.code.name} (corrupted every attempt)": 1}
    assert corrupted >= 6 + 1 and caught == corrupted  # every damaged payload was refused
    for i, o in enumerate(once):
        assert o.code == grpc.StatusCode.OK, (i, o.code, o.details)
        assert o.ids == reference[PROMPTS[i % 6 % 4]], i  # retried: nothing damaged reached the client
    # what reached the client before the error is exact: each attempt's first token is sampled by
    # the prefill worker from its own intact KV and streamed while the handoff completes behind it
    assert always.code != grpc.StatusCode.OK, always.code
    assert always.ids == reference[PROMPTS[3]][: len(always.ids)], always.ids
    assert "digest mismatch" in always.details, always.details
    print(f"  corrupted payloads {corrupted}, caught by the digest {caught}; always: {always.details!r}")
    harness.finish(fig, blocks, t0)
