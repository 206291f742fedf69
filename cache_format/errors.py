"""Exception hierarchy shared by the whole project.

One root (`KDError`) with builtin mix-ins so callers may catch either the project's
class or the builtin one (the pattern of huggingface/datasets' exceptions.py).
"""

from __future__ import annotations

__all__ = [
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


class KDError(Exception):
    """Root of every error kd-pipeline raises on purpose (the CLI prints these as one line)."""


class CacheError(KDError):
    """Something is wrong with a teacher cache."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """The path does not exist or is not a cache folder."""


class CacheIncompleteError(CacheError, RuntimeError):
    """The folder has no manifest.json: precompute did not finish (rerun it to resume)."""


class CacheVersionError(CacheError, ValueError):
    """The manifest's format version is not one this code can read."""


class CacheMismatchError(CacheError, ValueError):
    """The cache was made by another teacher, data set or settings than the caller expects."""


class CacheCorruptError(CacheError, ValueError):
    """A shard's bytes or hash disagree with the manifest, or a shard cannot be parsed."""


class CacheMissError(CacheError, KeyError):
    """An example id is not in the cache."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CacheValueError(CacheError, ValueError):
    """Data given to the writer is invalid (duplicate id, NaN/inf, wrong shape or dtype)."""


class CacheExistsError(CacheError, FileExistsError):
    """A finished cache is already at the path and would be overwritten."""


class CacheLockedError(CacheError, RuntimeError):
    """Another live process is writing the same unfinished cache with the same writer id."""


class CacheStoreError(CacheError, OSError):
    """A cache URL cannot be used: its filesystem package is missing, its bucket or credentials are wrong."""
