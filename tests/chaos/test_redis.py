"""Chaos 5: Redis (the metadata store: ``metadata.backend: redis``) killed and started again on the
same port while streams run. Requests keep completing with exact tokens (routing may lose its prefix
hints while Redis is gone), the router's store reconnects, nothing hangs, nothing is leaked."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from tests.chaos import harness
from tests.chaos.harness import PROMPTS, Figures, RedisProcess, served, stream

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300)]

ROUNDS, PER_ROUND = 3, 12


def test_redis_restarted_under_load(workers, checkpoint: Path, reference) -> None:
    from memory_tiers.redis_metadata import RedisMetadataStore

    try:
        redis = RedisProcess()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    fig = Figures("redis-restart", f"redis-server SIGKILLed and restarted {ROUNDS} times under load")
    t0 = time.monotonic()
    redis.start()
    try:

        async def main() -> tuple[list[harness.Outcome], list, int]:
            store = RedisMetadataStore(redis.url)
            async with served(workers, checkpoint, store) as s:
                outs: list[harness.Outcome] = []
                for _ in range(ROUNDS):
                    batch = [asyncio.ensure_future(stream(s.stub, PROMPTS[i % 4])) for i in range(PER_ROUND)]
                    await asyncio.sleep(0)  # let them start
                    await asyncio.to_thread(redis.kill)
                    fig.faults += 1
                    more = [asyncio.ensure_future(stream(s.stub, PROMPTS[i % 4])) for i in range(PER_ROUND)]
                    await asyncio.to_thread(redis.start)
                    got = await asyncio.gather(*batch, *more)
                    # the restart survived: every stream of its round ended with exactly its tokens
                    fig.survived += all(
                        o.code == grpc.StatusCode.OK and o.ids == reference[PROMPTS[i % PER_ROUND % 4]]
                        for i, o in enumerate(got)
                    )
                    outs += got
                # reconnected: the store answers again and the router indexes new blocks in it
                after = await stream(s.stub, PROMPTS[3])
                outs.append(after)
                blocks = await harness.worker_blocks(s)
                harness.counted(fig, s)
                await harness.assert_still_serving(s, reference)
                keys = await asyncio.to_thread(lambda: len(store._r.keys("tandem:blk:*")))
                return outs, blocks, keys

        outs, blocks, keys = asyncio.run(main())
    finally:
        redis.close()
    for o in outs:
        assert o.code == grpc.StatusCode.OK, (o.code, o.details)
    for i, o in enumerate(outs[:-1]):
        assert o.ids == reference[PROMPTS[i % PER_ROUND % 4]], i
    assert outs[-1].ids == reference[PROMPTS[3]]
    assert keys > 0  # the block index is written again after the restarts
    fig.outcome = harness.tally(outs)
    harness.finish(fig, blocks, t0)
