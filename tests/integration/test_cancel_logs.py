"""An ordinary client cancel — a gRPC cancel, an HTTP disconnect, streamed or not — logs nothing at
ERROR, and every request's span still ends."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest

from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request
from tests.integration.test_http_api import running
from tests.integration.test_router_servicer import _until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.mark.parametrize("exporter", ["none", "memory"])
def test_an_ordinary_client_cancel_logs_no_error(exporter: str, caplog: pytest.LogCaptureFixture) -> None:
    """A gRPC cancel and an HTTP disconnect (streamed and not) are ordinary: nothing is logged at
    ERROR (OpenTelemetry's "Failed to detach context" was, when the request's span stayed current
    across a yield and the stream was closed from another context), and each request's span ends."""
    import gc
    import logging

    from router.telemetry import setup_telemetry

    tel = setup_telemetry(exporter)
    gc.collect()  # what earlier tests left behind is finalized now, not inside this test's window
    caplog.clear()

    async def main() -> None:
        async with running(telemetry=tel) as (server, backend, url):
            backend.gate.clear()
            async with grpc.aio.insecure_channel(server.address) as ch:
                call = pb_grpc.TandemStub(ch).Generate(build_request("abc", max_tokens=5, request_id="g"))
                await call.read()
                call.cancel()
                await _until(lambda: "g" in backend.closed and not server.admission.in_flight)
            for stream in (True, False):
                async with aiohttp.ClientSession() as s:
                    body = {"prompt": "ab", "max_tokens": 5, "stream": stream}
                    task = asyncio.ensure_future(s.post(url + "/v1/completions", json=body))
                    await _until(lambda: server.admission.in_flight == 1)
                    if stream:
                        r = await task
                        await r.content.readuntil(b"\n\n")
                        r.close()
                    else:
                        task.cancel()
                    await _until(lambda: not server.admission.in_flight)
            gc.collect()  # a stream finalized by the collector closes in yet another context
            await asyncio.sleep(0.05)
            assert len(backend.closed) == 3
            backend.gate.set()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    if exporter == "memory":
        spans = [s for s in tel.span_exporter.get_finished_spans() if s.name == "tandem.generate"]
        assert len(spans) == 3
    tel.shutdown()
