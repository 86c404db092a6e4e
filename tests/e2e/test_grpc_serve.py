"""End to end through a real gRPC connection to a real ``tandem serve --backend engine`` child process
(the pools backend, serve's default, has its own tests: tests/e2e/test_serve_pools.py).

The managed-server fixture starts ``python -m deploy.serve --port 0`` in its own process group, reads
the bound port from its log, waits for gRPC health SERVING, prints the log tail if the child dies,
and kills the whole group at teardown. References come from the in-process LLMEngine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request, stream_generate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "gRPC streams tokens"]


def _serve_command() -> list[str]:
    """``tandem serve`` through the CLI dispatcher once it registers the command, else the module."""
    from deploy.cli import COMMANDS

    if COMMANDS.get("serve", ("",))[0] == "deploy.serve":
        return [sys.executable, "-m", "deploy.cli", "serve"]
    return [sys.executable, "-m", "deploy.serve"]


class ManagedServer:
    """One ``tandem serve`` child: start -> wait for health -> use -> stop (SIGTERM, then SIGKILL)."""

    def __init__(self, log_path: Path, *extra: str, ready_timeout: float = 90.0) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        # both front doors on free ports: a fixed one would clash with other servers on the machine
        cmd = [*_serve_command(), "--port", "0", "--http-port", "0", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.address = self._wait_ready(timeout=ready_timeout)
        self.http_url = None if "--no-http" in extra else self._http_url()

    def _http_url(self, timeout: float = 20.0) -> str:
        """The OpenAI API's URL, logged just after the gRPC address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(
                r"OpenAI-compatible HTTP on (http://\S+:\d+)", self.log_path.read_text(errors="replace")
            )
            if m:
                return m.group(1)
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"tandem serve logged no HTTP address; log tail:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        address = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"tandem serve exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            if address is None:
                m = re.search(r"listening on (\S+:\d+)", self.log_path.read_text(errors="replace"))
                address = m.group(1) if m else None
            if address is not None and _health(address) == health_pb2.HealthCheckResponse.SERVING:
                return address
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"tandem serve not healthy after {timeout} s; log tail:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _health(address: str, service: str = "") -> int | None:
    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
            return resp.status
    except grpc.RpcError:
        return None


def _server_info(address: str) -> pb.GetServerInfoResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.TandemStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)


def _wait_idle(address: str) -> pb.WorkerInfo:
    """The worker's load once nothing runs or waits (liveness bound only; the caller asserts exact values)."""
    deadline = time.monotonic() + 20
    while True:
        (w,) = _server_info(address).workers
        if (
            w.running_seqs == 0 and w.waiting_seqs == 0 and w.used_blocks == 0
        ) or time.monotonic() > deadline:
            return w
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[tuple[str, int, bool], list[int]]:
    """Greedy token ids of the in-process engine, each prompt alone, by (prompt, max_tokens, ignore_eos)."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=checkpoint))
    out: dict[tuple[str, int, bool], list[int]] = {}
    try:
        for prompt in PROMPTS:
            for max_tokens, ignore_eos in ((12, False), (6, True)):
                (r,) = engine.generate([prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))
                out[(prompt, max_tokens, ignore_eos)] = r.new_token_ids
    finally:
        engine.close()
    return out


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    s = ManagedServer(
        tmp_path_factory.mktemp("serve") / "serve.log", "--backend", "engine", "--model", str(checkpoint)
    )
    try:
        yield s
    finally:
        s.stop()


def test_greedy_output_equals_in_process_engine(server: ManagedServer, reference: dict) -> None:
    for prompt in PROMPTS:
        msgs = list(stream_generate(server.address, prompt, max_tokens=12))
        ids = [t for m in msgs for t in m.token_ids]
        assert ids == reference[(prompt, 12, False)]
        last = msgs[-1]
        assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        assert last.usage.completion_tokens == len(ids)
        assert (last.timings.prefill_worker, last.timings.decode_worker) == ("local", "local")
        assert last.timings.kv_bytes_moved == 0 and not last.timings.disaggregated
        assert 0 < last.timings.time_to_first_token_s <= last.timings.total_time_s
    assert _wait_idle(server.address).used_blocks == 0


def test_64_concurrent_streams_lose_no_token_and_free_every_block(
    server: ManagedServer, reference: dict
) -> None:
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(64)]

    async def one(stub: pb_grpc.TandemStub, prompt: str) -> tuple[list[int], pb.GenerateResponse]:
        ids: list[int] = []
        last = None
        async for m in stub.Generate(build_request(prompt, max_tokens=6, ignore_eos=True), timeout=120):
            ids += m.token_ids
            last = m
        assert last is not None
        return ids, last

    async def main() -> list[tuple[list[int], pb.GenerateResponse]]:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.TandemStub(ch)
            return await asyncio.gather(*(one(stub, p) for p in jobs))

    results = asyncio.run(main())
    for prompt, (ids, last) in zip(jobs, results, strict=True):
        assert ids == reference[(prompt, 6, True)]
        assert last.usage.completion_tokens == 6
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert len({last.request_id for _, last in results}) == 64
    w = _wait_idle(server.address)
    assert (w.running_seqs, w.waiting_seqs, w.used_blocks) == (0, 0, 0)


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    # The engine's own check: the id of the stream that is running.
    (dict(request_id="long-running"), "request_id: request id 'long-running' is already in use"),
    (dict(prompt=""), "prompt: is empty"),
    (dict(prompt=[]), "prompt.token_ids: is empty"),
    (dict(prompt=[1] * 2049), "prompt.token_ids: has 2049 tokens, over the context length 2048"),
    (dict(prompt=[1, 512]), "prompt.token_ids: token id 512 is outside the vocabulary"),
    (dict(prompt="hi " * 3000), "prompt: has "),
    (dict(max_tokens=0), "sampling.max_tokens: must be > 0"),
    (dict(max_tokens=5000), "sampling.max_tokens: 5000 is over this server's limit 2048"),
    (dict(prompt=[1] * 2040, max_tokens=20), "sampling.max_tokens: 20 plus the prompt's 2040 tokens"),
    (dict(temperature=-0.5), "sampling.temperature: must be >= 0"),
    (dict(top_p=0.0), "sampling.top_p: must be in (0, 1]"),
    (dict(top_p=1.5), "sampling.top_p: must be in (0, 1]"),
    (dict(model="no-such-model"), "model: unknown model 'no-such-model'"),
]


def test_bad_inputs_get_invalid_argument_while_another_stream_goes_on(server: ManagedServer) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.TandemStub(ch)
            long = stub.Generate(
                build_request(
                    "a stream that keeps going", max_tokens=600, ignore_eos=True, request_id="long-running"
                )
            )
            first = await long.read()  # it is running in the engine before the bad requests arrive
            for kwargs, expected in BAD_INPUTS:
                kwargs = dict(kwargs)
                prompt = kwargs.pop("prompt", "Hello")
                call = stub.Generate(build_request(prompt, **kwargs))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
                assert err.value.details().startswith(expected), (kwargs, err.value.details())
            ids, last = list(first.token_ids), first
            while (m := await long.read()) is not grpc.aio.EOF:
                ids += m.token_ids
                last = m
            assert len(ids) == 600 and last.finish_reason == pb.FINISH_REASON_LENGTH

    asyncio.run(main())
    assert _wait_idle(server.address).used_blocks == 0


def test_cancel_and_deadline_free_blocks(server: ManagedServer) -> None:
    async def main() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.TandemStub(ch)
            call = stub.Generate(build_request("cancel me " * 20, max_tokens=1500, ignore_eos=True))
            for _ in range(3):
                await call.read()
            (w,) = (await stub.GetServerInfo(pb.GetServerInfoRequest())).workers
            call.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(
                    build_request("deadline", max_tokens=1500, ignore_eos=True), timeout=0.5
                ):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return w.running_seqs, w.used_blocks

    running, used = asyncio.run(main())
    assert running == 1 and used > 0  # the stream held blocks while it ran...
    w = _wait_idle(server.address)
    assert (w.running_seqs, w.waiting_seqs, w.used_blocks) == (0, 0, 0)  # ...and gave them all back


def test_health_reflection_and_info(server: ManagedServer) -> None:
    assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
    assert _health(server.address, "tandem.v1.Tandem") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"tandem.v1.Tandem", "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        svc = DescriptorPool(db).FindServiceByName("tandem.v1.Tandem")
        assert [m.name for m in svc.methods] == ["Generate", "GetModelInfo", "GetServerInfo"]
        stub = pb_grpc.TandemStub(ch)
        (model,) = stub.GetModelInfo(pb.GetModelInfoRequest()).models
        assert (model.max_context_length, model.vocab_size, model.block_size) == (2048, 512, 16)
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert (info.max_concurrency, info.max_queue) == (64, 256)
        assert [(w.worker_id, w.role) for w in info.workers] == [("local", "both")]


def test_client_cli_json(server: ManagedServer, reference: dict) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.client",
            PROMPTS[0],
            "--server",
            server.address,
            "--max-tokens",
            "12",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["token_ids"] == reference[(PROMPTS[0], 12, False)]
    assert doc["usage"]["completion_tokens"] == len(doc["token_ids"])
    bad = subprocess.run(
        [sys.executable, "-m", "router.client", "x", "--server", server.address, "--max-tokens", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "INVALID_ARGUMENT: sampling.max_tokens" in bad.stderr


def test_overload_sheds_with_resource_exhausted_then_sigterm_drains(checkpoint: Path, tmp_path: Path) -> None:
    s = ManagedServer(
        tmp_path / "serve.log",
        "--backend",
        "engine",
        "--model",
        str(checkpoint),
        "--max-concurrency",
        "1",
        "--max-queue",
        "1",
    )
    try:

        async def main() -> None:
            async with grpc.aio.insecure_channel(s.address) as ch:
                stub = pb_grpc.TandemStub(ch)
                running = stub.Generate(build_request("first", max_tokens=1500, ignore_eos=True))
                await running.read()
                queued = stub.Generate(build_request("second", max_tokens=4, ignore_eos=True))
                queued_task = asyncio.ensure_future(_collect(queued))
                while (await stub.GetServerInfo(pb.GetServerInfoRequest())).queued != 1:
                    await asyncio.sleep(0.02)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Generate(build_request("third", max_tokens=4)):
                        pass
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_queue 1" in err.value.details()
                running.cancel()
                ids = await queued_task  # the queued request got the freed slot and ran
                assert len(ids) == 4

        asyncio.run(main())
        w = _wait_idle(s.address)
        assert (w.running_seqs, w.used_blocks) == (0, 0)
    finally:
        rc = s.stop(signal.SIGTERM)
    assert rc == 0, s.tail()
    assert "server stopped" in s.tail()


async def _collect(call: grpc.aio.UnaryStreamCall) -> list[int]:
    return [t async for m in call for t in m.token_ids]


def test_bench_serve_smoke(server: ManagedServer, tmp_path: Path) -> None:
    plot = tmp_path / "bench.png"
    cmd = [sys.executable, "-m", "benchmarks.bench_serve", "--server", server.address, "--num-requests", "8"]
    cmd += ["--output-len", "fixed:4", "--prompt-len", "uniform:4:8", "--shared-prefix-len", "16"]
    cmd += ["--no-reference", "--json", "--plot", str(plot)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["requests"], doc["ok"], doc["errors"], doc["output_tokens"]) == (8, 8, {}, 32)
    assert set(doc["ttft_s"]) == {"mean", "p50", "p90", "p99"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _wait_idle(server.address).used_blocks == 0


def test_bench_serve_runs_both_front_doors_side_by_side(server: ManagedServer) -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench_serve", "--server", server.address, "--protocol", "both"]
    cmd += ["--http-server", str(server.http_url), "--num-requests", "6", "--output-len", "fixed:5"]
    cmd += ["--prompt-len", "fixed:7", "--warmup", "2", "--no-reference", "--json"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["protocol"] == "both" and doc["host"]
    for name, run in doc["by_protocol"].items():
        assert (run["requests"], run["ok"], run["errors"], run["output_tokens"]) == (6, 6, {}, 30), name
        assert run["prompt_tokens"] == 42
        # the server's own timings came back through both front doors
        assert 0 < run["router_overhead"]["per_request_s"]["p50"] < 1.0, name
        assert len(run["itl_s"]) == 4 and run["ttft_s"]["p50"] > 0
    assert _wait_idle(server.address).used_blocks == 0


def test_serve_rejects_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("router:\n  max_queue: 0\n")
    out = subprocess.run([*_serve_command(), "--config", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert "router.max_queue: Input should be greater than or equal to 1" in out.stderr
