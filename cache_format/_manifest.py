"""Field specs, the manifest, and the atomic file helpers every cache file goes through."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cache_format.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheNotFoundError,
    CacheValueError,
    CacheVersionError,
)
from cache_format._fs import Store, resolve

FORMAT_VERSION = 1
# Version 2 = version 1 plus the manifest key `shard_format` (SPEC.md section 10): only zarr caches carry it,
# so readers that know version 1 only refuse them instead of misreading; Arrow caches stay version 1.
SUPPORTED_VERSIONS = (1, 2)
SHARD_FORMATS = ("arrow", "zarr")
SHARD_SUFFIXES = {"arrow": ".arrow", "zarr": ".zarr"}
MANIFEST_NAME = "manifest.json"
PENDING_NAME = "pending.json"
HASH_ALGO = "sha256"  # faster than blake2b on CPUs with SHA extensions (measured 1.7 vs 1.2 GB/s)

# Hard limits (SPEC.md gives the reason for each one).
MAX_ID_BYTES = 1024
MAX_RANK = 6
MAX_DIM = 2**31 - 1
MAX_LENGTH = 2**31 - 1
RESERVED_COLUMNS = ("id", "length")
CODECS = ("arrow",)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
_WRITER_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
SHARD_RE = re.compile(r"^shard-(?P<writer>[A-Za-z0-9]{1,32})-(?P<seq>\d{6,})\.(arrow|zarr)$")
# A writer's lock file and the JSON naming its holder (host, pid, start): present only while unfinished.
LOCK_RE = re.compile(r"^writer-[A-Za-z0-9]{1,32}\.(lock|holder\.json)$")

# Storage dtype in the shard file for each logical dtype: Arrow has no bf16 and packs bools
# into bits (not zero-copy), so both are stored as same-width unsigned integers.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": np.dtype("uint16"),
    "int8": np.dtype("int8"),
    "int16": np.dtype("int16"),
    "int32": np.dtype("int32"),
    "int64": np.dtype("int64"),
    "uint8": np.dtype("uint8"),
    "uint16": np.dtype("uint16"),
    "uint32": np.dtype("uint32"),
    "bool": np.dtype("uint8"),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class FieldSpec:
    """One per-example value: `shape` uses the symbol "T" for the example's token length."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    codec: str = "arrow"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name) or len(self.name) > 128:
            raise CacheValueError(
                f"field name {self.name!r} is invalid: use lowercase letters, digits, '_' and '.' "
                "(e.g. 'hidden.6'), at most 128 characters"
            )
        if self.name in RESERVED_COLUMNS:
            raise CacheValueError(f"field name {self.name!r} is reserved (every example stores it): rename the field")
        if self.dtype not in STORAGE_DTYPES:
            raise CacheValueError(
                f"field {self.name!r}: dtype {self.dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}"
            )
        if len(self.shape) > MAX_RANK:
            raise CacheValueError(f"field {self.name!r}: rank {len(self.shape)} exceeds the limit {MAX_RANK}")
        for dim in self.shape:
            ok_int = isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and 0 < dim <= MAX_DIM
            if not (ok_int or dim == "T"):
                raise CacheValueError(
                    f"field {self.name!r}: shape {self.shape!r} has dimension {dim!r}; "
                    f"use positive ints (<= {MAX_DIM}) or 'T' for the token length"
                )
        object.__setattr__(self, "shape", tuple(d if d == "T" else int(d) for d in self.shape))
        if self.codec not in CODECS:
            raise CacheValueError(f"field {self.name!r}: codec {self.codec!r} is unknown; use one of {CODECS}")

    @property
    def ragged(self) -> bool:
        """True when the shape depends on the example's length."""
        return "T" in self.shape

    @property
    def storage_dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.dtype]

    def resolve(self, length: int) -> tuple[int, ...]:
        """The concrete shape for an example of `length` tokens."""
        return tuple(length if d == "T" else d for d in self.shape)

    def size(self, length: int = 0) -> int:
        """Number of values for an example of `length` tokens."""
        return math.prod(self.resolve(length))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "codec": self.codec}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FieldSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d.get("codec", "arrow"))


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard file, as its sidecar and the manifest record it."""

    file: str
    writer: str
    seq: int
    count: int
    bytes: int
    hash: str
    first_id: str
    last_id: str
    ids_hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "writer": self.writer,
            "seq": self.seq,
            "count": self.count,
            "bytes": self.bytes,
            "hash": self.hash,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "ids_hash": self.ids_hash,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardInfo:
        return cls(
            str(d["file"]), str(d["writer"]), int(d["seq"]), int(d["count"]), int(d["bytes"]),
            str(d["hash"]), str(d["first_id"]), str(d["last_id"]), str(d["ids_hash"]),
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of a finished cache."""

    format_version: int
    teacher_fingerprint: str
    data_fingerprint: str
    settings: Mapping[str, Any]
    fields: tuple[FieldSpec, ...]
    shards: tuple[ShardInfo, ...]
    count: int
    created: str
    library_version: str
    hash_algo: str = HASH_ALGO
    shard_format: str = "arrow"

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.shard_format == "arrow" else {"shard_format": self.shard_format}
        return {
            "format_version": self.format_version,
            "teacher_fingerprint": self.teacher_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "settings": dict(self.settings),
            "fields": [f.to_dict() for f in self.fields],
            "count": self.count,
            "hash_algo": self.hash_algo,
            "shards": [s.to_dict() for s in self.shards],
            "created": self.created,
            "library_version": self.library_version,
            **extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "manifest") -> Manifest:
        version = d.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise CacheVersionError(
                f"{where} has format_version {version!r}; this kd-pipeline reads {list(SUPPORTED_VERSIONS)}: "
                "upgrade kd-pipeline or rerun precompute into a new folder"
            )
        unknown = sorted({f.get("codec") for f in d.get("fields", []) if isinstance(f, Mapping)} - {*CODECS, None})
        if unknown:
            raise CacheVersionError(
                f"{where} uses field codecs {unknown} that this kd-pipeline cannot read (it knows {list(CODECS)}): "
                "upgrade kd-pipeline"
            )
        shard_format = d.get("shard_format", "arrow")
        if shard_format not in SHARD_FORMATS:
            raise CacheVersionError(
                f"{where} has shard_format {shard_format!r}; this kd-pipeline reads {list(SHARD_FORMATS)}: "
                "upgrade kd-pipeline"
            )
        try:
            return cls(
                format_version=int(version),
                teacher_fingerprint=str(d["teacher_fingerprint"]),
                data_fingerprint=str(d["data_fingerprint"]),
                settings=dict(d["settings"]),
                fields=tuple(FieldSpec.from_dict(f) for f in d["fields"]),
                shards=tuple(ShardInfo.from_dict(s) for s in d["shards"]),
                count=int(d["count"]),
                created=str(d["created"]),
                library_version=str(d["library_version"]),
                hash_algo=str(d.get("hash_algo", HASH_ALGO)),
                shard_format=shard_format,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheCorruptError(f"{where} is malformed ({e!r}): rerun precompute into a new folder") from e

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def canonical_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON would give them back (tuples become lists), so comparisons are stable."""
    if not isinstance(settings, Mapping):
        raise CacheValueError(f"settings must be a mapping, got {type(settings).__name__}")
    try:
        return json.loads(json.dumps(dict(settings), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise CacheValueError(
            f"settings must be JSON-serialisable (str keys; str/int/float/bool/None/list/dict values): {e}"
        ) from e


def check_writer_id(writer_id: str) -> str:
    if not isinstance(writer_id, str) or not _WRITER_RE.match(writer_id):
        raise CacheValueError(
            f"writer_id {writer_id!r} is invalid: use 1-32 ASCII letters or digits (it is part of shard file names)"
        )
    return writer_id


def format_version_of(shard_format: str) -> int:
    """The format_version a cache of this shard format is written with (old readers refuse zarr caches)."""
    return FORMAT_VERSION if shard_format == "arrow" else 2


def shard_name(writer: str, seq: int, shard_format: str = "arrow") -> str:
    return f"shard-{writer}-{seq:06d}{SHARD_SUFFIXES[shard_format]}"


def sidecar_name(shard_file: str) -> str:
    return shard_file.rsplit(".", 1)[0] + ".json"


def lock_name(writer: str) -> str:
    return f"writer-{writer}.lock"


def holder_name(writer: str) -> str:
    return f"writer-{writer}.holder.json"


# --- atomic files -----------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write `path` via `<name>.<uuid>.partial` + fsync + os.replace; the partial is removed on any error."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:  # KeyboardInterrupt included: never leave a partial behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a small file atomically (partial + fsync + rename): readers see the old or the new bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text (metrics, split records, small JSON files)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def file_hash(path: str | os.PathLike, algo: str = HASH_ALGO) -> str:
    """`<algo>:<hexdigest>` of a file's bytes, read in 8 MiB blocks (the one file hasher of the project)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False).encode("utf-8") + b"\n")


def create_json_exclusive(path: Path, obj: Any) -> bool:
    """Create `path` with `obj` only if it does not exist yet (atomic across processes); True if created."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(json.dumps(obj, indent=1).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(partial, path)  # fails if another process created it first
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def read_json(path: Path) -> Any:
    """Parse a cache JSON file; bytes that are not UTF-8 JSON raise CacheCorruptError naming the file."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # json.loads(bytes) decodes first
        raise CacheCorruptError(
            f"{path} is not valid UTF-8 JSON ({e}): delete the folder and rerun precompute"
        ) from e


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate `path/manifest.json` with the error classes the reader documents (path may be a URL)."""
    folder = resolve(path)
    if isinstance(folder, Store):
        return _load_remote_manifest(folder)
    if not folder.is_dir():
        raise CacheNotFoundError(f"no cache folder at {folder}: check the path or run precompute to create it")
    mpath = folder / MANIFEST_NAME
    if not mpath.is_file():
        raise CacheIncompleteError(
            f"{folder} has no {MANIFEST_NAME}: precompute did not finish; rerun precompute with the same "
            "settings to resume it"
        )
    data = read_json(mpath)
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{mpath} is not a JSON object: delete the folder and rerun precompute")
    return Manifest.from_dict(data, where=str(mpath))


def _load_remote_manifest(store: Store) -> Manifest:
    try:
        data = store.read_json(MANIFEST_NAME)
    except FileNotFoundError:
        if not store.listdir():
            raise CacheNotFoundError(f"no cache at {store.url}: check the URL or run precompute to create it") from None
        raise CacheIncompleteError(
            f"{store.url} has no {MANIFEST_NAME}: precompute did not finish; rerun precompute with the same "
            "settings to resume it"
        ) from None
    if not isinstance(data, dict):
        raise CacheCorruptError(f"{store.url_of(MANIFEST_NAME)} is not a JSON object: delete the folder and rerun "
                                "precompute")
    return Manifest.from_dict(data, where=store.url_of(MANIFEST_NAME))


def fields_from_list(items: Sequence[Mapping[str, Any]]) -> tuple[FieldSpec, ...]:
    return tuple(FieldSpec.from_dict(f) for f in items)


def check_fields(fields: Sequence[FieldSpec]) -> tuple[FieldSpec, ...]:
    fields = tuple(fields)
    if not all(isinstance(f, FieldSpec) for f in fields):
        raise CacheValueError("fields must be FieldSpec instances, e.g. FieldSpec('logits', 'float16', (2,))")
    names = [f.name for f in fields]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CacheValueError(f"field names must be unique; repeated: {dup}")
    return fields


__all__ = ["FieldSpec", "Manifest", "ShardInfo", "FORMAT_VERSION"]
