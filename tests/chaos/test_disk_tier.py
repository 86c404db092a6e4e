"""Chaos 4: a process SIGKILLed during G3 (disk tier) writes, at random points, several times over
the same directory; then torn block files as a power loss could leave them (one truncated, one with
a flipped payload byte). Reopened, the tier drops the half-written and torn files (at start-up by
size, on read by checksum), serves only blocks whose bytes are exactly what was written, and stays
usable: new blocks are written and read back."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from memory_tiers.device_pool import TorchDevicePool
from memory_tiers.tier_store import TierConfig, TierStore
from tests.chaos import harness
from tests.chaos.harness import Figures
from tests.integration.memory_tiers.test_crash_restart import CAPACITY, LAYOUT, expected, kill_mid_write

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300)]

KILLS = 4


def _open(d: Path, kv: torch.Tensor) -> TierStore:
    return TierStore(
        LAYOUT, TorchDevicePool(kv, LAYOUT), TierConfig(host_blocks=2, disk_dir=str(d), disk_bytes=CAPACITY)
    )


def test_killed_writers_and_torn_files_are_never_served(tmp_path: Path) -> None:
    fig = Figures("g3-torn-write", f"SIGKILL of a G3 writer {KILLS} times at random points; 2 torn files")
    t0 = time.monotonic()
    rng = random.Random(1717)
    d = tmp_path / "g3"
    d.mkdir()
    mid_write = sum(kill_mid_write(d, rng.randrange(1, 30)) for _ in range(KILLS))
    assert mid_write == KILLS, "a kill missed its write in flight"
    kv = LAYOUT.allocate(2)
    files = sorted(p for p in d.iterdir() if p.name.endswith(".kvb"))
    assert len(files) >= 3
    truncated, flipped = files[0], files[1]
    with open(truncated, "r+b") as f:  # torn: the tail of the payload never reached the disk
        f.truncate(os.path.getsize(truncated) - 4096)
    with open(flipped, "r+b") as f:  # torn: one payload byte wrong (the header is intact)
        f.seek(os.path.getsize(flipped) - 100)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    tmp_before = sum(1 for n in os.listdir(d) if n.endswith(".tmp"))  # the killed writers' leftovers
    store = _open(d, kv)
    served = refused = 0
    try:
        store.check()
        tmp_after = sum(1 for n in os.listdir(d) if n.endswith(".tmp"))
        assert tmp_after == 0  # half-written files are gone
        assert store.disk is not None
        held = store.disk.hashes()
        assert truncated.name not in os.listdir(d)  # dropped at start-up: wrong size
        for h in held:
            kv[:, 1] = -1
            if store.onboard(h, 1).result(timeout=60):
                served += 1
                assert torch.equal(kv[:, 1], expected(int.from_bytes(h, "big"))), "wrong bytes served"
            else:
                refused += 1
        assert refused == 1 and flipped.name not in os.listdir(d)  # caught on read by its checksum
        # still usable: a new block goes out to G3 through a 2-slot G2, and comes back exact
        new = [10_000 + i for i in range(4)]
        for i in new:
            kv[:, 0] = expected(i)
            store.offload(i.to_bytes(16, "big"), 0)
        store.disk.flush()
        kv[:, 1] = -1
        assert store.onboard(new[0].to_bytes(16, "big"), 1).result(timeout=60) is True
        assert torch.equal(kv[:, 1], expected(new[0]))
        store.check()
        dropped = store.disk.stats.corrupt_dropped
        in_use = store.num_host_in_use  # G2 slots still held after every onboard
    finally:
        store.close()
    fig.requests = served + refused + 1
    fig.faults = mid_write + 2
    # a fault survived when its damage was removed, never served: the killed writers' half-written
    # files gone (each writer's start removes the one before's; the reopen the last's), the torn
    # files dropped (by size at start-up, by checksum on read)
    fig.survived = (mid_write if tmp_after == 0 else 0) + dropped
    fig.outcome = {
        "blocks served exact": served + 1,
        "torn files dropped": dropped,
        "tmp files removed": tmp_before,
    }
    fig.blocks_leaked = in_use
    fig.wall_s = time.monotonic() - t0
    harness.record(fig)
    assert dropped == 2 and in_use == 0
