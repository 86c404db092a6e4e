"""A process SIGKILLed in the middle of G3 writes: the restarted store has a consistent index and
serves only intact blocks. Also: a TierStore publishing its block events into a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.kv_layout import KVLayout
from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.disk_format import file_size
from memory_tiers.metadata import Tier
from memory_tiers.tier_store import TierConfig, TierStore

pytestmark = pytest.mark.integration

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=128, block_size=16)  # 128 KiB blocks
CAPACITY = 64 * file_size(LAYOUT.block_bytes)

# The child offloads block after block through a 2-slot G2, so every offload spills one to G3.
CHILD = """
import sys, torch
from engine.kv_layout import KVLayout
from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.tier_store import TierConfig, TierStore
layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=128, block_size=16)
kv = layout.allocate(1)
store = TierStore(layout, TorchDevicePool(kv, layout),
                  TierConfig(host_blocks=2, disk_dir=sys.argv[1], disk_bytes=int(sys.argv[2])))
i = 0
while True:
    kv[:, 0] = torch.arange(kv[:, 0].numel(), dtype=torch.float32).view(kv[:, 0].shape) + i
    store.offload(i.to_bytes(16, "big"), 0)
    i += 1
    if i == 3:
        print("writing", flush=True)
"""


def expected(i: int) -> torch.Tensor:
    shape = (LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, LAYOUT.block_size, LAYOUT.head_dim)
    return torch.arange(LAYOUT.block_bytes // 4, dtype=torch.float32).view(shape) + i


def kill_mid_write(d: Path, min_files: int) -> bool:
    """Run the child until it has min_files blocks on disk and a write in flight; SIGKILL it then.

    Returns whether a temporary (half-written) file existed at the moment of the kill.
    """
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(d), str(CAPACITY)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"writing\n", proc.stderr.read().decode() if proc.stderr else line
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = os.listdir(d)
            if sum(n.endswith(".kvb") for n in names) >= min_files and any(n.endswith(".tmp") for n in names):
                os.killpg(proc.pid, signal.SIGKILL)
                return True
        os.killpg(proc.pid, signal.SIGKILL)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("min_files", [1, 12, 40])
def test_sigkill_during_disk_writes_restarts_consistent(tmp_path: Path, min_files: int) -> None:
    d = tmp_path / "g3"
    d.mkdir()
    caught_mid_write = kill_mid_write(d, min_files)
    assert caught_mid_write, "the child never had a write in flight"
    kv = LAYOUT.allocate(2)
    store = TierStore(
        LAYOUT, TorchDevicePool(kv, LAYOUT), TierConfig(host_blocks=2, disk_dir=str(d), disk_bytes=CAPACITY)
    )
    try:
        store.check()
        assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
        assert store.disk is not None
        held = store.disk.hashes()
        assert len(held) >= min_files
        for h in held:
            i = int.from_bytes(h, "big")
            kv[:, 1] = -1
            assert store.onboard(h, 1).result(timeout=60) is True
            assert torch.equal(kv[:, 1], expected(i)), f"block {i} served with wrong bytes"
        assert store.metrics().onboard_failures == 0
        store.check()
    finally:
        store.close()


def test_tier_store_publishes_block_events_to_redis(tmp_path: Path, redis_url: str) -> None:
    from memory_tiers.redis_metadata import RedisMetadataStore

    meta = RedisMetadataStore(redis_url)
    kv = LAYOUT.allocate(4)
    cfg = TierConfig(host_blocks=2, disk_dir=str(tmp_path), disk_bytes=CAPACITY, spill_watermark=0.0)
    hs = [bytes([i + 1]) * 16 for i in range(3)]
    store = TierStore(LAYOUT, TorchDevicePool(kv, LAYOUT), cfg, worker_id="d0", publish=meta.publish)
    for i, h in enumerate(hs):
        store.offload(h, i)
    store.flush()
    assert meta.find_blocks(hs) == [{"d0": Tier.G3}, {"d0": Tier.G2}, {"d0": Tier.G2}]
    store.close()
    meta.drop_worker_blocks("d0")  # the worker restarts: its G2 is gone, its G3 comes back
    store = TierStore(LAYOUT, TorchDevicePool(kv, LAYOUT), cfg, worker_id="d0", publish=meta.publish)
    assert meta.find_blocks(hs) == [{"d0": Tier.G3}, {}, {}]
    store.close()
    meta.close()
