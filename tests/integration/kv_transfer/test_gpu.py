"""CUDA paths: pools on the device, device-side digests. Skipped cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

from engine.kv_layout import KVLayout
from kv_transfer.factory import make_transport
from kv_transfer.pool import PoolView, tensor_digest
from kv_transfer.transport import Completed

pytestmark = [pytest.mark.integration, pytest.mark.gpu]

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")


def _device_pool(n: int) -> torch.Tensor:
    kv = LAYOUT.allocate(n, device="cuda")
    kv.view(torch.uint8).copy_(
        torch.randint(0, 256, kv.view(torch.uint8).shape, dtype=torch.uint8, device="cuda")
    )
    return kv


def test_device_digest_matches_packed_buffer_and_sees_a_flip() -> None:
    pool = PoolView(_device_pool(8))
    regions = pool.regions(range(2), [5, 6, 1])
    packed = torch.empty(sum(n for _, n in regions), dtype=torch.uint8, device="cuda")
    pool.pack(regions, packed)
    assert pool.digest(regions) == tensor_digest(packed)
    packed[100] ^= 1
    assert pool.digest(regions) != tensor_digest(packed)


def test_inprocess_transfer_between_device_pools() -> None:
    src, dst = _device_pool(8), LAYOUT.allocate(8, device="cuda")
    t = make_transport("inprocess")
    with t.receiver(dst) as rx, t.sender(src) as tx:
        dest = rx.reserve("g", [4, 5, 0], LAYOUT.num_layers, deadline_s=10.0)
        for layer in range(LAYOUT.num_layers):
            tx.send_layer(dest, layer, [1, 2, 3])
        assert tx.finish(dest, timeout_s=10.0) == 2
        assert rx.poll() == [Completed("g", 2 * 3 * LAYOUT.layer_block_bytes)]
        assert torch.equal(dst[:, [4, 5, 0]].view(torch.int16), src[:, [1, 2, 3]].view(torch.int16))
