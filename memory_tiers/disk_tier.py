"""G3: block files in one directory, an LRU index rebuilt from it at start-up, a byte capacity.

Lifecycle: ``DiskTier(...)`` opens (deletes leftover ``.tmp`` files, checks every header, drops bad
files, evicts down to capacity) → serve (``write_async`` / ``read``, thread-safe) → ``close()``
(waits for queued writes; idempotent).

Accounting: ``used_bytes`` is the bytes of indexed files plus those of writes in flight, never over
``capacity_bytes`` (a write that cannot make room by evicting unpinned files is refused). A file is
in the index only once its rename is done, so a reader never sees a partial file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engine.block_hash import BlockHash
from memory_tiers import disk_format as fmt
from memory_tiers.host_tier import PAGE, aligned_buffer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DiskStats:
    writes: int = 0
    reads: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    refused: int = 0  # writes refused for want of room
    evicted: int = 0
    corrupt_dropped: int = 0  # bad files found at start-up or on read, deleted


@dataclass(slots=True)
class _DiskState:
    index: OrderedDict[BlockHash, int] = field(default_factory=OrderedDict)  # hash -> file size, LRU first
    writing: dict[BlockHash, int] = field(default_factory=dict)  # in-flight writes -> size
    pins: dict[BlockHash, int] = field(default_factory=dict)
    used_bytes: int = 0


class DiskTier:
    def __init__(
        self,
        directory: str | Path,
        block_bytes: int,
        capacity_bytes: int,
        fingerprint: bytes,
        direct: bool = True,
        fsync: bool = False,
        on_removed: Callable[[BlockHash], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.block_bytes = block_bytes
        self.file_bytes = fmt.file_size(block_bytes)
        self.capacity_bytes = capacity_bytes
        self.fingerprint = fingerprint
        self.direct = direct
        self.fsync = fsync
        self.stats = DiskStats()
        self._on_removed = on_removed or (lambda h: None)
        self._st = _DiskState()
        self._lock = threading.Lock()
        self._local = threading.local()
        # Two FIFO stages: one thread writes temporary files (sequential large writes are what the
        # disk is fastest at), a second syncs and renames them, so a file's fdatasync overlaps the
        # next file's write. Both are single threads, so blocks are committed in submission order.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="g3-write")
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="g3-commit")
        self._closed = False
        self._rebuild()

    # -- start-up ----------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        found: list[tuple[float, BlockHash, int]] = []
        for entry in os.scandir(self.directory):
            path = Path(entry.path)
            if entry.name.endswith(fmt.TMP_SUFFIX):
                path.unlink(missing_ok=True)  # a write that never reached its rename
                continue
            if fmt.hash_of(entry.name) is None:
                continue
            try:
                h = fmt.scan_header(path, self.fingerprint, self.block_bytes)
            except (fmt.CorruptBlock, OSError) as e:
                log.warning("G3: dropping %s: %s", entry.name, e)
                path.unlink(missing_ok=True)
                self.stats.corrupt_dropped += 1
                self._on_removed(fmt.hash_of(entry.name))  # type: ignore[arg-type]  # announced before
                continue
            found.append((entry.stat().st_mtime, h, self.file_bytes))
        for _, h, size in sorted(found):  # oldest first = least recently used
            self._st.index[h] = size
            self._st.used_bytes += size
        with self._lock:
            self._make_room(0)

    # -- queries -----------------------------------------------------------------------------------
    def __contains__(self, h: BlockHash) -> bool:
        return h in self._st.index

    def __len__(self) -> int:
        return len(self._st.index)

    @property
    def used_bytes(self) -> int:
        return self._st.used_bytes

    def hashes(self) -> list[BlockHash]:
        with self._lock:
            return list(self._st.index)

    # -- pins ----------------------------------------------------------------------------------------
    def pin(self, h: BlockHash) -> bool:
        with self._lock:
            if h not in self._st.index:
                return False
            self._st.pins[h] = self._st.pins.get(h, 0) + 1
            return True

    def unpin(self, h: BlockHash) -> None:
        with self._lock:
            count = self._st.pins.get(h, 0) - 1
            if count > 0:
                self._st.pins[h] = count
            else:
                self._st.pins.pop(h, None)

    # -- eviction ------------------------------------------------------------------------------------
    def _make_room(self, nbytes: int) -> bool:
        """Evict LRU unpinned files until ``nbytes`` more fit (lock held)."""
        st = self._st
        while st.used_bytes + nbytes > self.capacity_bytes:
            victim = next((h for h in st.index if h not in st.pins), None)
            if victim is None:
                return False
            self._drop(victim)
            self.stats.evicted += 1
        return True

    def _drop(self, h: BlockHash) -> None:
        """Forget and delete one file (lock held)."""
        self._st.used_bytes -= self._st.index.pop(h)
        (self.directory / fmt.file_name(h)).unlink(missing_ok=True)
        self._on_removed(h)

    def remove(self, h: BlockHash) -> bool:
        with self._lock:
            if h not in self._st.index or h in self._st.pins:
                return False
            self._drop(h)
            return True

    # -- writes --------------------------------------------------------------------------------------
    def _header(self) -> memoryview:
        buf = getattr(self._local, "header", None)
        if buf is None:
            buf = self._local.header = aligned_buffer(PAGE)
        return memoryview(buf)

    def write_async(
        self, h: BlockHash, payload: memoryview, done: Callable[[bool], None]
    ) -> Future[None] | None:
        """Queue a write of ``payload`` (kept untouched by the caller until ``done``); None if refused.

        Refused when the hash is already here or being written, or no room can be made.
        """
        assert len(payload) == self.block_bytes
        with self._lock:
            if self._closed or h in self._st.index or h in self._st.writing:
                return None
            if not self._make_room(self.file_bytes):
                self.stats.refused += 1
                return None
            self._st.writing[h] = self.file_bytes
            self._st.used_bytes += self.file_bytes
        return self._writer.submit(self._write_job, h, payload, done)

    def _write_job(self, h: BlockHash, payload: memoryview, done: Callable[[bool], None]) -> None:
        pending: fmt.PendingFile | None = None
        try:
            pending = fmt.begin_block_file(
                self.directory, h, self.fingerprint, payload, self._header(), self.direct
            )
        except OSError as e:
            log.error("G3: write of %s failed: %s", h.hex(), e)
        self._committer.submit(self._commit_job, h, pending, len(payload), done)

    def _commit_job(
        self, h: BlockHash, pending: fmt.PendingFile | None, nbytes: int, done: Callable[[bool], None]
    ) -> None:
        ok = pending is not None
        if pending is not None:
            try:
                fmt.commit_block_file(pending, self.fsync)
            except OSError as e:
                log.error("G3: commit of %s failed: %s", h.hex(), e)
                ok = False
        with self._lock:
            size = self._st.writing.pop(h)
            if ok:
                self._st.index[h] = size
                self.stats.writes += 1
                self.stats.bytes_written += nbytes
            else:
                self._st.used_bytes -= size
        done(ok)

    # -- reads ---------------------------------------------------------------------------------------
    def read(self, h: BlockHash, payload: memoryview) -> bool:
        """Read and verify a block into ``payload``; a corrupt file is deleted and False returned."""
        with self._lock:
            if h not in self._st.index:
                return False
            self._st.index.move_to_end(h)
        try:
            fmt.read_block_file(
                self.directory / fmt.file_name(h), h, self.fingerprint, self._header(), payload, self.direct
            )
        except (fmt.CorruptBlock, OSError) as e:
            log.warning("G3: dropping %s on read: %s", h.hex(), e)
            with self._lock:
                if h in self._st.index:
                    self._drop(h)
                self.stats.corrupt_dropped += 1
            return False
        with self._lock:
            self.stats.reads += 1
            self.stats.bytes_read += len(payload)
        return True

    # -- lifecycle -----------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for every queued write."""
        self._writer.submit(lambda: None).result()  # every write has reached the committer
        self._committer.submit(lambda: None).result()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._writer.shutdown(wait=True)
        self._committer.shutdown(wait=True)

    def check(self) -> None:
        with self._lock:
            st = self._st
            total = sum(st.index.values()) + sum(st.writing.values())
            assert total == st.used_bytes, f"used_bytes {st.used_bytes} != {total}"
            assert st.used_bytes <= self.capacity_bytes, "G3 over capacity"
            assert not set(st.index) & set(st.writing), "a hash both stored and being written"
            on_disk = {fmt.hash_of(n) for n in os.listdir(self.directory)} - {None}
            assert set(st.index) <= on_disk, "an indexed block has no file"
            assert on_disk <= set(st.index) | set(st.writing), "a block file is not indexed"
