"""``tandem launch`` / ``status`` / ``stop`` against a three-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` starts a head and two worker nodes (raylets) with different custom
resources: ``prefill_node`` and ``decode_node``. This test process never joins that cluster (the
session's own Ray cluster may be running in it): it drives everything through the ``tandem``
command line in child processes, as a user would, and reads placements from ``tandem status --json``.
The launch happens in a child that exits before anything is generated: the system must outlive it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = ["Hello world", "Once upon a time there was a long prompt that spans blocks"]
MAX_NEW = 8
LONG = 1500  # tokens of a stream meant to be in flight when its node dies or the system stops
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "UCX_NET_DEVICES": "lo"}
NAMESPACE = "tandem-launch-test"
KILL_NAMESPACE = "tandem-node-kill-test"
# Node death is noticed by the GCS's health checks: fast ones, so a lost node is declared dead (and its
# actors restarted elsewhere) within seconds rather than the default ~30 s.
SYSTEM_CONFIG = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
    "health_check_timeout_ms": 1000,
}


@dataclass(slots=True)
class LocalCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    address: str  # the GCS address `tandem ... --address` takes
    nodes: dict[str, str]  # "head" | "prefill" | "decode" -> node id
    decode_node: Any  # its ray._private.node.Node, for the node-kill test
    temp_dir: str


def _yaml(checkpoint: Path, tiers: Path, namespace: str = NAMESPACE) -> str:
    return f"""
version: 1
model: {checkpoint}
engine: {{block_size: 16, max_num_seqs: 8, max_num_batched_tokens: 256}}
pools:
  prefill: {{replicas: 1, num_cpus: 0.5, resources: {{prefill_node: 1}}}}
  decode: {{replicas: 1, num_cpus: 0.5, resources: {{decode_node: 1}}}}
tiers: {{dir: {tiers}, g1: {{capacity: 1MiB}}, g2: {{capacity: 1MiB}}, g3: null}}
router: {{host: 127.0.0.1, port: 0, policy: cost_model, disaggregation: auto, http: {{port: 0}}}}
ray: {{namespace: {namespace}}}
"""


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, list[int]]:
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=checkpoint))
    try:
        params = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
        return {p: engine.generate([p], params)[0].new_token_ids for p in PROMPTS}
    finally:
        engine.close()


def _tandem(address: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV}
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args, "--address", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _status(address: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    out = _tandem(address, "status", "--namespace", namespace, "--json", timeout=120)
    assert out.returncode in (0, 3), out.stderr[-3000:]
    return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A head and two worker nodes; torn down with every process in it."""
    temp_dir = tempfile.mkdtemp(prefix="ray-l-")  # short: Unix socket paths live under it
    # Cluster records its address in <RAY_TMPDIR>/ray/ray_current_cluster, which it neither creates
    # nor may share with another Ray on the machine: point that at this cluster's own directory.
    env = ENV | {"RAY_TMPDIR": temp_dir}
    os.makedirs(os.path.join(temp_dir, "ray"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylets, and so the workers, inherit them
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir, "_system_config": SYSTEM_CONFIG}
    c = Cluster(initialize_head=True, connect=False, head_node_args=head)
    try:
        prefill = c.add_node(num_cpus=1, resources={"prefill_node": 1}, temp_dir=temp_dir)
        decode = c.add_node(num_cpus=1, resources={"decode_node": 1}, temp_dir=temp_dir)
        c.wait_for_nodes()
        nodes = {"head": c.head_node.node_id, "prefill": prefill.node_id, "decode": decode.node_id}
        yield LocalCluster(c, c.address, nodes, decode, temp_dir)
    finally:
        try:
            for ns in (NAMESPACE, KILL_NAMESPACE):
                _tandem(c.address, "stop", "--namespace", ns, "--grace", "1", timeout=120)
        finally:
            c.shutdown()  # kills the raylets, GCS and every actor process; resets the address file
            shutil.rmtree(temp_dir, ignore_errors=True)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _generate(address: str, prompt: str, mode: str) -> tuple[list[int], str, str]:
    from router.client import stream_generate

    msgs = list(
        stream_generate(
            address, prompt, max_tokens=MAX_NEW, ignore_eos=True, disaggregation=mode, timeout=120
        )
    )
    t = msgs[-1].timings
    return [i for m in msgs for i in m.token_ids], t.prefill_worker, t.decode_worker


def _long_stream(router: str) -> tuple[threading.Thread, list[int], list[Any]]:
    """A LONG-token stream read on a thread: (the thread, tokens so far, ["complete"] or [status code]),
    returned once its first tokens arrived."""
    from router.client import stream_generate

    got: list[int] = []
    ended: list[Any] = []

    def read() -> None:
        try:
            for m in stream_generate(router, "Hello world", max_tokens=LONG, ignore_eos=True, timeout=180):
                got.extend(m.token_ids)
            ended.append("complete")
        except grpc.RpcError as e:
            ended.append(e.code())

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 120  # liveness bound only
    while len(got) < 4 and reader.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return reader, got, ended


def _completion(prompt: str) -> bytes:
    body = {"prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    return json.dumps(body).encode()


def _text(checkpoint: Path, ids: list[int]) -> str:
    from engine.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(checkpoint).decode(ids)


def _lines(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def test_launch_places_pools_serves_is_idempotent_and_stops(
    cluster: LocalCluster, checkpoint: Path, reference: dict[str, list[int]], tmp_path: Path
) -> None:
    address, nodes = cluster.address, cluster.nodes
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(_yaml(checkpoint, tmp_path / "tiers"))

    first = _tandem(address, "launch", str(cfg))
    assert first.returncode == 0, first.stderr[-3000:]
    out = _lines(first.stdout)
    assert (out["created"], out["kept"], out["removed"]) == ("prefill-0 decode-0 router", "-", "-")
    router = out["router"]

    st = _status(address)  # the launching process has exited: detached actors keep serving
    placed = [(w["name"], w["state"], w["node_id"]) for w in st["workers"]]
    assert placed == [("prefill-0", "alive", nodes["prefill"]), ("decode-0", "alive", nodes["decode"])]
    # G1 1 MiB and G2 1 MiB of 8 KiB blocks, no G3; nothing in use between requests
    tiers = [(w["used_blocks"], w["total_blocks"], w["g2_blocks"], w["g3_bytes"]) for w in st["workers"]]
    assert tiers == [(0, 128, 128, 0), (0, 128, 128, 0)]
    assert (st["router"]["address"], st["router"]["node_id"], st["router"]["serving"]) == (
        router,
        nodes["head"],
        True,
    )

    for prompt in PROMPTS:
        assert _generate(router, prompt, "always") == (reference[prompt], "prefill-0", "decode-0")
        assert _generate(router, prompt, "never") == (reference[prompt], "decode-0", "decode-0")
    # the launched router serves the OpenAI API beside gRPC, on the port its YAML gives (0: any)
    http = out["http"]
    assert http.startswith("http://127.0.0.1:") and st["router"]["http_url"] == http
    req = urllib.request.Request(
        http + "/v1/completions", _completion(PROMPTS[0]), headers={"Content-Type": "application/json"}
    )
    body = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert body["choices"][0]["text"] == _text(checkpoint, reference[PROMPTS[0]])
    assert body["usage"]["completion_tokens"] == MAX_NEW

    second = _tandem(address, "launch", str(cfg))  # the same file again: nothing new, nothing lost
    assert second.returncode == 0, second.stderr[-3000:]
    out = _lines(second.stdout)
    assert (out["created"], out["kept"], out["removed"], out["router"]) == (
        "-",
        "prefill-0 decode-0 router",
        "-",
        router,
    )
    assert [(w["name"], w["node_id"]) for w in _status(address)["workers"]] == [
        ("prefill-0", nodes["prefill"]),
        ("decode-0", nodes["decode"]),
    ]
    assert _generate(router, PROMPTS[0], "always")[0] == reference[PROMPTS[0]]

    # A changed router section: the router is replaced, the workers (same worker config) are kept.
    cfg.write_text(cfg.read_text().replace("policy: cost_model", "policy: least_loaded"))
    third = _tandem(address, "launch", str(cfg))
    assert third.returncode == 0, third.stderr[-3000:]
    out = _lines(third.stdout)
    assert (out["created"], out["kept"], out["removed"]) == ("router", "prefill-0 decode-0", "-")
    router = out["router"]
    st = _status(address)
    assert (st["router"]["policy"], st["router"]["address"]) == ("least_loaded", router)
    assert _generate(router, PROMPTS[1], "never") == (reference[PROMPTS[1]], "decode-0", "decode-0")

    # Stop with a long stream in flight: it gets the grace period, then ends with an error status.
    reader, got, ended = _long_stream(router)
    stopped = _tandem(address, "stop", "--namespace", NAMESPACE, "--grace", "1", timeout=120)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert stopped.stdout.strip() == "stopped: router decode-0 prefill-0"
    reader.join(120)
    assert not reader.is_alive()
    assert (ended == ["complete"] and len(got) == LONG) or ended in (
        [grpc.StatusCode.CANCELLED],
        [grpc.StatusCode.UNAVAILABLE],
    ), (ended, len(got))
    assert _status(address) == {"namespace": NAMESPACE, "router": {}, "workers": []}  # nothing left behind


def test_killing_the_decode_node_mid_stream_ends_it_clearly_and_the_worker_comes_back(
    cluster: LocalCluster, checkpoint: Path, reference: dict[str, list[int]], tmp_path: Path
) -> None:
    address = cluster.address
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(_yaml(checkpoint, tmp_path / "tiers", KILL_NAMESPACE))
    launched = _tandem(address, "launch", str(cfg))
    assert launched.returncode == 0, launched.stderr[-3000:]
    router = _lines(launched.stdout)["router"]

    reader, got, ended = _long_stream(router)  # a long decode on decode-0 while its node goes down
    cluster.cluster.remove_node(cluster.decode_node, allow_graceful=False)  # SIGKILL its raylet and workers
    reader.join(180)
    assert not reader.is_alive()
    # Either it finished before the kill took effect, or it ends with UNAVAILABLE: never a silent cut.
    assert ended == ["complete"] and len(got) == LONG or ended == [grpc.StatusCode.UNAVAILABLE], (
        ended,
        len(got),
    )

    # A new node with the decode resource: Ray restarts the detached decode-0 there, the router's handle
    # (same actor) reaches it again, and generation is exact once more.
    new = cluster.cluster.add_node(num_cpus=1, resources={"decode_node": 1}, temp_dir=cluster.temp_dir)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        workers = {w["name"]: (w["state"], w["node_id"]) for w in _status(address, KILL_NAMESPACE)["workers"]}
        if workers.get("decode-0") == ("alive", new.node_id):
            break
        time.sleep(1)
    assert workers == {"prefill-0": ("alive", cluster.nodes["prefill"]), "decode-0": ("alive", new.node_id)}
    deadline = time.monotonic() + 60  # the router refreshes its load view every 0.1 s
    while True:
        try:
            result = _generate(router, PROMPTS[1], "always")
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert result == (reference[PROMPTS[1]], "prefill-0", "decode-0")

    stopped = _tandem(address, "stop", "--namespace", KILL_NAMESPACE, "--grace", "1", timeout=120)
    assert stopped.stdout.strip() == "stopped: router decode-0 prefill-0"
    assert _status(address, KILL_NAMESPACE) == {"namespace": KILL_NAMESPACE, "router": {}, "workers": []}
