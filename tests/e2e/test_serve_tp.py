"""``tandem serve`` with tensor-parallel pools, end to end over gRPC: a child server per pairing of
prefill TP and decode TP (2 -> 1, 1 -> 2, 2 -> 2; each TP = 2 worker two processes in a placement
group, gloo between them, KV over NIXL from every prefill rank straight to the decode rank owning
its heads). Disaggregated and colocated output equals the one-process engine (TP = 1, colocated)
token for token, the KV bytes moved are the prompt's blocks once, and a cancelled stream leaves
every worker idle with no block in use."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request
from tests.e2e.test_grpc_serve import ManagedServer, _server_info

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time there was a long prompt that spans blocks"]
MAX_NEW = 10
BLOCK_BYTES = 8192  # the tiny model: 2 layers x K,V x 2 KV heads x 16 tokens x 32 dims x fp32
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "UCX_NET_DEVICES": "lo"}
SPLITS = [(2, 1), (1, 2), (2, 2)]  # (prefill TP, decode TP)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, list[int]]:
    """Greedy ids of the in-process engine (one rank, colocated), each prompt alone."""
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=checkpoint))
    try:
        return {
            p: engine.generate([p], SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))[0].new_token_ids
            for p in PROMPTS
        }
    finally:
        engine.close()


@pytest.fixture(scope="module", params=SPLITS, ids=[f"tp{p}-to-tp{d}" for p, d in SPLITS])
def served(
    request: pytest.FixtureRequest, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ManagedServer, tuple[int, int]]]:
    p, d = request.param
    tmp = tmp_path_factory.mktemp(f"serve-tp{p}{d}")
    yaml = tmp / "tandem.yaml"
    yaml.write_text(
        "pools:\n"
        f"  prefill: {{replicas: 1, tensor_parallel_size: {p}, num_cpus: 0.25}}\n"
        f"  decode: {{replicas: 1, tensor_parallel_size: {d}, num_cpus: 0.25}}\n"
    )
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)  # the child inherits them (ManagedServer copies os.environ)
    try:
        s = ManagedServer(
            tmp / "serve.log", "--config", str(yaml), "--model", str(checkpoint), "--grace", "1"
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield s, (p, d)
    finally:
        s.stop()


def _idle(address: str) -> list[tuple[str, int, int, int]]:
    """(worker, running, waiting, used blocks) once every worker is idle (liveness bound only)."""
    deadline = time.monotonic() + 30
    while True:
        ws = [
            (w.worker_id, w.running_seqs, w.waiting_seqs, w.used_blocks)
            for w in _server_info(address).workers
        ]
        if all(w[1:] == (0, 0, 0) for w in ws) or time.monotonic() > deadline:
            return ws
        time.sleep(0.05)


async def _generate(address: str, mode: str, prompts: list[str]) -> list[list[Any]]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.TandemStub(ch)

        async def one(p: str) -> list[Any]:
            call = stub.Generate(build_request(p, max_tokens=MAX_NEW, ignore_eos=True, disaggregation=mode))
            return [m async for m in call]

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def test_tp_pools_through_tandem_serve_equal_the_one_process_engine(
    served: tuple[ManagedServer, tuple[int, int]], checkpoint: Path, reference: dict
) -> None:
    from engine.tokenizer import Tokenizer

    server, split = served
    tok = Tokenizer.from_pretrained(checkpoint)
    # disaggregated first (nothing cached anywhere yet: every block moves, TP P -> TP D), then
    # colocated on the TP D decode worker, then all prompts at once (batched on every rank)
    for mode in ("always", "never"):
        for prompt, msgs in zip(PROMPTS, asyncio.run(_generate(server.address, mode, PROMPTS)), strict=True):
            assert [t for m in msgs for t in m.token_ids] == reference[prompt], (split, mode, prompt)
            t, u = msgs[-1].timings, msgs[-1].usage
            assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert u.prompt_tokens == len(tok.encode(prompt)) and u.completion_tokens == MAX_NEW
            assert t.decode_worker == "decode-0"
            if mode == "always":
                assert (t.prefill_worker, t.disaggregated) == ("prefill-0", True)
                assert t.kv_bytes_moved == -(-u.prompt_tokens // 16) * BLOCK_BYTES  # all heads, once
            else:
                assert (t.prefill_worker, t.disaggregated, t.kv_bytes_moved) == ("decode-0", False, 0)
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    for prompt, msgs in zip(jobs, asyncio.run(_generate(server.address, "always", jobs)), strict=True):
        assert [t for m in msgs for t in m.token_ids] == reference[prompt], (split, prompt)
    assert _idle(server.address) == [("prefill-0", 0, 0, 0), ("decode-0", 0, 0, 0)]


def test_a_cancelled_stream_frees_its_blocks(served: tuple[ManagedServer, tuple[int, int]]) -> None:
    server, _ = served

    async def main() -> int:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.TandemStub(ch)
            call = stub.Generate(
                build_request("cancel me " * 20, max_tokens=1500, ignore_eos=True, disaggregation="always")
            )
            for _ in range(3):
                await call.read()
            used = 0
            for _ in range(200):  # the router's load view refreshes every 0.1 s
                info = await stub.GetServerInfo(pb.GetServerInfoRequest())
                used = {w.worker_id: w.used_blocks for w in info.workers}["decode-0"]
                if used:
                    break
                await asyncio.sleep(0.05)
            call.cancel()
            return used

    assert asyncio.run(main()) > 0  # the stream held blocks on decode-0 while it ran...
    assert _idle(server.address) == [("prefill-0", 0, 0, 0), ("decode-0", 0, 0, 0)]  # ...no more


def test_a_split_that_does_not_fit_the_model_is_refused_before_anything_starts(
    checkpoint: Path, tmp_path: Path
) -> None:
    import subprocess

    from tests.e2e.test_grpc_serve import REPO, _serve_command

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("pools:\n  prefill: {tensor_parallel_size: 3}\n")
    out = subprocess.run(
        [*_serve_command(), "--config", str(cfg), "--model", str(checkpoint)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "tandem serve: pools.prefill.tensor_parallel_size: tensor_parallel_size 3 does not divide the "
        f"model's 4 attention heads ({checkpoint})"
    )
