"""Where a cache lives: a local folder (a Path) or a folder on an object store (a `Store`, through fsspec).

Local paths and `file://` URLs resolve to a Path and keep the local code path (mmap, atomic rename, fsync,
locks). Any other URL (`s3://bucket/prefix`, `gs://`, `memory://`, ...) resolves to a `Store`: the few
operations the cache needs, each turning the filesystem library's errors into one-line CacheStoreErrors.
Credentials and endpoints come from the filesystem library's usual environment and config files
(for s3fs: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, AWS_ENDPOINT_URL_S3).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cache_format.errors import CacheCorruptError, CacheStoreError

__all__ = ["Store", "exists", "is_remote", "join", "parent", "resolve"]

# The package (and the kd-pipeline extra, where there is one) that provides each protocol's filesystem.
_PACKAGES = {"s3": "s3fs (pip install 'kd-pipeline[s3]')", "s3a": "s3fs (pip install 'kd-pipeline[s3]')",
             "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
_S3_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials"
_CREDENTIALS = {"s3": _S3_CREDENTIALS, "s3a": _S3_CREDENTIALS,
                "gs": "GOOGLE_APPLICATION_CREDENTIALS or gcloud auth", "gcs": "GOOGLE_APPLICATION_CREDENTIALS"}
# Protocols whose first path component is a bucket (container) that the cache never creates.
_BUCKETS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
_URL_RE = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]*)://")
_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def _protocol(path: str | os.PathLike) -> str | None:
    m = _URL_RE.match(str(path)) if isinstance(path, str) else None
    return m["protocol"].lower() if m else None


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL other than `file://` (its cache is read and written through fsspec)."""
    return _protocol(path) not in (None, "file", "local")


def join(root: str | os.PathLike, name: str) -> str | Path:
    """`root/name`: a Path for local roots, a URL string for remote ones (Path would fold `s3://` to `s3:/`)."""
    if is_remote(root):
        return f"{str(root).rstrip('/')}/{name}"
    return _local(root) / name


def parent(path: str | os.PathLike) -> str | Path:
    """The folder holding `path` (a URL string for remote paths)."""
    if is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return _local(path).parent


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or folder exists at a local path or URL (on an object store: any object under it)."""
    where = resolve(path)
    if isinstance(where, Path):
        return where.exists()
    return bool(where._call(where.fs.exists, where.root))


def _local(path: str | os.PathLike) -> Path:
    p = str(path)
    if _protocol(p) in ("file", "local"):
        p = p.split("://", 1)[1]
    return Path(p)


def display(url: str) -> str:
    """The URL without any `user:password@` part, for messages."""
    return _USERINFO_RE.sub(r"\1", url.rstrip("/"))


def resolve(path: str | os.PathLike) -> Path | Store:
    """A Path for a local path or `file://` URL, else the `Store` of the URL (clear errors if unusable)."""
    if not is_remote(path):
        return _local(path)
    return Store(str(path))


def _secret_free(e: BaseException) -> str:
    # Libraries do not put secrets in their messages; the URL's user-info part is dropped anyway.
    return _USERINFO_RE.sub(r"\1", f"{type(e).__name__}: {e}".splitlines()[0])


class Store:
    """A cache folder on an object store: list, read, write (one PUT each: atomic) and ranged reads.

    Object stores have no rename, no exclusive create and no locks, so commits rely on each object appearing
    whole when its upload finishes, in order: shard, its sidecar, and the manifest last.
    """

    def __init__(self, url: str) -> None:
        from fsspec.core import url_to_fs

        self.url = display(url)
        self.protocol = _protocol(url) or ""
        if _USERINFO_RE.match(url):  # would end up in error messages and logs
            how = _CREDENTIALS.get(self.protocol, "see its filesystem package")
            raise CacheStoreError(f"{self.url}: a cache URL must not hold credentials (user:password@); set them the "
                                  f"usual way for {self.protocol}:// ({how})")
        try:
            self.fs, root = url_to_fs(url)
        except ImportError:
            package = _PACKAGES.get(self.protocol, f"the fsspec filesystem package for {self.protocol}://")
            raise CacheStoreError(f"{self.url}: {self.protocol}:// needs the package {package}; install it") from None
        except ValueError as e:
            raise CacheStoreError(f"{self.url}: {e}; use a local path or a URL fsspec knows (s3://, gs://, "
                                  "memory://, file://)") from None
        self.root = root.rstrip("/")
        if self.protocol in _BUCKETS:
            bucket = self.root.split("/", 1)[0]
            if not bucket:
                raise CacheStoreError(f"{self.url} names no bucket: use {self.protocol}://BUCKET/PREFIX")
            # A missing bucket otherwise looks like an empty folder; the cache never creates buckets.
            try:
                self._call(self.fs.info, bucket)  # not fs.exists: it reports missing credentials as "no bucket"
            except FileNotFoundError:
                raise CacheStoreError(f"bucket {bucket!r} of {self.url} does not exist (or is not visible with "
                                      "these credentials): create it or fix the URL") from None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run one filesystem call; credential, permission and connection failures become CacheStoreError."""
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            raise
        except Exception as e:  # the libraries' own classes (botocore's NoCredentialsError, aiohttp's, ...)
            raise self._error(e) from None

    def _error(self, e: Exception) -> CacheStoreError:
        if isinstance(e, CacheStoreError):
            return e
        if isinstance(e, PermissionError):
            return CacheStoreError(f"{self.url}: access denied ({_secret_free(e)}): check the credentials' "
                                   "permissions")
        if "credential" in type(e).__name__.lower() or "credential" in str(e).lower():
            return CacheStoreError(
                f"{self.url}: no usable credentials ({_secret_free(e)}): set them the usual way for "
                f"{self.protocol}:// ({_CREDENTIALS.get(self.protocol, 'see its filesystem package')})"
            )
        return CacheStoreError(f"{self.url}: {_secret_free(e)}")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def listdir(self) -> dict[str, int]:
        """Files directly in the folder: name -> size in bytes ({} when nothing is there)."""
        self.fs.invalidate_cache(self.root)  # another process may have written since the last listing
        try:
            entries = self._call(self.fs.ls, self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "file" and e["name"].rstrip("/") != self.root:
                out[name] = int(e.get("size") or 0)
            elif name.endswith(".zarr"):  # a zarr shard (SPEC section 10) is a folder: its objects' total size
                out[name] = int(self._call(self.fs.du, e["name"], total=True))
        return out

    def read_bytes(self, name: str) -> bytes:
        return self._call(self.fs.cat_file, self.path(name))

    def read_json(self, name: str) -> Any:
        """Parse a JSON file; bytes that are not UTF-8 JSON raise CacheCorruptError naming the file."""
        try:
            return json.loads(self.read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheCorruptError(f"{self.url_of(name)} is not valid UTF-8 JSON ({e}): delete the folder and "
                                    "rerun precompute") from e

    def write_bytes(self, name: str, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        self._call(self.fs.pipe_file, self.path(name), data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1).encode("utf-8") + b"\n")

    def upload(self, local: str | os.PathLike, name: str) -> None:
        """Upload a local file (multipart for big ones: still visible only once complete)."""
        self._call(self.fs.put_file, os.fspath(local), self.path(name))

    def download(self, name: str, local: str | os.PathLike) -> None:
        self._call(self.fs.get_file, self.path(name), os.fspath(local))

    def remove(self, name: str) -> None:
        try:
            if name.endswith(".zarr"):  # a zarr shard: every object under it
                self._call(self.fs.rm, self.path(name), recursive=True)
            else:
                self._call(self.fs.rm_file, self.path(name))
        except FileNotFoundError:
            pass

    def read_ranges(self, name: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        """Byte ranges [start, end) of one file, fetched concurrently where the filesystem is async."""
        path = self.path(name)
        return self._call(self.fs.cat_ranges, [path] * len(starts), list(starts), list(ends))

    def walk(self) -> Iterator[tuple[str, list[str], list[str]]]:
        """os.walk over the folder: (URL of the folder, sub-folder names (prunable), file names)."""
        self.fs.invalidate_cache()
        try:
            for dirpath, dirnames, filenames in self.fs.walk(self.root):
                yield self.url + dirpath.rstrip("/")[len(self.root):], dirnames, filenames
        except FileNotFoundError:
            return
        except Exception as e:
            raise self._error(e) from None
