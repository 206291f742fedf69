"""The teacher-output cache: an on-disk, content-keyed store of per-example teacher outputs.

See SPEC.md (next to this file) for the format. No model code lives here.
"""

from cache_format._errors import (
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
from cache_format._fingerprint import Hasher, cache_dir_name, combine_unordered, fingerprint
from cache_format._manifest import (
    FORMAT_VERSION,
    FieldSpec,
    Manifest,
    ShardInfo,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    file_hash,
)
from cache_format._reader import CacheReader
from cache_format._tools import VerifyReport, cache_info, human_bytes, list_caches, verify_cache
from cache_format._writer import CacheWriter, finalize_cache

__all__ = [
    "FORMAT_VERSION",
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
