"""Write a cache: streaming append, atomic shards with sidecars, resume, multi-writer finalize."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from filelock import FileLock, Timeout

from cache_format import _zarr
from cache_format.errors import (
    CacheCorruptError,
    CacheExistsError,
    CacheIncompleteError,
    CacheLockedError,
    CacheMismatchError,
    CacheValueError,
)
from cache_format._fs import Store, resolve
from cache_format._manifest import (
    FLOAT_DTYPES,
    HASH_ALGO,
    LOCK_RE,
    MANIFEST_NAME,
    MAX_ID_BYTES,
    MAX_LENGTH,
    PENDING_NAME,
    SHARD_FORMATS,
    SHARD_RE,
    FieldSpec,
    Manifest,
    ShardInfo,
    atomic_file,
    atomic_write_text,
    canonical_settings,
    check_fields,
    check_writer_id,
    create_json_exclusive,
    fields_from_list,
    format_version_of,
    holder_name,
    load_manifest,
    lock_name,
    read_json,
    shard_name,
    sidecar_name,
    write_json_atomic,
)
from cache_format._reader import arrow_schema, shard_ids
from cache_format._remote import shard_ids as remote_shard_ids

DEFAULT_SHARD_BYTES = 256 << 20
MAX_SHARD_BYTES = 16 << 30  # the writer holds about one shard in memory (twice while encoding it)
_clock = time.monotonic  # the commit_seconds clock (tests replace it)


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("kd-pipeline")
    except Exception:  # not installed as a distribution (e.g. running from a checkout)
        return "0+unknown"


def _identity(fields: Sequence[FieldSpec], teacher: str, data: str, settings: Mapping,
              shard_format: str = "arrow") -> dict[str, Any]:
    extra = {} if shard_format == "arrow" else {"shard_format": shard_format}  # Arrow caches: as before
    return {
        "format_version": format_version_of(shard_format),
        "teacher_fingerprint": teacher,
        "data_fingerprint": data,
        "settings": settings,
        "fields": [f.to_dict() for f in fields],
        **extra,
    }


def _identity_diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in ("format_version", "teacher_fingerprint", "data_fingerprint", "fields"):
        if expected.get(key) != found.get(key):
            diffs.append(f"{key} {found.get(key)!r} there vs {expected.get(key)!r} now")
    if expected.get("shard_format", "arrow") != found.get("shard_format", "arrow"):
        diffs.append(f"shard_format {found.get('shard_format', 'arrow')!r} there vs "
                     f"{expected.get('shard_format', 'arrow')!r} now")
    exp_s, found_s = expected.get("settings", {}), found.get("settings", {})
    for key in sorted(set(exp_s) | set(found_s)):
        if exp_s.get(key) != found_s.get(key):
            diffs.append(f"setting {key!r} {found_s.get(key)!r} there vs {exp_s.get(key)!r} now")
    return diffs


class _HashingFile:
    """File-like sink that hashes and counts bytes as Arrow writes them (no second read of the shard)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.hash = hashlib.new(HASH_ALGO)
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True  # the real file is closed by atomic_file


@dataclass
class _Chunk:
    """Validated rows of one append call, flattened per field, waiting in the buffer."""

    ids: list[str]
    lengths: np.ndarray  # int32 [n]
    values: dict[str, np.ndarray]  # 1-D storage-dtype values, token-major
    counts: dict[str, np.ndarray]  # int64 [n] values per row
    row_bytes: np.ndarray  # int64 [n]

    def split(self, k: int) -> tuple[_Chunk, _Chunk]:
        cuts = {name: int(c[:k].sum()) for name, c in self.counts.items()}
        head = _Chunk(
            self.ids[:k], self.lengths[:k], {n: v[: cuts[n]] for n, v in self.values.items()},
            {n: c[:k] for n, c in self.counts.items()}, self.row_bytes[:k],
        )
        tail = _Chunk(
            self.ids[k:], self.lengths[k:], {n: v[cuts[n] :] for n, v in self.values.items()},
            {n: c[k:] for n, c in self.counts.items()}, self.row_bytes[k:],
        )
        return head, tail


class _WriterLock:
    """Exclusive lock of one writer id on an unfinished cache folder.

    An OS file lock (flock), so it dies with its process: a lock file left by a killed writer does not
    block. The holder file next to it names the holder for the error a second writer gets.
    """

    def __init__(self, folder: Path, writer_id: str) -> None:
        self.folder = folder
        self.file = folder / lock_name(writer_id)
        self.holder = folder / holder_name(writer_id)
        # thread_local=False: precompute appends on a background thread and closes on the main one.
        self._lock = FileLock(self.file, thread_local=False)

    def acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise CacheLockedError(
                f"{self.folder} is being written by {self._describe_holder()}; wait for it to finish "
                "(then rerun: the cache will be up to date) or stop that process"
            ) from None
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(self.holder, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "started": started}))

    def _describe_holder(self) -> str:
        try:
            h = read_json(self.holder)
            return f"pid {h['pid']} on host {h['host']} since {h['started']}"
        except (OSError, CacheCorruptError, KeyError, TypeError):  # the holder is writing or removing it
            return "another process"

    def release(self) -> None:
        if self._lock.is_locked:
            _unlink(self.holder)  # before unlocking: the next holder writes its own right after locking
            self._lock.release()


class CacheWriter:
    """Streams examples into a cache folder; resumable, never overwrites another configuration's cache.

    After opening, `complete` says whether the cache is already finished (then appends of its ids are
    no-ops) and `done_ids` holds the ids already committed by any writer, for the producer to skip.
    Opening an unfinished cache locks it for this `writer_id` (CacheLockedError if a live process holds it).

    `path` may be a URL (`s3://bucket/prefix/cache`): each shard is written to a local temporary file and
    uploaded, then its sidecar, and the manifest last. Object stores have no locks: one writer per writer id is
    then the caller's to ensure (precompute's ranks have distinct ids).

    Buffered rows are committed as a shard when they reach `shard_bytes`, `commit_examples` rows, or (checked
    on append) `commit_seconds` since the last commit, whichever comes first: committed rows survive a kill.

    `shard_format` "arrow" (default) writes Arrow IPC shard files, "zarr" Zarr v3 shard folders (SPEC.md section
    10); the manifest records it and readers follow it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fields: Sequence[FieldSpec],
        *,
        teacher_fingerprint: str,
        data_fingerprint: str,
        settings: Mapping,
        writer_id: str = "0",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        commit_examples: int | None = None,
        commit_seconds: float | None = None,
        shard_format: str = "arrow",
    ) -> None:
        where = resolve(path)
        self._store: Store | None = where if isinstance(where, Store) else None
        self.path: Path | str = where if self._store is None else self._store.url
        if shard_format not in SHARD_FORMATS:
            raise CacheValueError(f"shard_format={shard_format!r} is not one of {SHARD_FORMATS}")
        self.shard_format = shard_format
        self.fields = check_fields(fields)
        self.writer_id = check_writer_id(writer_id)
        if not isinstance(shard_bytes, int) or not 1 <= shard_bytes <= MAX_SHARD_BYTES:
            raise CacheValueError(
                f"shard_bytes={shard_bytes!r} must be an int in [1, {MAX_SHARD_BYTES}] because the writer holds "
                "about one shard in memory"
            )
        if commit_examples is not None and (
            not isinstance(commit_examples, int) or isinstance(commit_examples, bool) or commit_examples < 1
        ):
            raise CacheValueError(f"commit_examples={commit_examples!r} must be an int >= 1 (or None: no limit)")
        if commit_seconds is not None and (
            not isinstance(commit_seconds, (int, float)) or isinstance(commit_seconds, bool)
            or not math.isfinite(commit_seconds) or commit_seconds <= 0
        ):
            raise CacheValueError(f"commit_seconds={commit_seconds!r} must be a number > 0 (or None: no limit)")
        self.shard_bytes = shard_bytes
        self.commit_examples = commit_examples
        self.commit_seconds = commit_seconds
        self._specs = {f.name: f for f in self.fields}
        self._identity = _identity(self.fields, str(teacher_fingerprint), str(data_fingerprint),
                                   canonical_settings(settings), shard_format)
        self._schema = arrow_schema(self.fields)
        self._buffer: list[_Chunk] = []
        self._buffered_bytes = 0
        self._buffered_rows = 0
        self._closed = False
        self._lock: _WriterLock | None = None
        self._created = False
        self.complete = False
        self.done_ids: set[str] = set()
        self._open_folder()
        self._seen = set(self.done_ids)
        self._last_commit = _clock()

    # --- opening / resume -------------------------------------------------------------------

    def _open_folder(self) -> None:
        if self._store is not None:
            self._open_remote(self._store)
            return
        if self.path.exists() and not self.path.is_dir():
            raise CacheExistsError(f"{self.path} exists and is not a folder: use another cache path")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / MANIFEST_NAME).exists():
            self._open_finished()
            return
        pending = self.path / PENDING_NAME
        if not pending.exists():
            strangers = [p.name for p in self.path.iterdir() if not _is_cache_file(p.name)]
            if strangers:
                raise CacheExistsError(
                    f"{self.path} is not empty and is not a cache (found {strangers[:3]}): use another path"
                )
        if not create_json_exclusive(pending, self._identity):
            diffs = _identity_diff(self._identity, read_json(pending))
            if diffs:
                raise CacheMismatchError(
                    f"{self.path} holds an unfinished cache of another configuration ({'; '.join(diffs)}): "
                    "use another path or delete it"
                )
        # Locked before touching any file: a second writer with this id would clean up and redo ours.
        self._lock = _WriterLock(self.path, self.writer_id)
        self._lock.acquire()
        try:
            if (self.path / MANIFEST_NAME).exists():  # finalized while we waited for the lock
                self._release_lock()
                self._open_finished()
                return
            self._clean_own_leftovers()
            self._next_seq = 0
            for name in os.listdir(self.path):
                m = SHARD_RE.match(name)
                if m and m["writer"] == self.writer_id:
                    self._next_seq = max(self._next_seq, int(m["seq"]) + 1)
            for info in _committed_shards(self.path):
                if info.writer == self.writer_id:
                    _check_kept_shard(info, lambda: _zarr.stored_hash(self.path / info.file, _algo(info)),
                                      str(self.path / info.file))
                self.done_ids.update(shard_ids(self.path / info.file))
        except BaseException:
            self._release_lock()
            raise

    def _open_finished(self) -> None:
        manifest = load_manifest(self.path)
        found = _identity(manifest.fields, manifest.teacher_fingerprint, manifest.data_fingerprint,
                          dict(manifest.settings), manifest.shard_format)
        diffs = _identity_diff(self._identity, found)
        if diffs:
            raise CacheExistsError(
                f"{self.path} holds a finished cache of another configuration ({'; '.join(diffs)}): "
                "use another path (the default folder name differs per configuration) or delete it"
            )
        self.complete = True
        self.done_ids = {i for s in manifest.shards for i in self._shard_ids(s)}

    def _shard_ids(self, info: ShardInfo) -> list[str]:
        if self._store is not None:
            return _remote_ids(self._store, info.file, info.bytes)
        return shard_ids(self.path / info.file)

    def _open_remote(self, store: Store) -> None:
        """`_open_folder` on an object store: no exclusive create of pending.json and no lock (neither exists)."""
        files = store.listdir()
        self._created = not files
        if MANIFEST_NAME in files:
            self._open_finished()
            return
        if PENDING_NAME in files:
            diffs = _identity_diff(self._identity, store.read_json(PENDING_NAME))
            if diffs:
                raise CacheMismatchError(
                    f"{self.path} holds an unfinished cache of another configuration ({'; '.join(diffs)}): "
                    "use another path or delete it"
                )
        else:
            strangers = [name for name in files if not _is_cache_file(name)]
            if strangers:
                raise CacheExistsError(
                    f"{self.path} is not empty and is not a cache (found {strangers[:3]}): use another path"
                )
            store.write_json(PENDING_NAME, self._identity)
        self._next_seq = 0
        for name in files:
            m = SHARD_RE.match(name)
            if m and m["writer"] == self.writer_id:
                if sidecar_name(name) not in files:  # upload cut short before its sidecar: not committed
                    store.remove(name)
                self._next_seq = max(self._next_seq, int(m["seq"]) + 1)
        for info in _remote_committed_shards(store, files):
            if info.writer == self.writer_id:
                _check_kept_shard(info, lambda: _remote_hash(store, info), store.url_of(info.file))
            self.done_ids.update(self._shard_ids(info))

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _clean_own_leftovers(self) -> None:
        # A crash (even SIGKILL) leaves at most partial files and a shard without its sidecar;
        # neither was committed, so this writer deletes its own. Other writers may still be running.
        prefix = f"shard-{self.writer_id}-"
        for name in os.listdir(self.path):
            if not name.startswith(prefix):
                continue
            if name.endswith(".partial"):
                _unlink(self.path / name)
            elif SHARD_RE.match(name) and not (self.path / sidecar_name(name)).exists():
                _unlink(self.path / name)

    # --- appending --------------------------------------------------------------------------

    def append(
        self,
        ids: Sequence[str],
        lengths: Any,
        arrays: Mapping[str, Any],
    ) -> None:
        """Add a batch. Ragged fields: padded `[B, Tmax, ...]` or a list of per-example arrays; fixed: `[B, ...]`.

        Values may be numpy arrays or torch tensors; they are cast to the field's dtype. Invalid input
        (duplicate id, NaN/inf, wrong shape or dtype, missing or unknown field) raises CacheValueError.
        A bfloat16 field takes torch bf16 tensors, float arrays (rounded to nearest even) or uint16 bit patterns.
        """
        if self._closed:
            raise CacheValueError(f"writer for {self.path} is closed: open a new CacheWriter to add examples")
        ids = list(ids)
        if self.complete:
            extra = [i for i in ids if i not in self.done_ids]
            if extra:
                raise CacheExistsError(
                    f"{self.path} is a finished cache without ids {extra[:3]!r}: its data fingerprint should "
                    "differ; compute the data fingerprint from the data or use another path"
                )
            return
        if not ids:
            return
        lengths = self._check_ids_lengths(ids, lengths)
        missing = [n for n in self._specs if n not in arrays]
        unknown = [n for n in arrays if n not in self._specs]
        if missing or unknown:
            raise CacheValueError(
                f"batch starting with id {ids[0] if ids else None!r}: missing fields {missing}, unknown fields "
                f"{unknown}; the cache declares {list(self._specs)}"
            )
        values, counts = {}, {}
        row_bytes = np.full(len(ids), 4 + 8, dtype=np.int64)  # length + id offset
        row_bytes += np.array([len(i) for i in ids], dtype=np.int64)
        for name, spec in self._specs.items():
            values[name], counts[name] = _prepare(spec, arrays[name], ids, lengths)
            row_bytes += counts[name] * spec.storage_dtype.itemsize
        chunk = _Chunk(ids, lengths, values, counts, row_bytes)
        self._seen.update(ids)
        self._buffer.append(chunk)
        self._buffered_bytes += int(row_bytes.sum())
        self._buffered_rows += len(ids)
        while self._buffered_bytes >= self.shard_bytes or (
            self.commit_examples is not None and self._buffered_rows >= self.commit_examples
        ):
            self._commit(self._take())
        if self._buffer and self.commit_seconds is not None and _clock() - self._last_commit >= self.commit_seconds:
            self.flush()

    def _check_ids_lengths(self, ids: list[str], lengths: Any) -> np.ndarray:
        for i in ids:
            if not isinstance(i, str) or not i or len(i.encode("utf-8")) > MAX_ID_BYTES:
                raise CacheValueError(
                    f"example id {i!r} is invalid: ids are non-empty str of at most {MAX_ID_BYTES} UTF-8 bytes"
                )
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise CacheValueError(f"example id {dup!r} appears twice in one batch: ids must be unique")
        again = next((i for i in ids if i in self._seen), None)
        if again is not None:
            raise CacheValueError(
                f"example id {again!r} is already in the cache (committed or buffered): skip ids in "
                "writer.done_ids and make ids unique"
            )
        arr = _to_numpy(lengths)[0]
        if arr.shape != (len(ids),) or arr.dtype.kind not in "iu":
            raise CacheValueError(
                f"lengths must be an integer array of shape ({len(ids)},) for batch starting with id "
                f"{ids[0] if ids else None!r}, got dtype {arr.dtype} shape {arr.shape}"
            )
        bad = np.flatnonzero((arr < 0) | (arr > MAX_LENGTH))
        if len(bad):
            raise CacheValueError(
                f"example {ids[bad[0]]!r}: length {arr[bad[0]]} must be in [0, {MAX_LENGTH}] (int32 storage)"
            )
        return arr.astype(np.int32)

    def _take(self) -> list[_Chunk]:
        """Pop one shard's rows from the buffer: at most shard_bytes and commit_examples rows, at least one row."""
        taken, used, rows = [], 0, 0
        max_rows = self.commit_examples if self.commit_examples is not None else self._buffered_rows
        while self._buffer and rows < max_rows:
            chunk = self._buffer[0]
            k = int(np.searchsorted(np.cumsum(chunk.row_bytes), self.shard_bytes - used, side="right"))
            k = min(k, max_rows - rows)
            k = k if taken else max(k, 1)  # a shard holds at least one row, however small the budget
            if k >= len(chunk.ids):
                taken.append(self._buffer.pop(0))
            elif k > 0:
                head, self._buffer[0] = chunk.split(k)
                taken.append(head)
            else:
                break
            used += int(taken[-1].row_bytes.sum())
            rows += len(taken[-1].ids)
        self._buffered_bytes -= used
        self._buffered_rows -= rows
        return taken

    def _commit(self, chunks: list[_Chunk]) -> None:
        """Write the rows of `chunks` as one shard + sidecar, each atomically."""
        ids = [i for c in chunks for i in c.ids]
        lengths = np.concatenate([c.lengths for c in chunks])
        values, offsets = {}, {}
        for name, spec in self._specs.items():
            parts = [c.values[name] for c in chunks]
            values[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if spec.ragged:
                counts = np.concatenate([c.counts[name] for c in chunks])
                offsets[name] = np.zeros(len(counts) + 1, dtype=np.int64)
                np.cumsum(counts, out=offsets[name][1:])
        file = shard_name(self.writer_id, self._next_seq, self.shard_format)
        if self.shard_format == "zarr":
            objects = _zarr.encode_shard(self.fields, ids, lengths, values, offsets)
            size, digest = sum(map(len, objects.values())), _zarr.objects_hash(objects, HASH_ALGO)
            if self._store is not None:  # the objects, then the sidecar below: the commit on a store
                _zarr.upload_shard(self._store, file, objects)
            else:
                _zarr.write_shard(self.path / file, objects)
        else:
            size, digest = self._write_arrow(file, ids, lengths, values, offsets)
        info = ShardInfo(
            file=file, writer=self.writer_id, seq=self._next_seq, count=len(ids), bytes=size, hash=digest,
            first_id=ids[0], last_id=ids[-1], ids_hash=hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest(),
        )
        self._write_json(sidecar_name(file), {"format_version": self._identity["format_version"], **info.to_dict()})
        self.done_ids.update(ids)
        self._next_seq += 1
        self._last_commit = _clock()

    def _write_arrow(self, file: str, ids: list[str], lengths: np.ndarray, values: dict[str, np.ndarray],
                     offsets: dict[str, np.ndarray]) -> tuple[int, str]:
        """Write one Arrow IPC shard file atomically; return its size and content hash."""
        columns = [pa.array(ids, type=pa.large_string()), pa.array(lengths)]
        for name, spec in self._specs.items():
            flat = pa.array(values[name])
            if spec.ragged:
                columns.append(pa.LargeListArray.from_arrays(pa.array(offsets[name]), flat))
            elif spec.shape == ():
                columns.append(flat)
            else:
                columns.append(pa.FixedSizeListArray.from_arrays(flat, spec.size()))
        batch = pa.RecordBatch.from_arrays(columns, schema=self._schema)
        with self._shard_file(file) as f:
            sink = _HashingFile(f)
            with ipc.new_file(pa.PythonFile(sink, mode="w"), self._schema) as w:
                w.write_batch(batch)
        return sink.size, f"{HASH_ALGO}:{sink.hash.hexdigest()}"

    @contextlib.contextmanager
    def _shard_file(self, name: str) -> Iterator[BinaryIO]:
        """A shard's sink: an atomic local file, or a local temporary file uploaded whole once written."""
        if self._store is None:
            with atomic_file(self.path / name) as f:
                yield f
            return
        with tempfile.TemporaryDirectory(prefix="kd-upload-") as tmp:
            local = Path(tmp) / name
            with open(local, "wb") as f:
                yield f
            self._store.upload(local, name)

    def _write_json(self, name: str, obj: Any) -> None:
        if self._store is not None:
            self._store.write_json(name, obj)
        else:
            write_json_atomic(self.path / name, obj)

    # --- closing ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Commit every buffered row (as one shard, or several if it exceeds shard_bytes or commit_examples)."""
        while self._buffer:
            self._commit(self._take())

    def close(self, finalize: bool = True) -> Manifest | None:
        """Flush; with `finalize`, merge all writers' shards into manifest.json and return the manifest.

        Use `finalize=False` when several writers share the folder, then call `finalize_cache` once.
        Releases the lock. A folder this writer created that holds no shard after the flush is removed.
        """
        if self._closed:
            return None
        self._closed = True
        if self.complete:
            return load_manifest(self.path)
        try:
            self.flush()
            if finalize:
                return finalize_cache(self.path)  # still locked: no second writer starts before the manifest
            self._remove_if_unused()
            return None
        finally:
            self._release_lock()

    def abort(self) -> None:
        """Drop buffered rows without committing them and release the lock; committed shards stay for resume.

        A folder this writer created that holds no shard is removed: an error right after opening leaves nothing.
        """
        self._buffer.clear()
        self._buffered_bytes = 0
        self._buffered_rows = 0
        if not self._closed:
            self._closed = True
            self._remove_if_unused()
            self._release_lock()

    def _remove_if_unused(self) -> None:
        """Delete the folder if this writer created it and it holds nothing but pending.json and our lock."""
        if self._store is not None:
            if self._created and set(self._store.listdir()) <= {PENDING_NAME}:
                self._store.remove(PENDING_NAME)
            return
        if not self._created or self._lock is None:
            return
        ours = {PENDING_NAME, self._lock.file.name, self._lock.holder.name}
        if not set(os.listdir(self.path)) <= ours:  # shards, or another writer's lock: keep it
            return
        _unlink(self.path / PENDING_NAME)
        self._release_lock()
        for name in ours:
            _unlink(self.path / name)
        with contextlib.suppress(OSError):  # another writer created a file meanwhile: leave the folder
            self.path.rmdir()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- value preparation -------------------------------------------------------------------------

def _to_numpy(value: Any) -> tuple[np.ndarray, bool]:
    """(array, is_bf16_bits): torch tensors are converted here, at the edge; bf16 becomes its uint16 bits."""
    if isinstance(value, np.ndarray):
        return value, False
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16), True
        return t.numpy(), False
    return np.asarray(value), False


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and return the uint16 bit pattern."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _cast(spec: FieldSpec, arr: np.ndarray, bf16_bits: bool, where: str) -> np.ndarray:
    """Cast to the storage dtype, refusing lossy kind changes and out-of-range integers."""
    kind = arr.dtype.kind
    if spec.dtype == "bfloat16":
        if bf16_bits or arr.dtype == np.uint16:
            return arr.astype(np.uint16, copy=False)
        if kind in "fiub":
            return _bf16_bits(arr)
    elif spec.dtype in FLOAT_DTYPES:
        if kind in "fiub" and not bf16_bits:
            with np.errstate(over="ignore"):  # overflow to inf is reported by the finiteness check
                return arr.astype(spec.storage_dtype, copy=False)
    elif spec.dtype == "bool":
        if kind == "b":
            return arr.view(np.uint8)
    elif kind in "iub" and not bf16_bits:
        info = np.iinfo(spec.storage_dtype)
        if arr.size and kind != "b" and (arr.min() < info.min or arr.max() > info.max):
            raise CacheValueError(f"{where}: values outside the range of {spec.dtype} [{info.min}, {info.max}]")
        return arr.astype(spec.storage_dtype, copy=False)
    source = "bfloat16" if bf16_bits else str(arr.dtype)
    raise CacheValueError(f"{where}: dtype {source} cannot be stored as {spec.dtype}; cast it before appending")


# Exponent bits of each 16-bit float format: all ones means inf or NaN. Shifting out the sign and
# taking the max is ~4x faster than np.isfinite on float16 (which converts every value), and covers
# bf16 stored as uint16.
_EXPONENT_MASKS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def _nonfinite(spec: FieldSpec, flat: np.ndarray) -> np.ndarray:
    """Boolean mask of the NaN/inf values (the slow path, used only to name the bad example)."""
    if spec.dtype == "float32":
        return ~np.isfinite(flat)
    mask = np.uint16(_EXPONENT_MASKS[spec.dtype])
    return (flat.view(np.uint16) & mask) == mask


def _any_nonfinite(spec: FieldSpec, flat: np.ndarray) -> bool:
    if flat.size == 0:
        return False
    if spec.dtype == "float32":
        return not np.isfinite(flat).all()
    return int(np.left_shift(flat.view(np.uint16), 1).max()) >= _EXPONENT_MASKS[spec.dtype] << 1


def _prepare(spec: FieldSpec, value: Any, ids: list[str], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate one field of a batch; return its flat storage values and the count of values per row."""
    b = len(ids)
    where = f"field {spec.name!r} (batch starting with id {ids[0]!r})"
    n_t = spec.shape.count("T")
    per_t = spec.size(1)  # product of the fixed dims
    counts = per_t * lengths.astype(np.int64) ** n_t
    if isinstance(value, (list, tuple)):
        if len(value) != b:
            raise CacheValueError(f"{where}: got {len(value)} arrays for {b} ids")
        parts = []
        for i, item in enumerate(value):
            arr, bits = _to_numpy(item)
            expect = spec.resolve(int(lengths[i]))
            if arr.shape != expect:
                raise CacheValueError(
                    f"field {spec.name!r}, example {ids[i]!r}: shape {arr.shape} but the field is {spec.shape} "
                    f"= {expect} at length {int(lengths[i])}"
                )
            parts.append(_cast(spec, arr, bits, f"field {spec.name!r}, example {ids[i]!r}").reshape(-1))
        flat = np.concatenate(parts) if parts else np.zeros(0, spec.storage_dtype)
    else:
        arr, bits = _to_numpy(value)
        flat = _cast(spec, _flatten_batch(spec, arr, ids, lengths, where), bits, where)
        if np.may_share_memory(flat, arr):
            flat = flat.copy()  # the producer may reuse its buffer before the shard is written
    flat = np.ascontiguousarray(flat)
    if spec.dtype in FLOAT_DTYPES and _any_nonfinite(spec, flat):
        first = int(np.flatnonzero(_nonfinite(spec, flat))[0])
        row = int(np.searchsorted(np.cumsum(counts), first, side="right"))
        raise CacheValueError(
            f"field {spec.name!r}, example {ids[row]!r}: value is NaN or inf (or overflows {spec.dtype}); "
            "fix the teacher output or store the field in float32"
        )
    return flat, counts


def _flatten_batch(spec: FieldSpec, arr: np.ndarray, ids: list[str], lengths: np.ndarray, where: str) -> np.ndarray:
    b = len(ids)
    if arr.ndim != len(spec.shape) + 1 or arr.shape[0] != b:
        raise CacheValueError(f"{where}: shape {arr.shape} but expected [{b}, *{spec.shape}]")
    for axis, dim in enumerate(spec.shape, start=1):
        if dim != "T" and arr.shape[axis] != dim:
            raise CacheValueError(f"{where}: shape {arr.shape} but the field is {spec.shape} (axis {axis})")
        if dim == "T" and b and arr.shape[axis] < int(lengths.max()):
            i = int(np.argmax(lengths))
            raise CacheValueError(
                f"field {spec.name!r}, example {ids[i]!r}: length {int(lengths[i])} exceeds the padded size "
                f"{arr.shape[axis]}"
            )
    if not spec.ragged:
        return arr.reshape(-1)
    if spec.shape[0] == "T" and spec.shape.count("T") == 1:
        if arr.shape[1] == 0 or (lengths == arr.shape[1]).all():
            return arr.reshape(-1)  # nothing to strip: no copy
        mask = np.arange(arr.shape[1])[None, :] < lengths[:, None]
        return arr[mask].reshape(-1)  # token-major rows of every example, vectorised
    parts = []
    for i in range(b):
        cut = (i, *(slice(0, int(lengths[i])) if d == "T" else slice(None) for d in spec.shape))
        parts.append(arr[cut].reshape(-1))
    return np.concatenate(parts)


# --- folder scanning / finalize ------------------------------------------------------------------

def _is_cache_file(name: str) -> bool:
    return (
        name in (MANIFEST_NAME, PENDING_NAME)
        or name.startswith("shard-")
        or name.endswith(".partial")
        or bool(LOCK_RE.match(name))
    )


def _unlink(path: Path) -> None:
    """Delete a file, or a folder (a zarr shard, or its partial)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _algo(info: ShardInfo) -> str:
    return info.hash.partition(":")[0]


def _remote_hash(store: Store, info: ShardInfo) -> str:
    if _zarr.is_zarr(info.file):
        return _zarr.shard_hash(store.url_of(info.file), _algo(info))
    h = hashlib.new(_algo(info))
    h.update(store.read_bytes(info.file))
    return f"{_algo(info)}:{h.hexdigest()}"


def _check_kept_shard(info: ShardInfo, hash_now: Callable[[], str], where: str) -> None:
    """A resumed writer builds on the shards it committed before it stopped: each must still hash as its sidecar
    says, or the manifest written at the end would call a damaged cache complete."""
    if hash_now() != info.hash:
        raise CacheCorruptError(
            f"committed shard {where} was changed or damaged since it was written (its content hash differs from "
            f"its sidecar): delete it and its .json, then rerun precompute to redo its examples"
        )


def _committed_shards(folder: Path) -> list[ShardInfo]:
    """Shards whose sidecar exists (the sidecar is written after the shard: it is the shard's commit)."""
    return _parse_sidecars(os.listdir(folder), lambda name: read_json(folder / name), str(folder))


def _remote_committed_shards(store: Store, files: Mapping[str, int]) -> list[ShardInfo]:
    return _parse_sidecars(files, store.read_json, store.url)


def _parse_sidecars(names: Iterable[str], read: Callable[[str], Any], where: str) -> list[ShardInfo]:
    infos = []
    for name in sorted(names):
        if name.startswith("shard-") and name.endswith(".json"):
            data = read(name)
            try:
                info = ShardInfo.from_dict(data)
            except (KeyError, TypeError, ValueError) as e:
                raise CacheCorruptError(f"sidecar {where}/{name} is malformed ({e!r}): delete it and its shard, "
                                        "then rerun precompute to redo them") from e
            infos.append(info)
    return sorted(infos, key=lambda s: (s.writer, s.seq))


def finalize_cache(path: str | os.PathLike, expected_count: int | None = None) -> Manifest:
    """Merge every writer's committed shards into manifest.json (written last: the commit marker).

    Call once, after all writers have closed with `finalize=False`. Uncommitted leftovers (partial files,
    shards without sidecar) are deleted. Ids must be unique across writers. Idempotent on a finished cache.
    `path` may be a URL: the manifest is then uploaded last, and its presence is the commit.
    """
    folder = resolve(path)
    if isinstance(folder, Store):
        return _finalize_remote(folder, expected_count)
    if (folder / MANIFEST_NAME).exists():
        return load_manifest(folder)
    if not (folder / PENDING_NAME).exists():
        raise CacheIncompleteError(
            f"{folder} has no {PENDING_NAME}: no writer has opened it; run precompute to create the cache"
        )
    identity = read_json(folder / PENDING_NAME)
    for name in os.listdir(folder):
        if name.endswith(".partial") or (SHARD_RE.match(name) and not (folder / sidecar_name(name)).exists()):
            _unlink(folder / name)
    shards = _committed_shards(folder)
    count = _count_unique(shards, lambda info: _zarr.stored_size(folder / info.file),
                          lambda info: shard_ids(folder / info.file), lambda file: str(folder / file))
    _check_count(str(folder), count, expected_count)
    manifest = _new_manifest(identity, shards, count)
    write_json_atomic(folder / MANIFEST_NAME, manifest.to_dict())
    # A finished cache is opened without locks; drop the writers' lock files so they are not part of it.
    for name in os.listdir(folder):
        if LOCK_RE.match(name):
            _unlink(folder / name)
    return manifest


def _count_unique(shards: Sequence[ShardInfo], size_of: Callable[[ShardInfo], int | None],
                  ids_of: Callable[[ShardInfo], list[str]], where: Callable[[str], str]) -> int:
    """The number of examples in `shards`, after checking each shard's size against its sidecar and that no id
    is in two shards (writers must write disjoint ids)."""
    owner: dict[str, str] = {}
    for info in shards:
        size = size_of(info)
        if size != info.bytes:
            raise CacheCorruptError(
                f"shard {where(info.file)} has {size} bytes but its sidecar says {info.bytes}: delete the shard and "
                "its .json, then rerun precompute to redo it"
            )
        for i in ids_of(info):
            if i in owner:
                raise CacheValueError(
                    f"example id {i!r} is in both {owner[i]} and {info.file}: writers must write disjoint ids; "
                    f"delete one of the shards (and its .json) and rerun precompute"
                )
            owner[i] = info.file
    return len(owner)


def _check_count(where: str, count: int, expected_count: int | None) -> None:
    if expected_count is not None and count != expected_count:
        err = CacheIncompleteError if count < expected_count else CacheValueError
        raise err(
            f"{where} has {count} committed examples, expected {expected_count}: rerun precompute to resume "
            "the missing ones (or check the data)"
        )


def _new_manifest(identity: Mapping[str, Any], shards: Sequence[ShardInfo], count: int) -> Manifest:
    return Manifest(
        format_version=int(identity["format_version"]),
        teacher_fingerprint=identity["teacher_fingerprint"],
        data_fingerprint=identity["data_fingerprint"],
        settings=identity["settings"],
        fields=fields_from_list(identity["fields"]),
        shards=tuple(shards),
        count=count,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        library_version=_library_version(),
        shard_format=identity.get("shard_format", "arrow"),
    )


def _remote_ids(store: Store, name: str, nbytes: int) -> list[str]:
    if _zarr.is_zarr(name):
        return _zarr.ZarrShard(store.url_of(name), {}).id_list()
    return remote_shard_ids(store, name, nbytes)


def _finalize_remote(store: Store, expected_count: int | None) -> Manifest:
    """`finalize_cache` on an object store: the same checks, then the manifest is uploaded (the commit)."""
    files = store.listdir()
    if MANIFEST_NAME in files:
        return load_manifest(store.url)
    if PENDING_NAME not in files:
        raise CacheIncompleteError(
            f"{store.url} has no {PENDING_NAME}: no writer has opened it; run precompute to create the cache"
        )
    identity = store.read_json(PENDING_NAME)
    for name in files:
        if SHARD_RE.match(name) and sidecar_name(name) not in files:
            store.remove(name)
    shards = _remote_committed_shards(store, files)
    count = _count_unique(shards, lambda info: files.get(info.file),
                          lambda info: _remote_ids(store, info.file, info.bytes), store.url_of)
    _check_count(store.url, count, expected_count)
    manifest = _new_manifest(identity, shards, count)
    store.write_json(MANIFEST_NAME, manifest.to_dict())
    return manifest
