"""The on-disk form of one G3 block: a checksummed header page, then the block's bytes.

    offset 0     ┌───────────────────────────────────────────────────────────────┐
                 │ magic "TNDMKVB1" │ version u32 │ header_size u32 │ hash 16 B   │
                 │ fingerprint 16 B │ payload_len u64 │ payload xxh3 u64           │
                 │ header xxh3 u64 (over everything before it) │ zero padding     │
    offset 4096  ├───────────────────────────────────────────────────────────────┤
                 │ payload: kv[:, block_id] as bytes, payload_len bytes            │
                 └───────────────────────────────────────────────────────────────┘

A file is written whole to a temporary name, fsynced, then renamed to ``<hash hex>.kvb``: a reader
never sees a torn file under the final name; a crash leaves at most a ``.tmp`` file, deleted at
start-up. The header page makes the payload page-aligned, so both move with O_DIRECT when the
buffers and length allow it (large sequential I/O that skips the page cache).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from engine.block_hash import BlockHash

MAGIC = b"TNDMKVB1"
VERSION = 1
HEADER_SIZE = 4096
SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
_FIELDS = struct.Struct("<8sII16s16sQQ")
_CHECK = struct.Struct("<Q")
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_seq = itertools.count()


class CorruptBlock(Exception):
    """A block file failed a check (magic, version, hash, fingerprint, length or checksum)."""


def layout_fingerprint(*parts: object) -> bytes:
    """16 bytes naming the layout and model, so a file written for another model is never served."""
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).digest()


def file_name(h: BlockHash) -> str:
    return h.hex() + SUFFIX


def hash_of(name: str) -> BlockHash | None:
    """The hash a final file name carries, or None for anything else."""
    if not name.endswith(SUFFIX) or len(name) != 32 + len(SUFFIX):
        return None
    try:
        return bytes.fromhex(name[:32])
    except ValueError:
        return None


def file_size(payload_len: int) -> int:
    return HEADER_SIZE + payload_len


def pack_header(buf: memoryview, h: BlockHash, fingerprint: bytes, payload: memoryview) -> None:
    """Fill ``buf`` (HEADER_SIZE bytes) with the header of ``payload``."""
    fields = _FIELDS.pack(
        MAGIC, VERSION, HEADER_SIZE, h, fingerprint, len(payload), xxhash.xxh3_64_intdigest(payload)
    )
    buf[: len(fields)] = fields
    buf[len(fields) : len(fields) + _CHECK.size] = _CHECK.pack(xxhash.xxh3_64_intdigest(fields))
    buf[len(fields) + _CHECK.size : HEADER_SIZE] = bytes(HEADER_SIZE - len(fields) - _CHECK.size)


def parse_header(buf: bytes | memoryview, fingerprint: bytes) -> tuple[BlockHash, int, int]:
    """(hash, payload_len, payload checksum) of a header page; raises CorruptBlock."""
    if len(buf) < _FIELDS.size + _CHECK.size:
        raise CorruptBlock("short header")
    fields = bytes(buf[: _FIELDS.size])
    (check,) = _CHECK.unpack(bytes(buf[_FIELDS.size : _FIELDS.size + _CHECK.size]))
    if xxhash.xxh3_64_intdigest(fields) != check:
        raise CorruptBlock("header checksum mismatch")
    magic, version, header_size, h, fp, payload_len, payload_check = _FIELDS.unpack(fields)
    if magic != MAGIC or version != VERSION or header_size != HEADER_SIZE:
        raise CorruptBlock(f"bad magic/version {magic!r} {version} {header_size}")
    if fp != fingerprint:
        raise CorruptBlock("layout fingerprint mismatch")
    return h, payload_len, payload_check


def _direct_ok(buf: memoryview, alignment: int = 4096) -> bool:
    if not _O_DIRECT or len(buf) % alignment:
        return False
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data  # O_DIRECT needs an aligned address
    return addr % alignment == 0


def _write_all(fd: int, header: memoryview, payload: memoryview) -> None:
    """Header and payload in one writev: with O_DIRECT, one I/O per file instead of two round trips."""
    n = os.writev(fd, [header, payload])
    while n < len(header) + len(payload):  # a short write (rare): finish it piece by piece
        if n < len(header):
            n += os.write(fd, header[n:])
        else:
            n += os.write(fd, payload[n - len(header) :])


@dataclass(slots=True)
class PendingFile:
    """A block written to its temporary file, not yet committed (synced and renamed)."""

    fd: int
    tmp: Path
    final: Path
    size: int


def begin_block_file(
    directory: Path, h: BlockHash, fingerprint: bytes, payload: memoryview, header: memoryview, direct: bool
) -> PendingFile:
    """Write one block to a temporary file (first half of an atomic write).

    ``header`` is a page-aligned scratch page (HEADER_SIZE bytes). O_DIRECT is used when asked and
    both buffers allow it; otherwise one large buffered write.
    """
    pack_header(header, h, fingerprint, payload)
    tmp = directory / f".{h.hex()}.{os.getpid()}.{next(_seq)}{TMP_SUFFIX}"
    use_direct = direct and _direct_ok(header) and _direct_ok(payload)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (_O_DIRECT if use_direct else 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except OSError:
        if not use_direct:
            raise
        fd = os.open(tmp, flags & ~_O_DIRECT, 0o644)  # a filesystem without O_DIRECT (tmpfs)
    try:
        _write_all(fd, header, payload)
    except BaseException:
        abort_block_file(PendingFile(fd, tmp, tmp, 0))
        raise
    return PendingFile(fd, tmp, directory / file_name(h), file_size(len(payload)))


def commit_block_file(pending: PendingFile, fsync: bool = True) -> int:
    """fdatasync (durability across power loss; a process crash is covered by the rename alone),
    then rename to the final name (second half of an atomic write). Returns the file's size."""
    try:
        if fsync:
            os.fdatasync(pending.fd)
    except BaseException:
        abort_block_file(pending)
        raise
    os.close(pending.fd)
    os.rename(pending.tmp, pending.final)
    return pending.size


def abort_block_file(pending: PendingFile) -> None:
    os.close(pending.fd)
    pending.tmp.unlink(missing_ok=True)


def write_block_file(
    directory: Path,
    h: BlockHash,
    fingerprint: bytes,
    payload: memoryview,
    header: memoryview,
    direct: bool = True,
    fsync: bool = True,
) -> int:
    """Write one block atomically: tmp file, fdatasync, rename. Returns the file's size in bytes."""
    return commit_block_file(begin_block_file(directory, h, fingerprint, payload, header, direct), fsync)


def read_block_file(
    path: Path,
    h: BlockHash,
    fingerprint: bytes,
    header: memoryview,
    payload: memoryview,
    direct: bool = True,
) -> None:
    """Read and verify one block file into ``payload`` (exactly payload_len bytes); CorruptBlock if bad.

    With O_DIRECT the page cache is bypassed, so a read costs what the disk costs.
    """
    use_direct = direct and _direct_ok(header) and _direct_ok(payload)
    flags = os.O_RDONLY | (_O_DIRECT if use_direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if not use_direct:
            raise
        fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != file_size(len(payload)):
            raise CorruptBlock(f"size {size} != {file_size(len(payload))}")
        got = os.preadv(fd, [header, payload], 0)
        if got != size:
            raise CorruptBlock(f"short read {got} of {size}")
    finally:
        os.close(fd)
    fh, payload_len, payload_check = parse_header(header, fingerprint)
    if fh != h or payload_len != len(payload):
        raise CorruptBlock("hash or length mismatch")
    if xxhash.xxh3_64_intdigest(payload) != payload_check:
        raise CorruptBlock("payload checksum mismatch")


def scan_header(path: Path, fingerprint: bytes, payload_len: int) -> BlockHash:
    """Check a file's header and size without reading its payload (start-up index rebuild)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
    h, plen, _ = parse_header(head, fingerprint)
    if plen != payload_len or size != file_size(plen):
        raise CorruptBlock(f"length {plen} / size {size} does not match {payload_len}")
    if hash_of(path.name) != h:
        raise CorruptBlock("file name does not match its hash")
    return h
