"""AdmissionQueue (bounded concurrency, bounded FIFO queue, shedding), the bench workload, and the
error -> status mapping: pure asyncio, no gRPC server."""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest

from benchmarks.serve_workload import arrival_times, make_workload, parse_length, percentile
from router.admission import AdmissionQueue
from router.errors import BackendUnavailable, InvalidRequest, Overloaded, status_for
from router.validation import ValidationError

pytestmark = pytest.mark.unit


def test_slots_then_queue_then_shed_in_fifo_order() -> None:
    async def main() -> None:
        q = AdmissionQueue(max_concurrency=2, max_queue=2)
        await q.acquire()
        await q.acquire()
        assert (q.in_flight, q.queued) == (2, 0)
        order: list[str] = []

        async def waiter(name: str) -> None:
            await q.acquire()
            order.append(name)

        a = asyncio.create_task(waiter("a"))
        await asyncio.sleep(0)
        b = asyncio.create_task(waiter("b"))
        await asyncio.sleep(0)
        assert (q.in_flight, q.queued) == (2, 2)
        with pytest.raises(Overloaded, match=r"2 requests in flight .* 2 queued \(max_queue 2\)"):
            await q.acquire()
        assert q.num_shed == 1
        q.release()  # the slot goes to "a", not to a newcomer
        await a
        assert order == ["a"] and (q.in_flight, q.queued) == (2, 1)
        q.release()
        await b
        assert order == ["a", "b"] and (q.in_flight, q.queued) == (2, 0)
        q.release()
        q.release()
        assert q.in_flight == 0

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue_and_close_rejects() -> None:
    async def main() -> None:
        q = AdmissionQueue(max_concurrency=1, max_queue=1)
        async with q.slot():
            t = asyncio.create_task(q.acquire())
            await asyncio.sleep(0)
            assert q.queued == 1
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            assert q.queued == 0
            t2 = asyncio.create_task(q.acquire())
            await asyncio.sleep(0)
            q.close()
            with pytest.raises(BackendUnavailable, match="shutting down"):
                await t2
        assert q.in_flight == 0
        with pytest.raises(BackendUnavailable):
            await q.acquire()

    asyncio.run(main())


def test_slot_handed_over_to_a_cancelled_waiter_is_given_back() -> None:
    async def main() -> None:
        q = AdmissionQueue(max_concurrency=1, max_queue=1)
        await q.acquire()
        t = asyncio.create_task(q.acquire())
        await asyncio.sleep(0)
        q.release()  # hands the slot to t ...
        t.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await t
        assert (q.in_flight, q.queued) == (0, 0)

    asyncio.run(main())


def test_no_queue_sheds_at_once() -> None:
    async def main() -> None:
        q = AdmissionQueue(max_concurrency=1, max_queue=0)
        await q.acquire()
        with pytest.raises(Overloaded):
            await q.acquire()

    asyncio.run(main())


def test_status_mapping() -> None:
    assert status_for(ValidationError("sampling.top_p", "must be in (0, 1], got 2")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p: must be in (0, 1], got 2",
    )
    assert status_for(InvalidRequest("request_id", "in use")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_id: in use",
    )
    assert status_for(Overloaded("full"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(BackendUnavailable())[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(KeyError("x")) == (grpc.StatusCode.INTERNAL, "internal error: KeyError: 'x'")


def test_length_distributions_and_arrivals() -> None:
    assert parse_length("32").sample(random.Random(0)) == 32
    rng = random.Random(1)
    assert {parse_length("uniform:3:4").sample(rng) for _ in range(50)} == {3, 4}
    assert parse_length("normal:1:0").sample(rng) == 1
    for bad in ("fixed:0", "uniform:5:4", "gauss:1:2", "fixed:x"):
        with pytest.raises(ValueError, match="bad length distribution"):
            parse_length(bad)
    assert arrival_times(3, 4.0, "fixed", rng) == [0.0, 0.25, 0.5]
    assert arrival_times(2, math.inf, "poisson", rng) == [0.0, 0.0]
    t = arrival_times(100, 10.0, "poisson", random.Random(0))
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:], strict=False))


def test_shared_prefix_workload() -> None:
    w = make_workload(
        4,
        vocab_size=10,
        prompt_len=parse_length("fixed:3"),
        output_len=parse_length("fixed:5"),
        shared_prefix_len=6,
        num_prefixes=2,
        exclude_ids=[0, 1],
        seed=0,
    )
    assert [r.prefix_id for r in w] == [0, 1, 0, 1]
    assert [len(r.prompt_token_ids) for r in w] == [9, 9, 9, 9]
    assert w[0].prompt_token_ids[:6] == w[2].prompt_token_ids[:6] != w[1].prompt_token_ids[:6]
    assert all(t not in (0, 1) for r in w for t in r.prompt_token_ids)
    assert all(r.max_tokens == 5 for r in w)
    again = make_workload(
        4,
        vocab_size=10,
        prompt_len=parse_length("fixed:3"),
        output_len=parse_length("fixed:5"),
        shared_prefix_len=6,
        num_prefixes=2,
        exclude_ids=[0, 1],
        seed=0,
    )
    assert again == w


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
