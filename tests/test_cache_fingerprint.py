"""Fingerprint properties: type prefixes, order/chunking independence, folder names, unhashable values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cache_format import Hasher, cache_dir_name, combine_unordered, fingerprint

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@given(values)
def test_fingerprint_is_deterministic(v):
    assert fingerprint(v) == fingerprint(v)


def test_type_prefixes_keep_values_apart():
    keys = [fingerprint(v) for v in (1, 1.0, True, "1", b"1", [1], {"1": 1}, None, "", [], {})]
    assert len(set(keys)) == len(keys)
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint((1, 2)) == fingerprint([1, 2])  # settings come back from JSON/YAML as lists


def test_arrays_and_tensors_hash_content_dtype_and_shape():
    a = np.arange(6, dtype=np.float32)
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.astype(np.float64))
    assert fingerprint(a) != fingerprint(a.reshape(2, 3))
    t = torch.arange(6, dtype=torch.bfloat16)
    assert fingerprint(t) == fingerprint(t.clone()) != fingerprint(t.to(torch.float16))
    assert fingerprint(torch.zeros(0)) != fingerprint(torch.zeros(1))


def test_dataclasses_hash_by_fields():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        max_length: int

    assert fingerprint(Cfg(128)) == fingerprint(Cfg(128)) != fingerprint(Cfg(256))


@pytest.mark.parametrize("bad", [object(), lambda x: x, {1: object()}, [np.array([object()])]])
def test_unhashable_raises_type_error(bad):
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(bad)


@given(st.lists(st.text(), max_size=20), st.randoms(), st.integers(1, 5))
def test_combine_unordered_ignores_order_and_chunking(items, rnd, chunk):
    hashes = [fingerprint(x) for x in items]
    shuffled = hashes[:]
    rnd.shuffle(shuffled)
    chunked = [h for i in range(0, len(shuffled), chunk) for h in shuffled[i : i + chunk]]
    assert combine_unordered(hashes) == combine_unordered(shuffled) == combine_unordered(iter(chunked))


def test_combine_unordered_counts_content():
    a, b = fingerprint("a"), fingerprint("b")
    assert combine_unordered([a, b]) != combine_unordered([a])
    assert combine_unordered([a, a]) != combine_unordered([a])


@given(st.integers(1, 4096), st.integers(1, 4096))
def test_changed_setting_changes_cache_dir_name(m1, m2):
    n1 = cache_dir_name("BERT base/uncased", "t", "d", {"max_length": m1})
    n2 = cache_dir_name("BERT base/uncased", "t", "d", {"max_length": m2})
    assert (n1 == n2) == (m1 == m2)
    assert n1.startswith("bert-base-uncased-") and len(n1.split("-")[-1]) == 16


def test_cache_dir_name_depends_on_each_input():
    base = cache_dir_name("m", "t", "d", {"a": 1})
    assert base == cache_dir_name("m", "t", "d", {"a": 1})
    assert base != cache_dir_name("m", "t2", "d", {"a": 1})
    assert base != cache_dir_name("m", "t", "d2", {"a": 1})
    assert base != cache_dir_name("m", "t", "d", {"a": 1, "b": None})
    assert cache_dir_name("!!!", "t", "d", {}).startswith("teacher-")


def test_hasher_is_incremental():
    assert Hasher().update(1).update("x").hexdigest() == Hasher().update(1).update("x").hexdigest()
    assert Hasher().update(1).update("x").hexdigest() != Hasher().update("x").update(1).hexdigest()
