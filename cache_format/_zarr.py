"""Zarr v3 shards (`shard_format: zarr`): one group per shard, written whole from memory, read lazily.

SPEC.md section 10 gives the layout. A shard is encoded into an in-memory store first, so its objects,
their total size and their content hash are known before anything is published; a local shard is then
written as `<name>.<uuid>.partial/` (every file fsynced) and renamed to `<name>` (atomic); on an object store
it is uploaded through the cache's `_fs.Store` (no rename there: the sidecar written after it is the commit).

`location` is a local path or an fsspec URL (`s3://bucket/cache/shard-0-000000.zarr`, `memory://...`);
URLs need fsspec and the store's package (s3fs, gcsfs). zarr is imported on first use, and array handles
are opened lazily in each process: handles inherited through a fork are never used (their I/O thread or
network session belongs to the parent).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cache_format.errors import CacheCorruptError, CacheValueError
from cache_format._manifest import FieldSpec, _fsync_dir

SUFFIX = ".zarr"
# Rows per inner chunk aim at this many uncompressed bytes: the decode unit of a random read. Smaller chunks
# read less per example but cost more per-chunk overhead (and index entries); see bench/cache_formats.py.
INNER_CHUNK_BYTES = 128 << 10
_MAX_SLICES = 4  # contiguous runs of rows read one slice each; more runs are read with one index array


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as e:  # a dependency of kd-pipeline; missing only in a broken install
        raise CacheValueError(f"this cache uses the zarr shard format but zarr is not installed ({e}): "
                              "pip install 'zarr>=3.1,<4'") from e
    return zarr


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def _join(location: str | os.PathLike, key: str) -> str:
    return f"{str(location).rstrip('/')}/{key}"


# --- writing ---------------------------------------------------------------------------------------

def _compressor() -> Any:
    from zarr.codecs import BloscCodec

    # Byte shuffle + zstd at level 1: the best ratio and decode speed measured on fp16 (CACHE-NOTES).
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def _add_array(group: Any, name: str, data: np.ndarray, attributes: Mapping[str, Any]) -> None:
    row_bytes = max(1, int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize)
    rows = max(1, INNER_CHUNK_BYTES // row_bytes)
    chunks = (rows, *data.shape[1:])
    # One zarr shard (object) holds the whole array: few objects per cache shard, ranged reads inside it.
    outer = (max(rows, -(-data.shape[0] // rows) * rows), *data.shape[1:])
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, shards=outer,
                             compressors=_compressor(), fill_value=0, attributes=dict(attributes))
    if data.size:
        arr[...] = data


def encode_shard(
    fields: Sequence[FieldSpec],
    ids: Sequence[str],
    lengths: np.ndarray,
    values: Mapping[str, np.ndarray],
    offsets: Mapping[str, np.ndarray],
) -> dict[str, bytes]:
    """The shard's objects (key -> bytes): flat storage values per field, (N+1) int64 offsets for ragged ones."""
    zarr = _zarr()
    from zarr.storage import MemoryStore

    objects: dict[str, Any] = {}
    group = zarr.create_group(MemoryStore(objects), zarr_format=3, attributes={"count": len(ids)})
    encoded = [i.encode("utf-8") for i in ids]
    id_offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=id_offsets[1:])
    _add_array(group, "id/values", np.frombuffer(b"".join(encoded), dtype=np.uint8), {})
    _add_array(group, "id/offsets", id_offsets, {})
    _add_array(group, "length", np.asarray(lengths, dtype=np.int32), {})
    for spec in fields:
        attrs = {"dtype": spec.dtype, "shape": list(spec.shape)}  # bf16/bool: the logical dtype of uint16/uint8
        flat = values[spec.name]
        if spec.ragged:
            # (values / r, r) with r the fixed part of the shape: a token per row for ("T", ...) fields.
            r = spec.size(1)
            _add_array(group, f"{spec.name}/values", flat.reshape(-1, r), attrs)
            _add_array(group, f"{spec.name}/offsets", offsets[spec.name], {})
        else:
            _add_array(group, spec.name, flat.reshape((len(ids), *spec.shape)), attrs)
    return {key: buf.to_bytes() for key, buf in objects.items()}


def objects_hash(objects: Mapping[str, bytes] | Iterable[tuple[str, bytes]], algo: str) -> str:
    """`<algo>:<hex>` over the objects in key order: key, NUL, 8-byte size, bytes (what verify recomputes)."""
    items = sorted(objects.items()) if isinstance(objects, Mapping) else objects
    h = hashlib.new(algo)
    for key, data in items:
        h.update(key.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return f"{algo}:{h.hexdigest()}"


def write_shard(location: str | os.PathLike, objects: Mapping[str, bytes]) -> None:
    """Write encoded objects as the shard folder `location` on a local disk, atomically (partial folder + rename)."""
    final = Path(location)
    partial = final.with_name(f"{final.name}.{uuid.uuid4().hex}.partial")
    try:
        folders = {partial}
        for key in objects:
            parent = (partial / key).parent
            parent.mkdir(parents=True, exist_ok=True)
            folders.update(p for p in (parent, *parent.parents) if partial in p.parents or p == partial)
        # Concurrent fsyncs share journal commits: 3-5x faster than one after the other for a shard's ~15 files.
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(_write_synced, [partial / k for k in objects], objects.values()))
            list(pool.map(_fsync_dir, folders))
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _fsync_dir(final.parent)


def upload_shard(store: Any, name: str, objects: Mapping[str, bytes]) -> None:
    """Upload a shard's objects to `name` in a cache folder on an object store (`_fs.Store`), concurrently.

    Objects of an earlier upload of the same name that was cut short (no sidecar) are removed first, so none
    is left over to change the shard's size and hash.
    """
    store.remove(name)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda item: store.write_bytes(f"{name}/{item[0]}", item[1]), objects.items()))


def _write_synced(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _url_fs(location: str | os.PathLike) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(str(location))


# --- size and hash of a stored shard ---------------------------------------------------------------

def _stored_objects(location: str | os.PathLike) -> list[str]:
    """Keys of the shard's objects (relative, `/`-separated), sorted."""
    if is_url(location):
        fs, root = _url_fs(location)
        root = root.rstrip("/")
        return sorted(p[len(root) + 1 :] for p in fs.find(root))
    base = Path(location)
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def _read_object(location: str | os.PathLike, key: str) -> bytes:
    if is_url(location):
        fs, root = _url_fs(location)
        return fs.cat_file(_join(root, key))
    return (Path(location) / key).read_bytes()


def shard_size(location: str | os.PathLike) -> int | None:
    """Total bytes of a stored zarr shard's objects; None when there is no shard there."""
    if is_url(location):
        fs, root = _url_fs(location)
        sizes = fs.du(root, total=False) if fs.exists(root) else {}
        return sum(sizes.values()) if sizes else None
    base = Path(location)
    if not base.is_dir():
        return None
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())


def shard_hash(location: str | os.PathLike, algo: str) -> str:
    """The content hash of a stored zarr shard, as `objects_hash` computed it at write time."""
    keys = _stored_objects(location)
    return objects_hash(((k, _read_object(location, k)) for k in keys), algo)


# --- reading ---------------------------------------------------------------------------------------

class Rows:
    """Some rows of a shard, copied out of it, in the layout of an Arrow shard's columns (see _reader._Shard)."""

    def __init__(self, lengths: np.ndarray, values: dict[str, np.ndarray], offsets: dict[str, np.ndarray]) -> None:
        self.n = len(lengths)
        self.lengths = lengths
        self.values = values
        self.offsets = offsets


class ZarrShard:
    """One zarr shard: ids, lengths and offsets in memory; field values read on demand, per process."""

    def __init__(self, location: str | os.PathLike, fields: Mapping[str, FieldSpec]) -> None:
        self.location = location
        self.fields = dict(fields)
        self._group: Any = None
        self._arrays: dict[str, Any] = {}
        self._pid: int | None = None
        try:
            group = self._open()
            self.n = int(group.attrs["count"])
            self.lengths = group["length"][...]
            id_values = group["id/values"][...].tobytes()
            id_offsets = group["id/offsets"][...]
            self.offsets = {n: group[f"{n}/offsets"][...] for n, s in self.fields.items() if s.ragged}
            self._check(group)
        except CacheCorruptError:
            raise
        except Exception as e:  # any zarr/json/IO failure: the shard is not what the manifest describes
            raise CacheCorruptError(f"shard {location} cannot be read as a zarr shard ({e!r}): run "
                                    f"`kd cache verify` on its folder, then rerun precompute into a new folder") from e
        self._ids = [id_values[a:b].decode("utf-8") for a, b in zip(id_offsets[:-1].tolist(), id_offsets[1:].tolist())]

    def _open(self) -> Any:
        """The group handle of this process (reopened after a fork)."""
        if self._pid != os.getpid():
            zarr = _zarr()
            if is_url(self.location):
                self._group = zarr.open_group(str(self.location), mode="r")
            else:
                from zarr.storage import LocalStore

                self._group = zarr.open_group(LocalStore(Path(self.location), read_only=True), mode="r")
            self._arrays = {}
            self._pid = os.getpid()
        return self._group

    def _check(self, group: Any) -> None:
        problems = []
        if self.lengths.shape != (self.n,) or self.lengths.dtype != np.int32:
            problems.append("length")
        for name, spec in self.fields.items():
            if spec.ragged:
                arr = group[f"{name}/values"]
                off = self.offsets[name]
                ok = (arr.ndim == 2 and arr.shape[1] == spec.size(1) and off.shape == (self.n + 1,)
                      and off.dtype == np.int64 and int(off[-1]) == arr.shape[0] * spec.size(1))
            else:
                arr = group[name]
                ok = arr.shape == (self.n, *spec.shape)
            if not ok or arr.dtype != spec.storage_dtype or arr.attrs.get("dtype") != spec.dtype:
                problems.append(name)
        if problems:
            raise CacheCorruptError(f"shard {self.location}: arrays {problems} do not match the manifest's fields "
                                    "(dtype, shape or offsets): rerun precompute into a new folder")

    def id_list(self) -> list[str]:
        return list(self._ids)

    def array(self, name: str) -> Any:
        """The zarr array of a field (its values, for a ragged field)."""
        group = self._open()
        if name not in self._arrays:  # opening an array reads its metadata: once per process
            self._arrays[name] = group[f"{name}/values" if self.fields[name].ragged else name]
        return self._arrays[name]

    def take(self, rows: np.ndarray, names: Iterable[str]) -> Rows:
        """Rows `rows` (sorted, unique) of fields `names`: one orthogonal read per field."""
        rows = np.asarray(rows, dtype=np.int64)
        values, offsets = {}, {}
        for name in names:
            spec = self.fields[name]
            arr = self.array(name)
            if not spec.ragged:
                values[name] = _read_rows(arr, rows, rows + 1)
                continue
            r = spec.size(1)
            off = self.offsets[name]
            start, stop = off[rows] // r, off[rows + 1] // r
            counts = stop - start
            values[name] = _read_rows(arr, start, stop).reshape(-1)
            new_off = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(counts * r, out=new_off[1:])
            offsets[name] = new_off
        return Rows(self.lengths[rows], values, offsets)

    def field_nbytes(self, name: str) -> int:
        """Uncompressed bytes of a field's values in this shard."""
        return int(self.array(name).nbytes)


def _read_rows(arr: Any, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Rows start[i]:stop[i] of a zarr array, concatenated (ranges sorted and disjoint)."""
    counts = stop - start
    total = int(counts.sum())
    if total == 0:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    # Adjacent ranges merge into runs; a few runs are read as slices, which zarr reads several times faster
    # than an index array (sequential batches are one run). Many runs: one orthogonal read of every row.
    breaks = np.flatnonzero(start[1:] != stop[:-1]) + 1
    run_start, run_stop = start[np.r_[0, breaks]], stop[np.r_[breaks - 1, len(stop) - 1]]
    if len(run_start) <= _MAX_SLICES:
        parts = [arr[int(a) : int(b)] for a, b in zip(run_start, run_stop) if b > a]
        return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
    # The row indices of every range, concatenated: start_i, start_i+1, ..., stop_i - 1.
    idx = np.repeat(start - np.cumsum(counts) + counts, counts) + np.arange(total, dtype=np.int64)
    return np.ascontiguousarray(arr.oindex[idx])


def take_groups(
    shards: Sequence[ZarrShard], groups: list, row_of: np.ndarray, names: Iterable[str]
) -> tuple[dict[int, Rows], np.ndarray]:
    """Read the rows a batch needs from each shard; return them per shard and each example's row among them."""
    names = list(names)
    taken: dict[int, Rows] = {}
    new_row_of = np.empty_like(row_of)
    for s, sel in groups:
        unique, inverse = np.unique(row_of[sel], return_inverse=True)
        taken[s] = shards[s].take(unique, names)
        new_row_of[sel] = inverse.reshape(-1)
    return taken, new_row_of


# --- either format ---------------------------------------------------------------------------------

def is_zarr(name: str | os.PathLike) -> bool:
    return str(name).rstrip("/").endswith(SUFFIX)


def stored_size(location: str | os.PathLike) -> int | None:
    """Bytes of a stored shard of either format (a file, or a zarr shard's objects); None when absent."""
    if is_zarr(location):
        return shard_size(location)
    path = Path(location)
    return path.stat().st_size if path.is_file() else None


def stored_hash(location: str | os.PathLike, algo: str) -> str:
    """Content hash of a stored shard of either format, as its manifest records it."""
    from cache_format._manifest import file_hash

    return shard_hash(location, algo) if is_zarr(location) else file_hash(location, algo)
