"""The servicer and server in-process over real gRPC on loopback, with a scripted backend, and the
EngineBackend alone (tiny checkpoint): status mapping, cancellation reaching the backend, overload,
shutdown, telemetry, and the engine backend returning every block."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pool_runtime.reports import WorkerLoad
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.backend import (
    Backend,
    BackendLoad,
    BackendModelInfo,
    BackendRequest,
    Chunk,
    ChunkStats,
)
from router.client import build_request
from router.errors import BackendUnavailable, InvalidRequest
from router.server import TandemServer
from router.telemetry import setup_telemetry
from router.validation import ModelLimits

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class ScriptedBackend:
    """Yields ``max_tokens`` one-token chunks (token id = position + 100); prompt token 7 raises
    RuntimeError, 8 raises InvalidRequest; while ``gate`` is clear, chunks after the first wait."""

    def __init__(self) -> None:
        self.alive = True
        self.gate = asyncio.Event()
        self.gate.set()
        self.started: list[str] = []
        self.closed: list[str] = []  # request ids whose generator was closed before the end
        self.backend_closed = False

    def model_info(self) -> BackendModelInfo:
        return BackendModelInfo(ModelLimits("fake", 64, 32, default_max_tokens=4, vocab_size=1000))

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def detokenizer(self, request: BackendRequest) -> None:
        return None  # its chunks carry their own text

    async def generate(self, request: BackendRequest) -> AsyncIterator[Chunk]:
        if request.prompt_token_ids[0] == 7:
            raise RuntimeError("boom")
        if request.prompt_token_ids[0] == 8:
            raise InvalidRequest("prompt", "scripted refusal")
        self.started.append(request.request_id)
        n = request.params.max_tokens
        finished = False
        try:
            for i in range(n):
                if i > 0:
                    await self.gate.wait()
                last = i == n - 1
                stats = None
                if last:
                    stats = ChunkStats(len(request.prompt_token_ids), n, 0, 0.001, 0.002, "p0", "d0")
                finished = last
                yield Chunk([100 + i], f"<{i}>", "length" if last else None, stats=stats)
        finally:
            if not finished:
                self.closed.append(request.request_id)

    def load(self) -> BackendLoad:
        return BackendLoad(self.alive, [WorkerLoad("d0", "decode", running=len(self.started))])

    def close(self) -> None:
        self.backend_closed = True


def serve(backend: Backend, **kw: object) -> TandemServer:
    return TandemServer(backend, port=0, **kw)  # type: ignore[arg-type]


async def _collect(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    return [m async for m in call]


async def _until(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.01)


def test_stream_converts_chunks_and_reports_telemetry() -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        tel = setup_telemetry("memory")
        server = serve(backend, telemetry=tel)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub = pb_grpc.TandemStub(ch)
                msgs = await _collect(stub.Generate(build_request("abc", max_tokens=3, request_id="r1")))
                assert [list(m.token_ids) for m in msgs] == [[100], [101], [102]]
                assert "".join(m.text for m in msgs) == "<0><1><2>"
                assert [m.finish_reason for m in msgs] == [0, 0, pb.FINISH_REASON_LENGTH]
                last = msgs[-1]
                assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 3)
                assert (last.timings.prefill_worker, last.timings.decode_worker) == ("p0", "d0")
                assert last.timings.backend_time_s == 0.002 and last.timings.queue_time_s == 0.001
                default = await _collect(stub.Generate(build_request("abc")))  # default_max_tokens 4
                assert len(default) == 4
        finally:
            await server.stop(0)
        (span, _) = tel.span_exporter.get_finished_spans()
        assert span.name == "tandem.generate"
        assert span.attributes["tandem.request_id"] == "r1"
        assert span.attributes["tandem.completion_tokens"] == 3
        assert span.attributes["tandem.decode_worker"] == "d0"
        names = {
            m.name: m
            for rm in tel.metric_reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
        assert names["tandem.ttft"].data.data_points[0].count == 2
        assert names["tandem.inter_token_latency"].data.data_points[0].count == 5
        assert names["tandem.queue_time"].data.data_points[0].count == 2

    asyncio.run(main())


def test_status_mapping_and_other_streams_unaffected() -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        server = serve(backend)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub = pb_grpc.TandemStub(ch)
                backend.gate.clear()
                ongoing = stub.Generate(build_request("go", max_tokens=5))
                await ongoing.read()
                cases = [
                    (build_request([7]), grpc.StatusCode.INTERNAL, "internal error: RuntimeError: boom"),
                    (build_request([8]), grpc.StatusCode.INVALID_ARGUMENT, "prompt: scripted refusal"),
                    (
                        build_request("x", top_k=-1),
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "sampling.top_k: must be >= 0",
                    ),
                    (build_request("x" * 65), grpc.StatusCode.INVALID_ARGUMENT, "prompt: has 65 tokens"),
                    (
                        build_request([1, 1000]),
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "prompt.token_ids: token id 1000",
                    ),
                ]
                for req, code, details in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await _collect(stub.Generate(req))
                    assert err.value.code() == code
                    assert err.value.details().startswith(details), err.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetModelInfo(pb.GetModelInfoRequest(model="other"))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                backend.alive = False
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _collect(stub.Generate(build_request("x")))
                assert (err.value.code(), err.value.details()) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "no live backend worker",
                )
                backend.alive = True
                backend.gate.set()
                rest = []
                while (m := await ongoing.read()) is not grpc.aio.EOF:
                    rest += m.token_ids
                assert rest == [101, 102, 103, 104]
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_client_cancel_closes_the_backend_stream_and_overload_sheds() -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        server = serve(backend, max_concurrency=1, max_queue=0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as ch:
                stub = pb_grpc.TandemStub(ch)
                backend.gate.clear()
                call = stub.Generate(build_request("abc", max_tokens=5, request_id="victim"))
                await call.read()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _collect(stub.Generate(build_request("abc")))
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert server.admission.num_shed == 1
                call.cancel()
                await _until(lambda: backend.closed == ["victim"] and server.admission.in_flight == 0)
                assert backend.closed == ["victim"]
                assert server.admission.in_flight == 0
                backend.gate.set()
                assert len(await _collect(stub.Generate(build_request("abc", max_tokens=2)))) == 2
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_stop_cancels_in_flight_and_closes_backend() -> None:
    async def main() -> None:
        backend = ScriptedBackend()
        server = serve(backend)
        await server.start()
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.TandemStub(ch)
            backend.gate.clear()
            call = stub.Generate(build_request("abc", max_tokens=5, request_id="inflight"))
            await call.read()
            await server.stop(grace=0.2)
            with pytest.raises(grpc.aio.AioRpcError):
                while await call.read() is not grpc.aio.EOF:
                    pass
        assert backend.closed == ["inflight"]
        assert backend.backend_closed
        await server.stop(0)  # idempotent

    asyncio.run(main())


# -- EngineBackend, no gRPC ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_backend(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from engine.llm_engine import EngineConfig
    from engine.make_model import make_model
    from router.engine_backend import EngineBackend

    path = tmp_path_factory.mktemp("tiny")
    make_model(path, "tiny")
    backend = EngineBackend(EngineConfig(model=Path(path), max_num_seqs=8), model_name="tiny")
    try:
        yield backend
    finally:
        backend.close()


def _req(rid: str, prompt: list[int], max_tokens: int) -> BackendRequest:
    from engine.sampling_params import SamplingParams

    return BackendRequest(
        rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival=time.monotonic()
    )


def test_engine_backend_streams_frees_blocks_on_close_and_refuses_bad_input(engine_backend) -> None:  # type: ignore[no-untyped-def]
    b = engine_backend
    assert isinstance(b, Backend)
    info = b.model_info()
    assert (info.limits.name, info.limits.max_context_length, info.limits.vocab_size) == ("tiny", 2048, 512)

    async def main() -> None:
        chunks = [c async for c in b.generate(_req("full", [5] * 40, 6))]
        assert sum(len(c.token_ids) for c in chunks) == 6
        st = chunks[-1].stats
        assert st is not None and (st.prompt_tokens, st.completion_tokens) == (40, 6)
        assert (st.prefill_worker, st.decode_worker, st.kv_bytes_moved) == ("local", "local", 0)

        stream = b.generate(_req("dup", [9] * 40, 500))
        await stream.__anext__()
        await _until(lambda: b.load().used_blocks > 0)
        load = b.load()  # it keeps generating, so only a lower bound: the 40-token prompt's 3 blocks
        assert load.running == 1 and load.used_blocks >= 3
        with pytest.raises(InvalidRequest) as err:
            [c async for c in b.generate(_req("dup", [1, 2], 2))]
        assert err.value.field == "request_id"
        await stream.aclose()  # the consumer goes away: the request is aborted in the engine
        await _until(lambda: b.load().used_blocks == 0 and b.load().running == 0)
        load = b.load()
        assert (load.running, load.waiting, load.used_blocks) == (0, 0, 0)

    asyncio.run(main())


def test_engine_backend_close_is_idempotent_and_then_unavailable(tmp_path: Path) -> None:
    from engine.llm_engine import EngineConfig
    from engine.make_model import make_model
    from router.engine_backend import EngineBackend

    make_model(tmp_path, "tiny")
    b = EngineBackend(EngineConfig(model=tmp_path, max_num_seqs=2))

    async def main() -> None:
        stream = b.generate(_req("a", [3] * 20, 1000))
        await stream.__anext__()
        await asyncio.to_thread(b.close)
        with pytest.raises(BackendUnavailable):
            async for _ in stream:
                pass
        with pytest.raises(BackendUnavailable):
            [c async for c in b.generate(_req("b", [3], 2))]

    asyncio.run(main())
    b.close()
    assert not b.load().alive and b.load().used_blocks == 0
