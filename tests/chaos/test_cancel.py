"""Chaos 1: cancel at every stage, through the front doors — gRPC cancel and deadline, HTTP
disconnect — while queued in admission, during prefill (before any KV is sent), during the KV
transfer, during decode, and after the last token. The stage is known for sure: a prefill worker is
held at a layer by its test seam (``pause_at_layer``, a marker file) and the case acts once the
marker exists. Afterwards: every call ended within its deadline, no worker holds an in-use or
reserved block, the other streams got exact tokens, and the server still serves greedy requests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import pytest

from router.client import build_request
from tests.chaos import harness
from tests.chaos.harness import PROMPTS, Figures, Served, served, stream, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300)]

LONG = PROMPTS[3]  # four blocks: two prefill steps of 32 tokens


async def _pause_all(s: Served, rid: str, marker: Path, layer: int, before: bool) -> None:
    for h in s.backend.pools.prefill:
        await h.actor.pause_at_layer.remote(rid, layer, str(marker), before, 60.0)


async def _clear(s: Served) -> None:
    for h in s.backend.pools.prefill:
        await h.actor.clear_pauses.remote()


async def _queued(s: Served, n: int) -> None:
    await wait_for(lambda: s.server.admission.queued == n, f"{n} request(s) queued in admission")


def test_cancel_at_every_stage_over_grpc(workers, checkpoint: Path, reference, tmp_path: Path) -> None:
    fig = Figures("cancel-grpc", "gRPC cancel / deadline at 6 stages")
    t0 = time.monotonic()
    codes: Counter[str] = Counter()  # how each call ended, as its client saw it

    async def main() -> list[tuple[str, int, int]]:
        async with served(workers, checkpoint, max_concurrency=1, max_queue=4) as s:
            stub = s.stub
            # -- queued in admission: one slot, held by a long stream
            holder = stub.Generate(build_request(PROMPTS[0], max_tokens=1500, ignore_eos=True), timeout=120)
            await holder.read()
            queued = stub.Generate(build_request(PROMPTS[1], max_tokens=5, ignore_eos=True), timeout=120)
            await _queued(s, 1)
            queued.cancel()
            await _queued(s, 0)
            holder.cancel()
            codes.update([(await queued.code()).name, (await holder.code()).name])
            fig.faults += 2
            await wait_for(lambda: s.server.admission.in_flight == 0, "the slot back")
            await harness.recovered(fig, s)
            fig.survived += 1  # the one check covers both cancels of this stage

            # -- during prefill (no KV sent yet), during the transfer (layer 0 of the first chunk
            # sent), and a deadline that passes during the transfer
            for stage, layer, before, deadline in (
                ("prefill", 0, True, None),
                ("transfer", 0, False, None),
                ("deadline", 1, False, 2.0),
            ):
                rid, marker = f"cancel-{stage}", tmp_path / f"{stage}.marker"
                await _pause_all(s, rid, marker, layer, before)
                call = stub.Generate(
                    build_request(
                        LONG, max_tokens=5, ignore_eos=True, disaggregation="always", request_id=rid
                    ),
                    timeout=deadline or 120,
                )
                await wait_for(marker.exists, f"the prefill held at {stage}")
                if deadline is None:
                    call.cancel()
                    code = await call.code()
                    assert code == grpc.StatusCode.CANCELLED, stage
                    codes[code.name] += 1
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in call:
                            pass
                    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, stage
                    codes[err.value.code().name] += 1
                os.unlink(marker)  # the worker goes on: it finds the request cancelled
                fig.faults += 1
                await harness.recovered(fig, s)
            await _clear(s)

            # -- during decode, with another stream beside it (on the other slot... there is one:
            # run the bystander after) and after the last token
            call = stub.Generate(build_request(LONG, max_tokens=1500, ignore_eos=True), timeout=120)
            for _ in range(3):
                await call.read()
            call.cancel()
            codes[(await call.code()).name] += 1
            fig.faults += 1
            await harness.recovered(fig, s)
            done = stub.Generate(build_request(PROMPTS[1], max_tokens=harness.MAX_NEW, ignore_eos=True))
            ids = [t async for m in done for t in m.token_ids]
            assert ids == reference[PROMPTS[1]]
            done.cancel()  # after the last token: nothing to cancel, nothing breaks
            assert await done.code() == grpc.StatusCode.OK
            codes[(await done.code()).name] += 1
            fig.faults += 1
            blocks = await harness.recovered(fig, s)
            harness.counted(fig, s)
            await harness.assert_still_serving(s, reference)
            return blocks

    blocks = asyncio.run(main())
    fig.outcome = dict(codes)
    harness.finish(fig, blocks, t0)


async def _client_gone(task: asyncio.Future) -> None:
    """The HTTP client goes away: its connection closes, whether or not the response's head came."""
    if task.done():
        task.result().close()  # aiohttp: close (not release) drops the connection
    else:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_http_client_gone_at_every_stage(workers, checkpoint: Path, reference, tmp_path: Path) -> None:
    fig = Figures("cancel-http", "HTTP client disconnect at 3 stages")
    t0 = time.monotonic()
    body = {"prompt": LONG, "max_tokens": 1500, "ignore_eos": True, "stream": True}

    async def main() -> list[tuple[str, int, int]]:
        nonlocal gone
        async with served(workers, checkpoint, max_concurrency=1, max_queue=4, http=True) as s:
            url = f"{s.http_url}/v1/completions"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                # -- queued in admission behind a gRPC stream holding the one slot
                holder = s.stub.Generate(build_request(PROMPTS[0], max_tokens=1500, ignore_eos=True))
                await holder.read()
                task = asyncio.ensure_future(http.post(url, json=body))
                await _queued(s, 1)
                task.cancel()  # the client goes away while its request waits
                gone += 1
                await _queued(s, 0)
                holder.cancel()
                outcome[(await holder.code()).name] += 1
                fig.faults += 1
                await wait_for(lambda: s.server.admission.in_flight == 0, "the slot back")
                await harness.recovered(fig, s)

                # -- during the transfer: the next request is held after layer 0 of its first chunk
                marker = tmp_path / "http-transfer.marker"
                await _pause_all(s, "*", marker, 0, False)
                task = asyncio.ensure_future(http.post(url, json={**body, "disaggregation": "always"}))
                await wait_for(marker.exists, "the prefill held mid-transfer")
                await _client_gone(task)
                gone += 1
                # the router lets go at once, while the worker still holds the KV in transfer; the
                # worker frees its blocks when it goes on (it finds the request cancelled)
                await wait_for(lambda: s.server.admission.in_flight == 0, "the router lets go mid-transfer")
                assert marker.exists()
                os.unlink(marker)
                await _clear(s)
                fig.faults += 1
                await harness.recovered(fig, s)

                # -- during decode: a streamed response closed after its first event
                r = await http.post(url, json=body)
                assert r.status == 200
                await r.content.readuntil(b"\n\n")
                await r.content.readuntil(b"\n\n")
                r.close()
                gone += 1
                fig.faults += 1
                blocks = await harness.recovered(fig, s)
                harness.counted(fig, s)
                await harness.assert_still_serving(s, reference)
                return blocks

    gone = 0  # HTTP clients that went away
    outcome: Counter[str] = Counter()  # how the gRPC holder ended
    blocks = asyncio.run(main())
    fig.outcome = {"client gone": gone, **outcome}
    harness.finish(fig, blocks, t0)


def test_a_stream_beside_the_cancels_gets_exact_tokens(workers, checkpoint: Path, reference) -> None:
    """Cancels of 8 streams at random points while 8 others run: the others' tokens are exact."""
    import random

    rng = random.Random(17)
    fig = Figures("cancel-mixed", "8 gRPC cancels at random points beside 8 full streams")
    t0 = time.monotonic()

    async def main() -> tuple[list[harness.Outcome], list[str], list[tuple[str, int, int]]]:
        async with served(workers, checkpoint) as s:

            async def victim(i: int) -> str:
                call = s.stub.Generate(build_request(PROMPTS[i % 4], max_tokens=1500, ignore_eos=True))
                for _ in range(rng.randrange(0, 6)):
                    await call.read()
                call.cancel()
                return (await call.code()).name

            others = [stream(s.stub, PROMPTS[i % 4]) for i in range(8)]
            outs = await asyncio.gather(*others, *(victim(i) for i in range(8)))
            blocks = await harness.worker_blocks(s)
            harness.counted(fig, s)
            await harness.assert_still_serving(s, reference)
            return list(outs[:8]), list(outs[8:]), blocks

    outs, victims, blocks = asyncio.run(main())
    fig.faults = victims.count("CANCELLED")
    # a cancel survived when every stream beside it got exactly its tokens
    exact = sum(
        o.code == grpc.StatusCode.OK and o.ids == reference[PROMPTS[i % 4]] for i, o in enumerate(outs)
    )
    fig.survived = fig.faults if exact == len(outs) else 0
    fig.outcome = {**harness.tally(outs), **{f"victim {k}": n for k, n in Counter(victims).items()}}
    for i, o in enumerate(outs):
        assert o.code == grpc.StatusCode.OK and o.ids == reference[PROMPTS[i % 4]], (i, o.code, o.details)
    assert victims == ["CANCELLED"] * 8
    harness.finish(fig, blocks, t0)
