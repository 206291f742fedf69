"""Inspection tools behind `kd cache info | verify | ls`."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache_format import _zarr
from cache_format.errors import CacheError, CacheNotFoundError
from cache_format._fs import Store, join, resolve
from cache_format._manifest import (
    FLOAT_DTYPES,
    LOCK_RE,
    MANIFEST_NAME,
    PENDING_NAME,
    Manifest,
    load_manifest,
    read_json,
    sidecar_name,
)
from cache_format._reader import arrow_schema, open_shard


def human_bytes(n: float) -> str:
    """A byte count for people: `512 B`, `1.5 KiB`, `3.2 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _folder_bytes(folder: Path | Store) -> int:
    if isinstance(folder, Store):
        return sum(folder.listdir().values())
    return sum(_zarr.stored_size(p) or 0 for p in folder.iterdir() if p.is_file() or _zarr.is_zarr(p))


def _where(folder: Path | Store) -> str:
    return folder.url if isinstance(folder, Store) else str(folder)


def _read_json(folder: Path | Store, name: str) -> Any:
    return folder.read_json(name) if isinstance(folder, Store) else read_json(folder / name)


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a finished cache: fingerprints, settings, count, fields, bytes on disk and per example.

    `tokens` is the sum of the examples' lengths (the ragged axis "T"), and `bytes_per_token` the bytes of one
    position summed over the fields stored once per position (shape ("T", ...)); None when no field is.
    """
    folder = resolve(path)
    manifest = load_manifest(path)
    field_bytes = {f.name: 0 for f in manifest.fields}
    tokens = 0
    for info in manifest.shards:
        if manifest.shard_format == "zarr":
            shard = _zarr.ZarrShard(join(_where(folder), info.file), {f.name: f for f in manifest.fields})
            tokens += int(shard.lengths.sum())
            for f in manifest.fields:  # the values' uncompressed bytes (plus the offsets), as for Arrow
                field_bytes[f.name] += shard.field_nbytes(f.name) + shard.offsets.get(f.name, np.zeros(0)).nbytes
            continue
        if isinstance(folder, Store):  # the metadata, ids, lengths and offsets: not the values
            from cache_format._remote import RemoteShard

            batch = RemoteShard(folder, info.file, info.bytes).batch
        else:
            batch = open_shard(folder / info.file)
        tokens += int(batch.column("length").to_numpy().sum())
        for f in manifest.fields:
            field_bytes[f.name] += batch.column(f.name).nbytes
    per_token = [f for f in manifest.fields if f.shape[:1] == ("T",) and f.shape.count("T") == 1]
    n = max(manifest.count, 1)
    return {
        "path": _where(folder),
        "format_version": manifest.format_version,
        "shard_format": manifest.shard_format,
        "teacher_fingerprint": manifest.teacher_fingerprint,
        "data_fingerprint": manifest.data_fingerprint,
        "settings": dict(manifest.settings),
        "count": manifest.count,
        "shards": len(manifest.shards),
        "bytes_on_disk": _folder_bytes(folder),
        "tokens": tokens,
        "bytes_per_token": sum(f.size(1) * f.storage_dtype.itemsize for f in per_token) if per_token else None,
        "fields": [
            {**f.to_dict(), "bytes": field_bytes[f.name], "bytes_per_example": field_bytes[f.name] / n}
            for f in manifest.fields
        ],
        "created": manifest.created,
        "library_version": manifest.library_version,
    }


@dataclass
class VerifyReport:
    """Outcome of `verify_cache`: `ok` is False when `problems` (one line each) is not empty."""

    path: str
    count: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(path: str | os.PathLike) -> VerifyReport:
    """Check every shard (size, hash, columns, counts), ids unique, float values finite, no stray files.

    On an object store each shard is downloaded to a temporary file, checked there and deleted.
    """
    folder = resolve(path)
    names = folder.listdir() if isinstance(folder, Store) else None
    if not (names if names is not None else folder.is_dir()):
        raise CacheNotFoundError(f"no cache folder at {_where(folder)}: check the path")
    report = VerifyReport(_where(folder))
    try:
        manifest = load_manifest(path)
    except CacheError as e:
        report.problems.append(str(e))
        return report
    report.count, report.shards = manifest.count, len(manifest.shards)
    listed = {s.file for s in manifest.shards} | {sidecar_name(s.file) for s in manifest.shards}
    for name in sorted(names if names is not None else os.listdir(folder)):
        # A writer's lock files are harmless leftovers (e.g. of a finalize that was killed right after the manifest).
        if name not in listed and name not in (MANIFEST_NAME, PENDING_NAME) and not LOCK_RE.match(name):
            report.problems.append(f"{name}: file not listed in the manifest (leftover or foreign file)")
    seen: set[str] = set()
    schema = arrow_schema(manifest.fields)
    if isinstance(folder, Store):
        rows = [_verify_remote_shard(folder, names, manifest, info, schema, seen, report.problems)
                for info in manifest.shards]
    else:
        rows = [_verify_shard(folder, manifest, info, schema, seen, report.problems) for info in manifest.shards]
    # The total is only known when every shard could be read; unreadable ones are reported above.
    if None not in rows and sum(rows) != manifest.count:
        report.problems.append(f"manifest count {manifest.count} but the shards hold {sum(rows)} examples")
    return report


def _verify_shard(
    folder: Path | str, manifest: Manifest, info: Any, schema: Any, seen: set, problems: list
) -> int | None:
    """Append the shard's problems; return its row count, or None when it could not be read."""
    file = join(folder, info.file)
    size = _zarr.stored_size(file)
    if size is None:
        problems.append(f"{info.file}: missing")
        return None
    if size != info.bytes:
        problems.append(f"{info.file}: {size} bytes, manifest says {info.bytes}")
        return None
    if _zarr.stored_hash(file, manifest.hash_algo) != info.hash:
        problems.append(f"{info.file}: content hash differs from the manifest (corrupt)")
        return None
    try:
        n, ids, lengths, columns = _shard_contents(file, manifest, schema)
    except CacheError as e:
        problems.append(f"{info.file}: unreadable ({e})")
        return None
    if columns is None:
        problems.append(f"{info.file}: columns differ from the manifest's fields")
        return n
    if n != info.count:
        problems.append(f"{info.file}: {n} rows, manifest says {info.count}")
    dups = [i for i in ids if i in seen]
    if dups or len(set(ids)) != len(ids):
        problems.append(f"{info.file}: duplicate ids, e.g. {(dups or ids)[:3]!r}")
    seen.update(ids)
    if (lengths < 0).any():
        problems.append(f"{info.file}: negative lengths")
    for spec in manifest.fields:
        values, offsets = columns[spec.name]
        if spec.ragged:
            counts = np.diff(offsets)
            expect = spec.size(1) * lengths.astype(np.int64) ** spec.shape.count("T")
            if not np.array_equal(counts, expect):
                problems.append(f"{info.file}: field {spec.name!r} value counts disagree with lengths")
        if spec.dtype in FLOAT_DTYPES:
            bad = ((values & 0x7F80) == 0x7F80) if spec.dtype == "bfloat16" else ~np.isfinite(values)
            if bad.any():
                problems.append(f"{info.file}: field {spec.name!r} has {int(bad.sum())} NaN/inf values")
    return n


def _shard_contents(file: Path, manifest: Manifest, schema: Any) -> tuple[int, list, np.ndarray, dict | None]:
    """(rows, ids, lengths, {field: (flat values, offsets or None)}) of a shard; None columns if they differ."""
    if manifest.shard_format == "zarr":
        shard = _zarr.ZarrShard(file, {f.name: f for f in manifest.fields})  # checks arrays against the fields
        rows = shard.take(np.arange(shard.n), shard.fields)
        return shard.n, shard.id_list(), shard.lengths, {
            f.name: (rows.values[f.name].reshape(-1), rows.offsets.get(f.name)) for f in manifest.fields}
    batch = open_shard(file)
    if not batch.schema.remove_metadata().equals(schema):
        return batch.num_rows, [], np.zeros(0), None
    columns = {}
    for spec in manifest.fields:
        col = batch.column(spec.name)
        if spec.ragged:
            columns[spec.name] = (col.values.to_numpy(), col.offsets.to_numpy())
        else:
            columns[spec.name] = (col.flatten().to_numpy() if spec.shape else col.to_numpy(), None)
    return batch.num_rows, batch.column("id").to_pylist(), batch.column("length").to_numpy(), columns


def _verify_remote_shard(
    store: Store, names: dict[str, int], manifest: Manifest, info: Any, schema: Any, seen: set, problems: list
) -> int | None:
    """`_verify_shard` on a downloaded copy of the shard (deleted afterwards)."""
    if info.file not in names:
        problems.append(f"{info.file}: missing")
        return None
    if manifest.shard_format == "zarr":  # read in place: zarr reads URLs (and the hash reads every object once)
        return _verify_shard(store.url, manifest, info, schema, seen, problems)
    with tempfile.TemporaryDirectory(prefix="kd-verify-") as tmp:
        store.download(info.file, Path(tmp) / info.file)
        return _verify_shard(Path(tmp), manifest, info, schema, seen, problems)


def list_caches(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished and unfinished caches under `root` (not descending into caches), sorted by path; root may be a URL."""
    where = resolve(root)
    if isinstance(where, Store):
        walk = where.walk()
    else:
        if not where.is_dir():
            raise CacheNotFoundError(f"no folder at {where}: check the cache root")
        walk = ((Path(dirpath), dirnames, filenames) for dirpath, dirnames, filenames in os.walk(where))
    found = []
    for folder, dirnames, filenames in walk:
        if isinstance(folder, str) and (MANIFEST_NAME in filenames or PENDING_NAME in filenames):
            folder = Store(folder)
        if MANIFEST_NAME in filenames:
            found.append(_describe_finished(folder))
            dirnames.clear()
        elif PENDING_NAME in filenames:
            found.append(_describe_unfinished(folder, filenames))
            dirnames.clear()
        else:
            dirnames.sort()
    return sorted(found, key=lambda d: d["path"])


def _describe_finished(folder: Path | Store) -> dict[str, Any]:
    try:
        m = load_manifest(folder if isinstance(folder, Path) else folder.url)
    except CacheError as e:
        return {"path": _where(folder), "status": "unreadable", "teacher": None, "data": None, "count": None,
                "bytes": _folder_bytes(folder), "error": str(e)}
    return {"path": _where(folder), "status": "finished", "teacher": m.teacher_fingerprint,
            "data": m.data_fingerprint, "count": m.count, "bytes": _folder_bytes(folder)}


def _describe_unfinished(folder: Path | Store, filenames: list[str]) -> dict[str, Any]:
    try:
        pending = _read_json(folder, PENDING_NAME)
    except CacheError:
        pending = {}
    count = 0
    for name in filenames:
        if name.startswith("shard-") and name.endswith(".json"):
            try:
                count += int(_read_json(folder, name)["count"])
            except (CacheError, KeyError, TypeError, ValueError):
                continue
    return {"path": _where(folder), "status": "unfinished", "teacher": pending.get("teacher_fingerprint"),
            "data": pending.get("data_fingerprint"), "count": count, "bytes": _folder_bytes(folder)}
