"""Chaos 2: SIGKILL (``os.kill(pid, SIGKILL)`` from the test, on the real actor process) of a prefill
worker mid-transfer and of a decode worker mid-stream, while other streams run. The killed request
is retried (prefill) or resumed on the other decode worker, with the exact tokens; the others
complete with exact tokens; Ray restarts the dead worker; no block is left in use or reserved; the
server still serves greedy requests."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from router.client import build_request
from tests.chaos import harness
from tests.chaos.conftest import LONG_NEW
from tests.chaos.harness import PROMPTS, Figures, served, stream, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300)]


def test_prefill_sigkilled_mid_transfer(workers, checkpoint: Path, reference, tmp_path: Path) -> None:
    fig = Figures("kill-prefill", "SIGKILL of the prefill actor holding a request mid-transfer")
    t0 = time.monotonic()
    rid = "kill-prefill-victim"

    async def main() -> tuple[harness.Outcome, list[harness.Outcome], list, int, int]:
        async with served(workers, checkpoint) as s:
            prefill = s.backend.pools.prefill
            markers = {h.worker_id: tmp_path / f"{h.worker_id}.marker" for h in prefill}
            for h in prefill:  # whichever worker the router picks holds the victim after layer 0
                await h.actor.pause_at_layer.remote(rid, 0, str(markers[h.worker_id]), False, 60.0)
            victim = asyncio.ensure_future(
                stream(s.stub, PROMPTS[3], disaggregation="always", request_id=rid)
            )
            others = [
                asyncio.ensure_future(
                    stream(s.stub, PROMPTS[i % 4], disaggregation=("always", "never")[i % 2])
                )
                for i in range(8)
            ]
            held = await wait_for(lambda: [w for w, m in markers.items() if m.exists()], "the victim held")
            (h,) = [h for h in prefill if h.worker_id == held[0]]
            for x in prefill:  # the retry must not be held on the other worker
                if x is not h:
                    await x.actor.clear_pauses.remote()
            pid = await h.actor.pid.remote()
            os.kill(pid, signal.SIGKILL)
            markers[held[0]].unlink()
            fig.faults += 1
            v = await victim
            outs = list(await asyncio.gather(*others))
            blocks = await harness.worker_blocks(s)  # waits for the restarted worker to answer
            harness.counted(fig, s)
            new_pid = await h.actor.pid.remote()
            for x in prefill:
                await x.actor.clear_pauses.remote()
            await harness.assert_still_serving(s, reference)
            return v, outs, blocks, pid, new_pid

    v, outs, blocks, pid, new_pid = asyncio.run(main())
    # the kill survived: the victim got exactly its tokens (retried on a prefill worker that lives)
    fig.survived = int(v.code == grpc.StatusCode.OK and v.ids == reference[PROMPTS[3]])
    fig.outcome = harness.tally([v, *outs])
    assert new_pid != pid  # it died, and Ray started it again
    assert v.code == grpc.StatusCode.OK, (v.code, v.details)
    assert v.ids == reference[PROMPTS[3]]
    for i, o in enumerate(outs):
        assert o.code == grpc.StatusCode.OK and o.ids == reference[PROMPTS[i % 4]], (i, o.code, o.details)
    harness.finish(fig, blocks, t0)


def test_decode_sigkilled_mid_stream(workers, checkpoint: Path, reference) -> None:
    fig = Figures("kill-decode", "SIGKILL of the decode actor streaming a request")
    t0 = time.monotonic()
    rid = "kill-decode-victim"

    async def main() -> tuple[list[int], list[harness.Outcome], list, int, int, int]:
        async with served(workers, checkpoint) as s:
            pools = s.backend.pools
            others = [
                asyncio.ensure_future(stream(s.stub, PROMPTS[i % 4], max_tokens=LONG_NEW)) for i in range(6)
            ]
            call = s.stub.Generate(
                build_request(PROMPTS[2], max_tokens=LONG_NEW, ignore_eos=True, request_id=rid), timeout=120
            )
            ids: list[int] = []
            while len(ids) < 16:  # mid-stream: some tokens out, most to come
                ids += (await call.read()).token_ids
            d = pools._live[rid].decode  # the decode worker streaming it (the router's own record)
            pid = await d.actor.pid.remote()
            os.kill(pid, signal.SIGKILL)
            fig.faults += 1
            at_kill = len(ids)
            while (m := await call.read()) is not grpc.aio.EOF:
                ids += m.token_ids
            victim_code[0] = (await call.code()).name
            outs = list(await asyncio.gather(*others))
            blocks = await harness.worker_blocks(s)
            harness.counted(fig, s)
            new_pid = await d.actor.pid.remote()
            await harness.assert_still_serving(s, reference)
            return ids, outs, blocks, pid, new_pid, at_kill

    victim_code = [""]  # how the victim's call ended, as its client saw it
    ids, outs, blocks, pid, new_pid, at_kill = asyncio.run(main())
    # the kill survived: the victim resumed (on the other decode worker) with exactly its tokens
    resumed = victim_code[0] == "OK" and ids == reference["long:" + PROMPTS[2]]
    fig.survived = int(resumed)
    fig.outcome = {**harness.tally(outs), f"victim {victim_code[0]}" + (" (resumed)" if resumed else ""): 1}
    assert new_pid != pid
    assert at_kill < LONG_NEW
    assert victim_code[0] == "OK"
    assert ids == reference["long:" + PROMPTS[2]]
    for i, o in enumerate(outs):
        want = reference["long:" + PROMPTS[i % 4]]
        assert o.code == grpc.StatusCode.OK and o.ids == want, (i, o.code, o.details)
    harness.finish(fig, blocks, t0)
