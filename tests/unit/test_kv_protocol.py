"""The pure parts of kv_transfer: header encoding, block-run coalescing, regions, digests and the
receiver's reservation book (backpressure, coverage, expiry)."""

from __future__ import annotations

import pytest
import xxhash

from kv_transfer.factory import ucx_env
from kv_transfer.protocol import (
    DIGEST_NAME,
    KIND_ACK,
    KIND_DATA,
    KIND_HELLO,
    STATUS_FAILED,
    Header,
    KVTransferError,
    NoRoomError,
    ReservationBook,
    coalesce,
    decode_all,
    digest,
    head_regions,
    paired_runs,
    region,
    regions,
)

pytestmark = pytest.mark.unit


def test_header_round_trip() -> None:
    h = Header(
        KIND_DATA,
        "req-ü-42",
        layer=31,
        num_layers=2,
        block_start=5,
        num_blocks=7,
        dtype="bfloat16",
        block_shape=(2, 8, 16, 128),
        digest=0xDEADBEEFCAFEF00D,
        payload_bytes=917504,
        text="kv-send-abc",
    )
    buf = h.encode() + b"payload"
    got, n = Header.decode(buf)
    assert got == h
    assert buf[n:] == b"payload"


def test_ack_header_round_trip() -> None:
    h = Header(KIND_ACK, "r1", status=STATUS_FAILED, text="digest mismatch on layer 3")
    assert Header.decode(h.encode())[0] == h


def test_header_rejects_garbage() -> None:
    with pytest.raises(KVTransferError, match="not a KV message"):
        Header.decode(b"\x00" * 80)
    with pytest.raises(KVTransferError, match="too short"):
        Header.decode(b"KVT")


def test_one_notification_carries_several_headers() -> None:
    """A NIXL WRITE's notification vouches for every chunk it completes: its headers are packed
    back to back and all come out, in order; a HELLO ends the list and its payload follows."""
    data = [
        Header(KIND_DATA, "r1", layer=2 * i, num_layers=2, num_blocks=32, digest=i + 1, payload_bytes=4096)
        for i in range(3)
    ]
    buf = b"".join(h.encode() for h in data)
    assert decode_all(buf) == (data, len(buf))
    hello = Header(KIND_HELLO, "", text="kv-send-1")
    got, n = decode_all(hello.encode() + b"agent-metadata")
    assert got == [hello]
    assert (hello.encode() + b"agent-metadata")[n:] == b"agent-metadata"
    with pytest.raises(KVTransferError, match="too short"):
        decode_all(data[0].encode() + b"KV")  # a truncated second header is not silently dropped


def test_coalesce_consecutive_ids() -> None:
    assert coalesce([4, 5, 6, 9, 2, 3]) == [(4, 3), (9, 1), (2, 2)]
    assert coalesce([7]) == [(7, 1)]
    assert coalesce([]) == []
    assert coalesce([3, 2, 1]) == [(3, 1), (2, 1), (1, 1)]  # descending is not a run


def test_paired_runs_cut_where_either_side_breaks() -> None:
    src = [3, 4, 5, 6, 20, 11, 12]
    dst = [10, 11, 12, 40, 41, 5, 63]
    assert paired_runs(src, dst) == [(3, 10, 3), (6, 40, 1), (20, 41, 1), (11, 5, 1), (12, 63, 1)]
    assert paired_runs([0, 1, 2], [8, 9, 10]) == [(0, 8, 3)]
    with pytest.raises(ValueError, match="2 source blocks for 1 destination"):
        paired_runs([0, 1], [0])


def test_regions_layer_major() -> None:
    # pool of 10 blocks, 100 bytes per (layer, block)
    assert region(0, 0, 1, 10, 100) == (0, 100)
    assert region(2, 3, 4, 10, 100) == (2300, 400)
    assert regions(range(1, 3), [(3, 2), (8, 1)], 10, 100) == [
        (1300, 200),
        (1800, 100),
        (2300, 200),
        (2800, 100),
    ]


def _reference_digest(data: bytes) -> int:
    """The digest computed by the reference implementation of the algorithm protocol.py uses."""
    assert DIGEST_NAME == "xxh3-64"
    return xxhash.xxh3_64(data).intdigest()


def test_digest_is_a_known_algorithm_with_known_value() -> None:
    data = b"123456789"
    assert DIGEST_NAME == "xxh3-64"
    expected = 0x72DCB18B67A17DFF  # XXH3_64bits("123456789"), seed 0 (the reference library's value)
    assert xxhash.xxh3_64(data).intdigest() == expected
    assert digest([data]) == expected
    assert digest([b"1234", b"", b"56789"]) == expected


def test_digest_independent_of_cuts() -> None:
    data = bytes(range(256)) * 64
    whole = _reference_digest(data)
    assert digest([data]) == whole
    assert digest([data[:100], data[100:4000], data[4000:]]) == whole
    flipped = bytearray(data)
    flipped[1234] ^= 1
    assert digest([bytes(flipped)]) != whole


def test_book_backpressure_refuses_instead_of_queueing() -> None:
    book = ReservationBook(num_blocks=16, capacity_blocks=8, max_requests=2)
    book.reserve("a", [0, 1, 2, 3, 4, 5], 2, deadline=10.0)
    with pytest.raises(NoRoomError, match="no room: 4 blocks asked, 2 free"):
        book.reserve("b", [8, 9, 10, 11], 2, deadline=10.0)
    with pytest.raises(NoRoomError, match=r"blocks \[5\] are reserved by another request"):
        book.reserve("b", [5, 6], 2, deadline=10.0)
    book.reserve("b", [6, 7], 2, deadline=10.0)
    with pytest.raises(NoRoomError, match="2 reservations"):
        book.reserve("c", [9], 2, deadline=10.0)
    assert book.num_reserved_blocks == 8
    book.drop("a")
    assert book.num_reserved_blocks == 2
    book.reserve("c", [0, 1, 2], 2, deadline=10.0)
    assert sorted(book.request_ids) == ["b", "c"]


def test_book_rejects_bad_ids() -> None:
    book = ReservationBook(num_blocks=4)
    with pytest.raises(ValueError, match=r"block ids \[4\] out of range"):
        book.reserve("a", [3, 4], 1, deadline=1.0)
    with pytest.raises(ValueError, match="duplicate"):
        book.reserve("a", [1, 1], 1, deadline=1.0)
    book.reserve("a", [1], 1, deadline=1.0)
    with pytest.raises(KVTransferError, match="already has a reservation"):
        book.reserve("a", [2], 1, deadline=1.0)


def test_book_coverage_completes_on_last_piece() -> None:
    book = ReservationBook(num_blocks=8)
    r = book.reserve("a", [5, 6, 7], 2, deadline=10.0)
    chunk = Header(KIND_DATA, "a", layer=0, num_layers=1, block_start=0, num_blocks=2)
    assert book.record(r, chunk) is False
    assert book.record(r, Header(KIND_DATA, "a", layer=0, block_start=2, num_blocks=1)) is False
    assert sorted(r.missing) == [(1, 0, 0), (1, 1, 0), (1, 2, 0)]  # (layer, block index, first head)
    assert book.record(r, Header(KIND_DATA, "a", layer=1, block_start=0, num_blocks=3)) is True
    with pytest.raises(KVTransferError, match="layers 1\\+2 outside 0..1"):
        book.check(r, Header(KIND_DATA, "a", layer=1, num_layers=2, num_blocks=1), 4)
    with pytest.raises(KVTransferError, match="blocks 2\\+2 outside the 3 reserved"):
        book.check(r, Header(KIND_DATA, "a", block_start=2, num_blocks=2), 4)


def test_book_head_parts_each_arrive() -> None:
    """A block whose heads come from two tensor-parallel ranks commits only when both halves are in."""
    book = ReservationBook(num_blocks=8)
    r = book.reserve("a", [3, 4], 1, deadline=10.0, parts=[(2, 2), (0, 2)])
    assert r.parts == ((0, 2), (2, 2))
    low = Header(KIND_DATA, "a", num_blocks=2, block_shape=(2, 2, 16, 8), head_start=0)
    high = Header(KIND_DATA, "a", num_blocks=2, block_shape=(2, 2, 16, 8), head_start=2)
    book.check(r, low, 4)
    assert book.record(r, low) is False
    assert sorted(r.missing) == [(0, 0, 2), (0, 1, 2)]
    book.check(r, high, 4)
    assert book.record(r, high) is True
    with pytest.raises(KVTransferError, match="head split mismatch"):
        book.check(r, Header(KIND_DATA, "a", num_blocks=1, block_shape=(2, 4, 16, 8)), 4)  # all 4 heads
    whole = book.reserve("b", [5], 1, deadline=10.0)
    book.check(whole, Header(KIND_DATA, "b", num_blocks=1, block_shape=(2, 4, 16, 8)), 4)
    with pytest.raises(KVTransferError, match="not one of the parts \\[\\(0, 4\\)\\]"):
        book.check(whole, Header(KIND_DATA, "b", num_blocks=1, block_shape=(2, 2, 16, 8)), 4)
    with pytest.raises(ValueError, match="overlap"):
        book.reserve("c", [6], 1, deadline=1.0, parts=[(0, 3), (2, 2)])


def test_head_regions_k_then_v_per_block() -> None:
    # pool (L=2, N=4, 2, H=4, B, D) with 16-byte heads: a block is 2 * 4 * 16 = 128 bytes
    got = head_regions(range(1, 2), [2, 0], (1, 2), num_heads=4, num_blocks=4, layer_block_bytes=128)
    base2, base0 = (1 * 4 + 2) * 128, (1 * 4 + 0) * 128
    assert got == [(base2 + 16, 32), (base2 + 64 + 16, 32), (base0 + 16, 32), (base0 + 64 + 16, 32)]


def test_book_expiry_skips_committed() -> None:
    book = ReservationBook(num_blocks=8)
    a = book.reserve("a", [0], 1, deadline=5.0)
    book.reserve("b", [1], 1, deadline=7.0)
    a.committed = True
    assert [r.request_id for r in book.expired(now=6.0)] == []
    assert [r.request_id for r in book.expired(now=8.0)] == ["b"]


def test_ucx_env_per_transport() -> None:
    assert ucx_env("nixl", "auto") == {}
    assert ucx_env("nixl", "tcp") == {"UCX_TLS": "tcp,self"}
    assert ucx_env("ucxx", "shm") == {"UCX_TLS": "sm,self"}
    assert ucx_env("inprocess", "shm") == {}
    with pytest.raises(ValueError, match="transport must be one of"):
        ucx_env("nixl", "carrier-pigeon")
