"""Content fingerprints: type-prefixed hashing of Python values, and the default cache folder name."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cache_format._manifest import FORMAT_VERSION

_DIGEST_SIZE = 16  # 128 bits: collisions between caches are not a practical concern


class Hasher:
    """Incremental, type-prefixed hash: `1`, `1.0`, `True` and `"1"` all hash differently.

    Anything it does not know how to hash raises TypeError; it never falls back to a random key,
    because a random key silently turns a cache hit into a recomputation (or worse, a collision).
    """

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=_DIGEST_SIZE)

    def update(self, obj: Any) -> Hasher:
        """Feed one value (recursively for containers); returns self for chaining."""
        self._encode(obj)
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def _tag(self, tag: bytes, payload: bytes = b"") -> None:
        # Tag + length prefix makes the encoding unambiguous (no two values share a byte stream).
        self._h.update(tag + struct.pack("<Q", len(payload)) + payload)

    def _encode(self, obj: Any) -> None:
        if obj is None:
            self._tag(b"N")
        elif isinstance(obj, bool):
            self._tag(b"B", b"\x01" if obj else b"\x00")
        elif isinstance(obj, int):
            self._tag(b"I", str(obj).encode())
        elif isinstance(obj, float):
            self._tag(b"F", struct.pack("<d", obj))
        elif isinstance(obj, str):
            self._tag(b"S", obj.encode("utf-8"))
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self._tag(b"Y", bytes(obj))
        elif isinstance(obj, (list, tuple)):
            # Lists and tuples hash alike: settings round-trip through JSON/YAML as lists.
            self._tag(b"L", struct.pack("<Q", len(obj)))
            for item in obj:
                self._encode(item)
        elif isinstance(obj, Mapping):
            items = sorted((fingerprint(k), v) for k, v in obj.items())
            self._tag(b"D", struct.pack("<Q", len(items)))
            for key_hash, value in items:
                self._tag(b"K", key_hash.encode())
                self._encode(value)
        elif isinstance(obj, (set, frozenset)):
            self._tag(b"U", "".join(sorted(fingerprint(v) for v in obj)).encode())
        elif isinstance(obj, (np.ndarray, np.generic)):
            arr = np.ascontiguousarray(obj)
            if arr.dtype.hasobject:
                raise TypeError("cannot fingerprint a numpy array of Python objects; convert it to a numeric dtype")
            self._tag(b"A", f"{arr.dtype.str}{arr.shape}".encode())
            self._h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
        elif _is_torch_tensor(obj):
            self._encode_tensor(obj)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self._tag(b"C", f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
            self._encode({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        else:
            raise TypeError(
                f"cannot fingerprint a {type(obj).__module__}.{type(obj).__qualname__}: pass its content as "
                "None/bool/int/float/str/bytes/list/tuple/dict/set/numpy array/torch tensor/dataclass instead"
            )

    def _encode_tensor(self, t: Any) -> None:
        import torch

        t = t.detach().cpu().contiguous()
        self._tag(b"P", f"{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            self._h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to find out an object is not a tensor
    return torch is not None and isinstance(obj, torch.Tensor)


def fingerprint(obj: Any) -> str:
    """Hex fingerprint of a value (see Hasher for what is accepted)."""
    return Hasher().update(obj).hexdigest()


def combine_unordered(hashes: Iterable[str]) -> str:
    """Order-independent combination of hex hashes (a multiset: duplicates count).

    Fingerprinting a data set as `combine_unordered(per-example hashes)` gives the same key however the
    examples are ordered or chunked.
    """
    items = sorted(hashes)
    if not all(isinstance(h, str) for h in items):
        raise TypeError("combine_unordered takes hex strings, e.g. fingerprint(example) for each example")
    return Hasher().update("combine_unordered").update(items).hexdigest()


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return slug or "teacher"


def cache_dir_name(teacher_name: str, teacher_fingerprint: str, data_fingerprint: str, settings: Mapping,
                   shard_format: str = "arrow") -> str:
    """Default folder name for a cache: same teacher + data + settings -> same name; anything else differs.

    The format version is part of the key so a new format never reuses an old folder; so is a shard format
    other than Arrow (Arrow caches keep the names they always had).
    """
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher_fingerprint,
        "data": data_fingerprint,
        "settings": dict(settings),
    }
    if shard_format != "arrow":
        identity["shard_format"] = shard_format
    key = fingerprint(identity)
    return f"{_slug(teacher_name)}-{key[:16]}"
