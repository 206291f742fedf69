"""Read one shard on an object store with ranged requests, into a sparse local mapping filled on demand.

The shard's bytes are mapped at their file offsets into an unlinked, sparse temporary file (under $TMPDIR), so
pyarrow parses it exactly like a local shard and the reader's numpy views work unchanged. At open only the
Arrow metadata (head and footer) and the small columns (ids, lengths, ragged offsets) are fetched; the values
of an example are fetched, in blocks of BLOCK bytes (1 MiB), before the first read of that example. A shard
whose bytes have all been fetched is hashed once against the manifest (the reader's lazy verification).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from cache_format.errors import CacheCorruptError
from cache_format._fs import Store

# Fetch granularity: each object-store request costs a round trip, so few large ones (on the moto server a
# shuffled first epoch read in 64 KiB blocks took many times longer than in 1 MiB blocks).
BLOCK = 1 << 20
_HEAD = 64 << 10  # first fetch at each end: the Arrow schema + batch metadata, and the footer


class RemoteShard:
    """A shard file on a Store, mapped locally; `fill` fetches byte ranges not yet fetched."""

    def __init__(self, store: Store, name: str, size: int, expected_hash: str | None = None,
                 hash_algo: str = "sha256") -> None:
        self.store, self.name, self.size = store, name, size
        self.expected_hash, self.hash_algo = expected_hash, hash_algo
        self.verified = expected_hash is None
        fd, tmp = tempfile.mkstemp(prefix="kd-remote-shard-")
        try:
            os.ftruncate(fd, size)  # sparse: disk is used only for the blocks fetched
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
            os.unlink(tmp)  # the mapping keeps the file alive; nothing is left behind on exit
        self.buffer = pa.py_buffer(self.mm)
        self.base = self.buffer.address
        self.filled = np.zeros(-(-size // BLOCK), dtype=bool)
        self.complete = False  # every byte fetched: reads need no more checks
        self._lock = threading.Lock()  # one hash check at a time
        self._state = threading.Lock()  # guards filled/_inflight bookkeeping
        self._inflight: dict[int, threading.Event] = {}
        self.fill([0, max(0, size - _HEAD)], [min(size, _HEAD), size])
        self.batch = self._open()

    def _where(self) -> str:
        return self.store.url_of(self.name)

    def _open(self) -> pa.RecordBatch:
        """Fetch the metadata the Arrow reader needs, parse it, then fetch ids, lengths and ragged offsets."""
        try:
            end = 8
            for _ in range(2):  # the schema message, then the record batch's metadata
                self.fill([end], [min(self.size, end + 8)])
                cont, meta_len = struct.unpack_from("<Ii", self.mm, end)
                if cont != 0xFFFFFFFF or meta_len < 0:
                    raise ValueError("not an Arrow IPC file")
                end += 8 + meta_len
                self.fill([0], [min(self.size, end)])
            footer_len = struct.unpack_from("<i", self.mm, self.size - 10)[0]
            if not 0 < footer_len < self.size:
                raise ValueError("bad footer length")
            self.fill([self.size - 10 - footer_len], [self.size])
            reader = ipc.open_file(pa.BufferReader(self.buffer))
            if reader.num_record_batches != 1:
                raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
            batch = reader.get_batch(0)
        except (ValueError, struct.error, pa.ArrowException) as e:
            raise CacheCorruptError(f"shard {self._where()} cannot be read ({e}): run `kd cache verify` on the "
                                    "cache, then rerun precompute into a new folder") from e
        starts, ends = [], []
        for name in batch.schema.names:
            col = batch.column(name)
            # ids and lengths whole; for list columns the offsets (buffer 1), not the values.
            bufs = col.buffers() if name in ("id", "length") else col.buffers()[:2]
            if pa.types.is_fixed_size_list(col.type):
                continue
            for buf in bufs:
                if buf is not None and buf.size:
                    starts.append(buf.address - self.base)
                    ends.append(buf.address - self.base + buf.size)
        self.fill(starts, ends)
        return batch

    def offset_of(self, arr: np.ndarray) -> int:
        """File offset of a numpy view into this shard's mapping."""
        return arr.__array_interface__["data"][0] - self.base

    def fill(self, starts: list[int] | np.ndarray, ends: list[int] | np.ndarray) -> None:
        """Make the bytes [start, end) of each range readable: fetch the blocks not fetched yet, in few requests.

        Safe from several threads: a block another thread is fetching is waited for, not fetched twice.
        """
        if self.complete:
            return
        starts = np.asarray(starts, dtype=np.int64)
        ends = np.asarray(ends, dtype=np.int64)
        keep = ends > starts
        if not keep.any():
            return
        first, last = starts[keep] // BLOCK, (ends[keep] - 1) // BLOCK
        marks = np.zeros(len(self.filled) + 1, dtype=np.int64)
        np.add.at(marks, first, 1)
        np.add.at(marks, last + 1, -1)
        need = np.flatnonzero(np.cumsum(marks[:-1]) > 0)
        while True:
            with self._state:
                missing = need[~self.filled[need]].tolist()
                if not missing:
                    break
                waits = {self._inflight[b] for b in missing if b in self._inflight}
                mine = [b for b in missing if b not in self._inflight]
                done = threading.Event()
                for b in mine:
                    self._inflight[b] = done
            try:
                if mine:
                    self._fetch(np.array(mine, dtype=np.int64))
            finally:
                with self._state:
                    for b in mine:
                        del self._inflight[b]
                done.set()
            for event in waits:  # then check again: a failed fetch leaves its blocks to us
                event.wait()
        self._check_if_full()  # also after a failed hash check: the shard keeps failing

    def _fetch(self, blocks: np.ndarray) -> None:
        """Fetch sorted block numbers, one request per run of consecutive blocks."""
        breaks = np.flatnonzero(np.diff(blocks) > 1)
        run_first = blocks[np.concatenate([[0], breaks + 1])]
        run_last = blocks[np.concatenate([breaks, [len(blocks) - 1]])]
        lo = (run_first * BLOCK).tolist()
        hi = np.minimum((run_last + 1) * BLOCK, self.size).tolist()
        for a, b, data in zip(lo, hi, self.store.read_ranges(self.name, lo, hi)):
            if len(data) != b - a:
                raise CacheCorruptError(f"shard {self._where()} is shorter than the manifest says ({self.size} "
                                        "bytes): the cache is damaged; rerun precompute into a new folder")
            self.mm[a:b] = data
        # Marked only after the bytes are in place: another thread never reads a block marked but unwritten.
        for a, b in zip(run_first.tolist(), run_last.tolist()):
            self.filled[a : b + 1] = True

    def _check_if_full(self) -> None:
        if not self.complete and self.filled.all():
            if not self.verified:
                self.check_hash()
            self.complete = True

    def fill_all(self) -> None:
        if not self.complete:
            self.fill([0], [self.size])

    def check_hash(self) -> None:
        """Hash the fully fetched shard once; CacheCorruptError if it differs from the manifest."""
        with self._lock:
            if self.verified:
                return
            h = hashlib.new(self.hash_algo)
            h.update(memoryview(self.mm))
            if f"{self.hash_algo}:{h.hexdigest()}" != self.expected_hash:
                raise CacheCorruptError(f"shard {self._where()} content hash differs from the manifest: the object "
                                        "is damaged; run `kd cache verify` on the cache, then rerun precompute "
                                        "into a new folder")
            self.verified = True


def shard_ids(store: Store, name: str, size: int) -> list[str]:
    """The ids of a remote shard (fetches its metadata and id column only)."""
    return RemoteShard(store, name, size).batch.column("id").to_pylist()
