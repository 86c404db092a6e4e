"""`tandem kv-bench --json` runs for both backends over shared memory and TCP (figures are not
asserted: they belong to docs/benchmarks-kv-transfer.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

KEYS = {"backend", "transport", "mode", "bytes_per_request", "gbps", "ceiling_gbps", "p50_ms", "p99_ms"}


def test_kv_bench_json_both_backends_shm_and_tcp(tmp_path: Path) -> None:
    cal = tmp_path / "calibration.json"
    cmd = [sys.executable, "-m", "deploy.cli", "kv-bench", "--model", "tiny", "--tokens", "64"]
    cmd += ["--iters", "2", "--warmup", "1", "--json", "--calibration", str(cal)]
    env = {**os.environ, "UCX_NET_DEVICES": "lo"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert sorted((r["backend"], r["transport"], r["mode"]) for r in rows) == [
        (b, t, m) for b in ("nixl", "ucxx") for t in ("shm", "tcp") for m in ("layer", "whole")
    ]
    for r in rows:
        assert r.keys() >= KEYS
        assert (
            r["bytes_per_request"] == 2 * 4 * 2 * 2 * 16 * 64 * 2
        )  # layers * blocks * (K,V) * H * B * D * 2 B
        assert r["messages_per_request"] == (2 if r["mode"] == "layer" else 1)
    assert sorted(json.loads(cal.read_text())["transports"]) == ["shm", "tcp"]


def test_kv_bench_moves_mla_latent_blocks() -> None:
    """DeepSeek-V3-16B-sized latent blocks: 27 layers x one plane of 512 + 64 values."""
    cmd = [sys.executable, "-m", "deploy.cli", "kv-bench", "--model", "deepseek-v3-16b"]
    cmd += ["--tokens", "64", "--backends", "nixl", "--transports", "shm", "--modes", "layer"]
    cmd += ["--iters", "2", "--warmup", "1", "--json"]
    env = {**os.environ, "UCX_NET_DEVICES": "lo"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    assert row["model"] == "deepseek-v3-16b" and row["gbps"] > 0
    assert row["bytes_per_request"] == 27 * 4 * 1 * 576 * 16 * 2  # layers * blocks * the latent, bf16
    assert row["messages_per_request"] == 27  # one per layer
