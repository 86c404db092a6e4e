"""The embedded default's Ray cluster listens on loopback only.

``deploy.pools.init_ray(None)`` (what ``tandem serve`` runs with no Ray address) is called in a child
process whose environment does not carry the loopback setting the other tests give Ray, so the code's
own choice is what is measured: every TCP socket listening in that process and every process it
started (GCS, raylet, object manager, workers) must be bound to a loopback address."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHILD = r"""
import json, shutil
import psutil, ray
from deploy.pools import init_ray

temp_dir = init_ray(None)
ray.get(ray.remote(lambda: 1).remote())  # a worker process too, with its own listener
me = psutil.Process()
seen = []
for p in [me, *me.children(recursive=True)]:
    try:
        conns = p.net_connections(kind="tcp")
    except psutil.Error:
        continue
    for c in conns:
        if c.status == psutil.CONN_LISTEN:
            seen.append([p.name(), c.laddr.ip, c.laddr.port])
ray.shutdown()
shutil.rmtree(temp_dir, ignore_errors=True)
print(json.dumps({"listeners": seen}))
"""


def test_the_embedded_ray_cluster_binds_to_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ENABLE_WINDOWS_OR_OSX")}
    env["RAY_AUTH_MODE"] = "disabled"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    listeners = json.loads(out.stdout.strip().splitlines()[-1])["listeners"]
    names = {n for n, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the cluster's own servers were seen

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        mapped = getattr(addr, "ipv4_mapped", None)
        return (mapped or addr).is_loopback

    open_ = [x for x in listeners if not loopback(x[1])]
    assert not open_, f"listening beyond loopback: {open_}"
