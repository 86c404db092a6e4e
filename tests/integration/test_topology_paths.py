"""``tandem serve`` and ``tandem launch`` build the same routing topology from the same labelled cluster.

A head and two worker nodes (``ray.cluster_utils.Cluster``), each worker node labelled with its
name (``tandem/node=node-a`` / ``node-b``); the YAML pins the prefill pool to node-a, the decode pool
to node-b, and puts both nodes in one rack. A child process joins that cluster (this test process
never does: the session's own Ray cluster may run in it) and builds the router twice:

- as ``tandem serve --ray-address`` does (deploy/serve.py's ``build_pools_backend``), reading the
  topology its PoolsBackend prices handoffs with;
- as ``tandem launch`` does (deploy/cluster.py's ``launch``), asking the launched router actor.

Both must place each worker on its labelled node, find the rack, and so price the prefill -> decode
handoff over InfiniBand; keyed by IP instead (serve's old rule), every worker of this one-machine
cluster would share one node and the link would read as shared memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "UCX_NET_DEVICES": "lo"}
NAMESPACE = "tandem-topology-test"

DRIVER = """
import json, sys

import ray

from deploy import cluster
from deploy.config import load_config
from deploy.pools import describe
from deploy.serve import build_pools_backend

cfg, address = load_config(sys.argv[1]), sys.argv[2]
ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=False)
backend = build_pools_backend(cfg, address, None)  # what `tandem serve --ray-address` runs
try:
    served = describe(backend.router.topology)
finally:
    backend.close()  # stops the served workers: the launched ones take their places
try:
    cluster.launch(cfg, address=address, timeout_s=240)
    router = ray.get_actor(cluster.ROUTER, namespace=cfg.ray.namespace)
    launched = ray.get(router.topology.remote(), timeout=60)
finally:
    cluster.stop(address=address, namespace=cfg.ray.namespace, grace=1)
print("TOPOLOGIES " + json.dumps({"serve": served, "launch": launched}))
"""


def _yaml(checkpoint: Path, tiers: Path) -> str:
    return f"""
version: 1
model: {checkpoint}
engine: {{block_size: 16, max_num_seqs: 4, max_num_batched_tokens: 128}}
pools:
  prefill: {{replicas: 1, num_cpus: 0.5, node_labels: {{tandem/node: node-a}}}}
  decode: {{replicas: 1, num_cpus: 0.5, node_labels: {{tandem/node: node-b}}}}
tiers: {{dir: {tiers}, g1: {{capacity: 1MiB}}, g2: {{capacity: 1MiB}}, g3: null}}
topology:
  nodes: {{node-a: {{rack: rack-1}}, node-b: {{rack: rack-1}}}}
router: {{host: 127.0.0.1, port: 0, http: {{port: 0}}}}
ray: {{namespace: {NAMESPACE}}}
"""


@pytest.fixture(scope="module")
def labelled_cluster() -> Iterator[str]:
    """A head and two labelled worker nodes; yields the GCS address. Torn down with every process."""
    temp_dir = tempfile.mkdtemp(prefix="ray-t-")  # short: Unix socket paths live under it
    # Cluster records its address in <RAY_TMPDIR>/ray/ray_current_cluster, which it neither creates
    # nor may share with another Ray on the machine: point that at this cluster's own directory.
    env = ENV | {"RAY_TMPDIR": temp_dir}
    os.makedirs(os.path.join(temp_dir, "ray"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the raylets, and so the workers, inherit them
    from ray.cluster_utils import Cluster

    head = {
        "num_cpus": 1,
        "include_dashboard": False,
        "temp_dir": temp_dir,
        "labels": {"tandem/node": "head"},
    }
    c = Cluster(initialize_head=True, connect=False, head_node_args=head)
    try:
        for name in ("node-a", "node-b"):
            c.add_node(num_cpus=1, labels={"tandem/node": name}, temp_dir=temp_dir)
        c.wait_for_nodes()
        yield c.address
    finally:
        c.shutdown()  # kills the raylets, GCS and every actor process
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_serve_and_launch_build_the_same_topology(
    labelled_cluster: str, checkpoint: Path, tmp_path: Path
) -> None:
    config = tmp_path / "tandem.yaml"
    config.write_text(_yaml(checkpoint, tmp_path / "tiers"))
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(config), labelled_cluster],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("TOPOLOGIES "))
    got: dict[str, Any] = json.loads(line.removeprefix("TOPOLOGIES "))
    expected = {
        "placements": {
            "decode-0": {"node": "node-b", "nvlink_domain": None, "rack": "rack-1", "process": None},
            "prefill-0": {"node": "node-a", "nvlink_domain": None, "rack": "rack-1", "process": None},
        },
        "links": {"decode-0->prefill-0": "ib", "prefill-0->decode-0": "ib"},
        "same_node_link": "shm",
    }
    assert got["serve"] == expected
    assert got["launch"] == expected
