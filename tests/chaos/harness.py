"""What the chaos cases share: a router (a real TandemServer: gRPC and, when asked, the OpenAI HTTP
front door) in this process over Ray prefill/decode workers that outlive it (so a case can take the
actors' pids and SIGKILL them), streams with a deadline each, the "nothing leaked" check, the greedy
check against the in-process engine, a restartable redis-server, and the figures each case records
(printed at the end of the session; written as JSON to $TANDEM_CHAOS_FIGURES when set).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import build_request

BLOCK = 16
MAX_NEW = 10
# Prompts of 1 to 4 blocks (the tiny checkpoint's tokenizer), so transfers move several blocks.
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time there was a long prompt that spans blocks, " * 2,
    "gRPC streams tokens while chaos happens around them, and every block comes back " * 2,
]
CALL_DEADLINE_S = 120.0  # every call of a case ends within this (a hang fails the case)


# -- figures ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Figures:
    case: str
    injected: str
    requests: int = 0  # requests sent in the case
    streams_held: int = 0  # streams in flight at once at the peak
    faults: int = 0  # faults injected
    survived: int = 0  # faults after which the server went on serving correct tokens
    outcome: dict[str, int] = field(default_factory=dict)  # how the requests ended, by kind
    blocks_leaked: int = -1  # in-use + reserved blocks left on every worker afterwards
    wall_s: float = 0.0


RECORDED: list[Figures] = []


def record(fig: Figures) -> None:
    RECORDED.append(fig)
    print(
        f"\nCHAOS {fig.case}: injected={fig.injected!r} requests={fig.requests} held={fig.streams_held} "
        f"faults={fig.faults} survived={fig.survived} outcome={fig.outcome} "
        f"blocks_leaked={fig.blocks_leaked} wall={fig.wall_s:.1f}s"
    )


def counted(fig: Figures, s: Served) -> None:
    """The case's requests and the most streams held at once, as the server counted them (its
    admission: every request that reached it, admitted or shed; in flight + queued at the peak)."""
    adm = s.server.admission
    fig.requests = adm.num_admitted + adm.num_shed
    fig.streams_held = adm.peak


async def recovered(fig: Figures, s: Served) -> list[tuple[str, int, int]]:
    """After a fault: the router idle and every worker back to no block in use or reserved (a
    killed one restarted); the fault counts as survived only then."""
    blocks = await worker_blocks(s)
    assert leaked(blocks) == 0, blocks
    fig.survived += 1
    return blocks


def finish(fig: Figures, blocks: Any, t0: float) -> None:
    """A case's end: the blocks left on the workers counted, its wall time taken, its figures
    recorded; then no block may have leaked."""
    fig.blocks_leaked = leaked(blocks)
    fig.wall_s = time.monotonic() - t0
    record(fig)
    assert fig.blocks_leaked == 0, blocks


def write_figures() -> None:
    path = os.environ.get("TANDEM_CHAOS_FIGURES")
    if path and RECORDED:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps([asdict(f) for f in RECORDED], indent=2) + "\n")


# -- a router over the workers ------------------------------------------------------------------------
@dataclass(slots=True)
class Served:
    stub: pb_grpc.TandemStub
    backend: Any  # PoolsBackend
    server: Any  # TandemServer
    http_url: str | None


@contextlib.asynccontextmanager
async def served(
    workers: tuple[list, list],
    checkpoint: Path,
    store: Any = None,
    *,
    max_concurrency: int = 64,
    max_queue: int = 256,
    http: bool = False,
) -> AsyncIterator[Served]:
    """A TandemServer (gRPC on a free port, HTTP too when ``http``) over the running workers, with
    fresh routing state; stopped at the end (the workers live on)."""
    from memory_tiers.metadata import InProcessMetadataStore
    from router.coordinator import Pools
    from router.http.options import HttpOptions
    from router.pools_backend import PoolsBackend
    from router.server import TandemServer
    from router.telemetry import setup_telemetry
    from router.topology import Placement, Topology

    prefill, decode = workers
    telemetry = setup_telemetry("none")
    topo = Topology.build({h.worker_id: Placement("node-a") for h in prefill + decode})
    backend = PoolsBackend.over_pools(
        Pools(prefill, decode, disaggregation="auto"),
        checkpoint,
        store if store is not None else InProcessMetadataStore(),
        topology=topo,
        load_interval_s=0.05,
    )
    await backend.start()
    server = TandemServer(
        backend,
        port=0,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        telemetry=telemetry,
        default_disaggregation="auto",
        routing_policy="cost_model",
        http=HttpOptions(port=0) if http else None,
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            server.address, options=[("grpc.max_concurrent_streams", 1024)]
        ) as ch:
            yield Served(pb_grpc.TandemStub(ch), backend, server, server.http_url)
    finally:
        await server.stop(1.0)


@dataclass(slots=True)
class Outcome:
    ids: list[int]
    code: grpc.StatusCode  # OK when the stream ended normally
    details: str = ""
    last: Any = None
    elapsed_s: float = 0.0


async def stream(
    stub: pb_grpc.TandemStub,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = MAX_NEW,
    deadline_s: float = CALL_DEADLINE_S,
    **kw: Any,
) -> Outcome:
    """One Generate call to its end, with a gRPC deadline; its tokens and how it ended."""
    t0 = time.monotonic()
    ids: list[int] = []
    last = None
    try:
        async for m in stub.Generate(
            build_request(prompt, max_tokens=max_tokens, ignore_eos=True, **kw), timeout=deadline_s
        ):
            ids += m.token_ids
            last = m
    except grpc.aio.AioRpcError as e:
        return Outcome(ids, e.code(), e.details() or "", last, time.monotonic() - t0)
    return Outcome(ids, grpc.StatusCode.OK, "", last, time.monotonic() - t0)


def tally(outcomes: Sequence[Outcome]) -> dict[str, int]:
    out: dict[str, int] = {}
    for o in outcomes:
        out[o.code.name] = out.get(o.code.name, 0) + 1
    return out


async def wait_for(pred: Any, what: str, timeout_s: float = 60.0, every_s: float = 0.02) -> Any:
    """Poll ``pred`` (sync or async) until truthy; fail naming ``what`` past the (hang-only) deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(every_s)


async def worker_blocks(s: Served, timeout_s: float = 90.0) -> list[tuple[str, int, int]]:
    """(worker, in-use blocks, reserved blocks) of every worker once all are back to zero and the
    router has nothing in flight — or, past the (hang-only) deadline, as they are then (the caller
    asserts they are zero). Waits for killed workers to come back (a dead one reports nothing)."""
    pools = s.backend.pools
    ids = [h.worker_id for h in [*pools.prefill, *pools.decode]]
    deadline = time.monotonic() + timeout_s
    while True:
        loads = {w.worker_id: w for w in await pools.load()}
        got = [
            (i, loads[i].used_blocks, loads[i].reserved_blocks) if i in loads else (i, -1, -1) for i in ids
        ]
        idle = s.server.admission.in_flight == 0 and s.server.admission.queued == 0
        if (idle and all(g[1:] == (0, 0) for g in got)) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


def leaked(blocks: Sequence[tuple[str, int, int]]) -> int:
    return sum(max(u, 0) + max(r, 0) for _, u, r in blocks) + sum(1 for _, u, _ in blocks if u < 0)


async def assert_still_serving(s: Served, reference: dict[str, list[int]]) -> None:
    """The server answers a correct greedy request on each path afterwards (tokens equal the
    in-process engine's), disaggregated and colocated."""
    for mode in ("always", "never"):
        for prompt in PROMPTS[:2]:
            o = await stream(s.stub, prompt, disaggregation=mode)
            assert o.code == grpc.StatusCode.OK, (mode, prompt, o.code, o.details)
            assert o.ids == reference[prompt], (mode, prompt)


async def pids(handles: Sequence[Any]) -> list[int]:
    return [await h.actor.pid.remote() for h in handles]


async def server_info(s: Served) -> pb.GetServerInfoResponse:
    return await s.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)


# -- a redis-server that can be killed and started again on the same port -------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """``redis-server`` (no persistence) on a fixed free port, in its own process group."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed")
        self.exe = exe
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="tandem-chaos-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        import redis

        log = open(os.path.join(self.workdir, f"redis-{self.starts}.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.workdir],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self.starts += 1
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
