"""The teacher-output cache: an on-disk, content-keyed store of per-example teacher outputs.

See SPEC.md (next to this file) for the format. No model code lives here. Other packages import the names
below, never a `cache_format._*` module. The project's root error `KDError` and the cache's errors live in
`cache_format/errors.py`: this package is the bottom of the house, so every other one can raise them.
"""

from cache_format.errors import (
    CacheCorruptError,
    CacheError,
    CacheExistsError,
    CacheIncompleteError,
    CacheLockedError,
    CacheMismatchError,
    CacheMissError,
    CacheNotFoundError,
    CacheStoreError,
    CacheValueError,
    CacheVersionError,
    KDError,
)
from cache_format._fs import exists as path_exists
from cache_format._fs import is_remote
from cache_format._fs import join as join_path
from cache_format._fs import parent as parent_path
from cache_format._fs import resolve as resolve_path
from cache_format._fingerprint import Hasher, cache_dir_name, combine_unordered, fingerprint
from cache_format._manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_ID_BYTES,
    SHARD_RE,
    FieldSpec,
    Manifest,
    ShardInfo,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    file_hash,
    load_manifest,
)
from cache_format._reader import CacheReader
from cache_format._tools import VerifyReport, cache_info, human_bytes, list_caches, verify_cache
from cache_format._writer import CacheWriter, finalize_cache

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_ID_BYTES",
    "SHARD_RE",
    "load_manifest",
    "path_exists",
    "is_remote",
    "join_path",
    "parent_path",
    "resolve_path",
    "FieldSpec",
    "Manifest",
    "ShardInfo",
    "CacheWriter",
    "CacheReader",
    "finalize_cache",
    "cache_info",
    "verify_cache",
    "list_caches",
    "human_bytes",
    "VerifyReport",
    "fingerprint",
    "Hasher",
    "combine_unordered",
    "cache_dir_name",
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_hash",
    "KDError",
    "CacheError",
    "CacheNotFoundError",
    "CacheIncompleteError",
    "CacheVersionError",
    "CacheMismatchError",
    "CacheCorruptError",
    "CacheMissError",
    "CacheValueError",
    "CacheExistsError",
    "CacheLockedError",
    "CacheStoreError",
]
