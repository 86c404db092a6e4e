"""The in-process transport (colocated pair) and the shared lifecycle rules, in one process."""

from __future__ import annotations

import time

import pytest
import torch

from engine.kv_layout import KVLayout
from kv_transfer.factory import make_transport
from kv_transfer.protocol import DeadlineExceededError, DigestMismatchError, KVTransferError, NoRoomError
from kv_transfer.transport import Completed, Failed, HeadSlice

pytestmark = pytest.mark.integration

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float16")


def _pools() -> tuple[torch.Tensor, torch.Tensor]:
    src = LAYOUT.allocate(16)
    src.view(torch.uint8).copy_(torch.randint(0, 256, src.view(torch.uint8).shape, dtype=torch.uint8))
    return src, LAYOUT.allocate(16)


def test_inprocess_copies_and_commits() -> None:
    t = make_transport("inprocess")
    src, dst = _pools()
    with t.receiver(dst) as rx, t.sender(src) as tx:
        dest = rx.reserve("a", [9, 10, 2], LAYOUT.num_layers, deadline_s=5.0)
        for layer in range(LAYOUT.num_layers):
            tx.send_layer(dest, layer, [0, 1], block_offset=0)
            tx.send_layer(dest, layer, [7], block_offset=2)
        assert tx.finish(dest, timeout_s=5.0) == 6
        assert rx.poll() == [Completed("a", 3 * 3 * LAYOUT.layer_block_bytes)]
        assert torch.equal(dst[:, [9, 10, 2]].view(torch.int16), src[:, [0, 1, 7]].view(torch.int16))
        assert torch.count_nonzero(dst[:, [0, 1, 3, 4, 5, 6, 7, 8, 11]]) == 0
        rx.release("a")
        assert rx.num_reserved_blocks == 0
        assert tx.num_in_flight == 0


def test_inprocess_flipped_byte_fails_handoff() -> None:
    t = make_transport("inprocess")
    src, dst = _pools()
    with t.receiver(dst) as rx, t.sender(src) as tx:
        dest = rx.reserve("a", [1, 2], LAYOUT.num_layers, deadline_s=5.0)
        tx.send_layer(dest, 0, [3, 4])
        tx.corrupt_after_digest = True  # layer 1 is damaged between the copy and the check
        tx.send_layer(dest, 1, [3, 4])
        tx.corrupt_after_digest = False
        tx.send_layer(dest, 2, [3, 4])
        with pytest.raises(DigestMismatchError, match="digest mismatch on layer 1 blocks 0..1"):
            tx.finish(dest, timeout_s=5.0)
        (failed,) = rx.poll()
        assert isinstance(failed, Failed) and failed.request_id == "a"
        assert rx.num_reserved_blocks == 0
        assert tx.num_in_flight == 0


def test_receiver_deadline_frees_blocks_and_keeps_serving() -> None:
    t = make_transport("inprocess")
    src, dst = _pools()
    with t.receiver(dst, capacity_blocks=4) as rx, t.sender(src) as tx:
        rx.reserve("stalled", [0, 1, 2], LAYOUT.num_layers, deadline_s=0.05)
        with pytest.raises(NoRoomError):
            rx.reserve("b", [5, 6], LAYOUT.num_layers, deadline_s=5.0)
        time.sleep(0.1)
        (failed,) = rx.poll()
        assert (
            failed.request_id == "stalled"
            and "deadline passed with 9 (layer, block) pieces missing" in failed.reason
        )
        assert rx.num_reserved_blocks == 0
        dest = rx.reserve("b", [5, 6], LAYOUT.num_layers, deadline_s=5.0)
        tx.send_layer(dest, 0, [1, 2], num_layers=LAYOUT.num_layers)
        assert tx.finish(dest, timeout_s=5.0) == 1
        assert rx.poll() == [Completed("b", 3 * 2 * LAYOUT.layer_block_bytes)]


def test_sender_deadline_when_receiver_never_commits() -> None:
    t = make_transport("inprocess")
    src, dst = _pools()
    with t.receiver(dst) as rx, t.sender(src) as tx:
        dest = rx.reserve("half", [0, 1], LAYOUT.num_layers, deadline_s=5.0)
        tx.send_layer(dest, 0, [0, 1])  # layers 1 and 2 never sent
        with pytest.raises(DeadlineExceededError, match="half: no commit from receiver"):
            tx.finish(dest, timeout_s=0.05)
        assert tx.num_in_flight == 0


def test_lifecycle_close_is_idempotent_and_final() -> None:
    t = make_transport("inprocess")
    src, dst = _pools()
    rx, tx = t.receiver(dst), t.sender(src)
    dest = rx.reserve("a", [0], LAYOUT.num_layers, deadline_s=5.0)
    rx.close()
    rx.close()
    assert rx.num_reserved_blocks == 0
    with pytest.raises(KVTransferError, match="is closed"):
        rx.poll()
    with pytest.raises(KVTransferError, match="cannot reach receiver"):
        tx.send_layer(dest, 0, [0])
    tx.close()
    tx.close()
    with pytest.raises(KVTransferError, match="is closed"):
        tx.send_layer(dest, 0, [0])


def test_send_layer_validates_shapes() -> None:
    t = make_transport("inprocess")
    src, dst = _pools()
    other = KVLayout(3, 2, 8, 4, "float32").allocate(4)
    with t.receiver(dst) as rx, t.sender(src) as tx, t.sender(other) as wrong:
        dest = rx.reserve("a", [0, 1], LAYOUT.num_layers, deadline_s=5.0)
        with pytest.raises(ValueError, match="destination holds float16"):
            wrong.send_layer(dest, 0, [0, 1])
        with pytest.raises(ValueError, match="blocks 1\\+2 outside the 2 reserved"):
            tx.send_layer(dest, 0, [0, 1], block_offset=1)
        with pytest.raises(ValueError, match="layers 2\\+2 outside 0..2"):
            tx.send_layer(dest, 2, [0, 1], num_layers=2)


def test_payload_without_digest_is_refused_unless_allowed() -> None:
    t = make_transport("inprocess")
    src, dst = _pools()
    with t.receiver(dst) as rx, t.sender(src) as tx:
        tx.digests = False  # the bench's --digests off
        dest = rx.reserve("a", [0], LAYOUT.num_layers, deadline_s=5.0)
        tx.send_layer(dest, 0, [3], num_layers=LAYOUT.num_layers)
        with pytest.raises(KVTransferError, match="a: payload without a digest refused"):
            tx.finish(dest, timeout_s=5.0)
        assert rx.num_reserved_blocks == 0
        rx.require_digest = False
        dest = rx.reserve("b", [0], LAYOUT.num_layers, deadline_s=5.0)
        tx.send_layer(dest, 0, [3], num_layers=LAYOUT.num_layers)
        assert tx.finish(dest, timeout_s=5.0) == 1
        assert torch.equal(dst[:, 0].view(torch.int16), src[:, 3].view(torch.int16))


def _half_pools() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two one-head senders (the ranks of a two-rank prefill worker) and a two-head receiver."""
    half = KVLayout(num_layers=3, num_kv_heads=1, head_dim=8, block_size=4, dtype="float16")
    a, b = half.allocate(8), half.allocate(8)
    for t in (a, b):
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8))
    return a, b, LAYOUT.allocate(16)


def test_two_senders_fill_the_head_halves_and_both_get_the_ack() -> None:
    t = make_transport("inprocess")
    a, b, dst = _half_pools()
    with t.receiver(dst) as rx, t.sender(a) as ta, t.sender(b) as tb:
        dest = rx.reserve("r", [5, 2], LAYOUT.num_layers, deadline_s=5.0, parts=((0, 1), (1, 1)))
        ta.send_layer(dest, 0, [1, 6], num_layers=3, heads=HeadSlice(0, 0, 1))
        assert rx.poll() == []  # head 1 of every block still missing
        tb.send_layer(dest, 0, [1, 6], num_layers=3, heads=HeadSlice(0, 1, 1))
        assert ta.finish(dest, timeout_s=5.0) == 1 and tb.finish(dest, timeout_s=5.0) == 1
        assert rx.poll() == [Completed("r", 3 * 2 * LAYOUT.layer_block_bytes)]
        bits = lambda t: t.contiguous().view(torch.int16)  # random bytes: NaNs compare by bits
        assert torch.equal(bits(dst[:, [5, 2], :, 0:1]), bits(a[:, [1, 6]]))
        assert torch.equal(bits(dst[:, [5, 2], :, 1:2]), bits(b[:, [1, 6]]))


def test_a_slice_that_is_not_a_reserved_part_fails_the_handoff_for_every_sender() -> None:
    """One rank's bad piece fails the request; the other rank, whose pieces arrive after the
    failure, is told at once (a FAILED ack) instead of waiting out its ack timeout."""
    t = make_transport("inprocess")
    a, b, dst = _half_pools()
    with t.receiver(dst) as rx, t.sender(a) as ta, t.sender(b) as tb:
        dest = rx.reserve("r", [5], LAYOUT.num_layers, deadline_s=5.0, parts=((0, 1), (1, 1)))
        ta.corrupt_after_digest = True
        ta.send_layer(dest, 0, [1], num_layers=3, heads=HeadSlice(0, 0, 1))
        (failed,) = rx.poll()
        assert isinstance(failed, Failed) and "digest mismatch" in failed.reason
        assert rx.num_reserved_blocks == 0
        tb.send_layer(dest, 0, [1], num_layers=3, heads=HeadSlice(0, 1, 1))
        start = time.monotonic()
        with pytest.raises(DigestMismatchError, match="receiver failed the handoff: digest mismatch"):
            tb.finish(dest, timeout_s=30.0)
        assert time.monotonic() - start < 5.0
        with pytest.raises(DigestMismatchError):
            ta.finish(dest, timeout_s=5.0)
        dest = rx.reserve("s", [5], LAYOUT.num_layers, deadline_s=5.0, parts=((0, 1), (1, 1)))
        with pytest.raises(ValueError, match="outside source heads 1"):
            tb.send_layer(dest, 0, [1], heads=HeadSlice(1, 0, 1))
        tb.send_layer(dest, 0, [1], num_layers=3, heads=HeadSlice(0, 0, 1))
        tb.send_layer(dest, 0, [1], num_layers=3, heads=HeadSlice(0, 1, 1))
        assert tb.finish(dest, timeout_s=5.0) == 2
        with pytest.raises(ValueError, match="do not cover the pool's 2 KV heads"):
            rx.reserve("t", [6], LAYOUT.num_layers, deadline_s=5.0, parts=((0, 1),))
