"""The coordinator's observability over fake workers: ``on_handoff`` sees exactly the committed
handoffs (with their decode worker), a failing observer cannot fail a request, and failovers are
events on the request's span."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pool_runtime.handoff import FirstToken, TokenChunk, WorkerDied
from router.coordinator import Pools
from router.telemetry import setup_telemetry
from tests.unit.test_pools_coordinator import FakeDecode, FakePrefill, _req, _run, _tokens

pytestmark = pytest.mark.unit


def test_on_handoff_sees_each_committed_handoff_with_its_decode_worker() -> None:
    seen: list[tuple[str, int, str]] = []

    def observe(first: FirstToken, decode_worker: str) -> None:
        seen.append((first.worker_id, first.token_id, decode_worker))

    # p0 dies (no handoff), p1 commits on d0
    p0, p1, d = FakePrefill("p0", WorkerDied("p0")), FakePrefill("p1"), FakeDecode("d0")
    chunks = _run(Pools([p0, p1], [d]), _req(prefill_worker="p0", on_handoff=observe))
    assert _tokens(chunks) == [105, 106, 107, 108] and chunks[-1].error == ""
    assert seen == [("p1", 105, "d0")]
    # d0 dies at position 7: the resume is a second handoff, onto d1
    seen.clear()
    p, d0, d1 = FakePrefill("p0"), FakeDecode("d0", die_at=7), FakeDecode("d1")
    chunks = _run(Pools([p], [d0, d1]), _req(max_tokens=5, decode_worker="d0", on_handoff=observe))
    assert _tokens(chunks) == [105, 106, 107, 108, 109] and chunks[-1].error == ""
    assert seen == [("p0", 105, "d0"), ("p0", 107, "d1")]


def test_local_prefill_has_no_handoff_and_a_failing_observer_is_harmless() -> None:
    calls: list[str] = []

    def broken(first: FirstToken, decode_worker: str) -> None:
        calls.append(decode_worker)
        raise RuntimeError("metrics backend down")

    p, d = FakePrefill("p0"), FakeDecode("d0")
    chunks = _run(Pools([p], [d]), _req(disaggregation="never", on_handoff=broken))
    assert _tokens(chunks) == [105, 106, 107, 108] and calls == []
    chunks = _run(Pools([p], [d]), _req(rid="r2", on_handoff=broken))
    assert _tokens(chunks) == [105, 106, 107, 108] and chunks[-1].error == "" and calls == ["d0"]
    assert d.live == {}


def test_failovers_are_events_on_the_request_span() -> None:
    tel = setup_telemetry("memory")
    p0, p1 = FakePrefill("p0", WorkerDied("p0 is gone")), FakePrefill("p1")
    d0, d1 = FakeDecode("d0", die_at=7), FakeDecode("d1")
    pools = Pools([p0, p1], [d0, d1], max_attempts=5)

    async def go() -> list[TokenChunk]:
        with tel.tracer.start_as_current_span("tandem.generate"):
            return [
                c async for c in pools.submit(_req(max_tokens=5, prefill_worker="p0", decode_worker="d0"))
            ]

    chunks = asyncio.run(go())
    assert _tokens(chunks) == [105, 106, 107, 108, 109]
    (span,) = tel.span_exporter.get_finished_spans()
    events: list[tuple[str, dict[str, Any]]] = [(e.name, dict(e.attributes)) for e in span.events]
    retry = ("tandem.prefill_retry", {"tandem.worker": "p0", "tandem.error": "p0 is gone"})
    # p0 fails, p1 commits on d0; d0 dies after 2 tokens; the resume tries p0 (preferred) again, then p1
    assert [name for name, _ in events] == [
        "tandem.prefill_retry",
        "tandem.decode_resume",
        "tandem.prefill_retry",
    ]
    assert events[0] == retry and events[2] == retry
    assert events[1][1]["tandem.worker"] == "d0" and events[1][1]["streamed"] == 2
    tel.shutdown()


def test_handles_see_the_request_context_through_the_coordinator() -> None:
    """The handles inject the caller's current context (the coordinator runs inside the request's
    span): a traced request carries its trace id, an untraced one carries nothing."""
    from pool_runtime.tracing import inject_context

    tel = setup_telemetry("memory")
    seen: list[Any] = []

    class CtxPrefill(FakePrefill):
        async def prefill(self, req, grant):  # type: ignore[no-untyped-def]
            seen.append(inject_context())
            async for first in super().prefill(req, grant):
                yield first

    pools = Pools([CtxPrefill("p0")], [FakeDecode("d0")])
    chunks = _run(pools, _req())
    assert _tokens(chunks) == [105, 106, 107, 108] and seen == [None]

    async def traced() -> int:
        with tel.tracer.start_as_current_span("tandem.generate") as span:
            async for _ in pools.submit(_req(rid="r2")):
                pass
            return span.get_span_context().trace_id

    trace_id = asyncio.run(traced())
    assert seen[1] is not None and seen[1]["traceparent"].split("-")[1] == f"{trace_id:032x}"
    tel.shutdown()
