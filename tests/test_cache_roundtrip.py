"""Round trips through CacheWriter -> CacheReader: dtypes, ragged lengths, shard boundaries, gather, prefetch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_format import CacheMissError, CacheReader, CacheWriter, FieldSpec, verify_cache

DTYPES = ["float32", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint16", "uint32", "bool"]
SHAPES = [(), (3,), (2, 2), ("T",), ("T", 3), (2, "T", "T")]


def _random_value(rng: np.random.Generator, dtype: str, shape: tuple) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype in ("float32", "float16", "bfloat16"):
        return rng.standard_normal(shape).astype(np.float32)
    return rng.integers(0, 100, size=shape).astype(dtype)


def _expected(value: np.ndarray, dtype: str) -> np.ndarray:
    """What the cache returns from numpy: bf16 as its uint16 bits (via torch, the reference rounding)."""
    if dtype == "bfloat16":
        return torch.from_numpy(value).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return value.astype(dtype)


def _write(path, fields, examples, batch, shard_bytes, padded):
    """examples: list of (id, length, {field: value}); padded: give ragged fields as padded arrays."""
    with CacheWriter(path, fields, teacher_fingerprint="t", data_fingerprint="d", settings={},
                     shard_bytes=shard_bytes) as w:
        for start in range(0, len(examples), batch):
            part = examples[start : start + batch]
            ids = [e[0] for e in part]
            lengths = np.array([e[1] for e in part], dtype=np.int64)
            arrays = {}
            for f in fields:
                values = [e[2][f.name] for e in part]
                if f.ragged and padded and f.shape[0] == "T" and f.shape.count("T") == 1:
                    t_max = int(lengths.max())
                    out = np.zeros((len(part), *f.resolve(t_max)), dtype=values[0].dtype)
                    for i, v in enumerate(values):
                        out[i, : len(v)] = v
                    arrays[f.name] = out
                elif f.ragged:
                    arrays[f.name] = values
                else:
                    arrays[f.name] = np.stack(values)
            w.append(ids, lengths, arrays)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.sampled_from(SHAPES)), min_size=1, max_size=4),
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    batch=st.integers(1, 5),
    shard_bytes=st.sampled_from([1, 64, 300, 1 << 20]),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip(tmp_path_factory, specs, lengths, batch, shard_bytes, padded, seed):
    path = tmp_path_factory.mktemp("c") / "cache"
    rng = np.random.default_rng(seed)
    fields = [FieldSpec(f"f{i}", dtype, shape) for i, (dtype, shape) in enumerate(specs)]
    examples = [
        (f"id-{j}", n, {f.name: _random_value(rng, f.dtype, f.resolve(n)) for f in fields})
        for j, n in enumerate(lengths)
    ]
    _write(path, fields, examples, batch, shard_bytes, padded)
    reader = CacheReader(path, verify="open")
    assert len(reader) == len(examples)
    for eid, n, values in examples:
        got = reader.get(eid)
        assert int(got["length"]) == n
        for f in fields:
            np.testing.assert_array_equal(got[f.name], _expected(values[f.name], f.dtype))
    order = [e[0] for e in examples][::-1]
    batch_out = reader.gather(order)
    t_max = max(lengths)
    for i, eid in enumerate(order):
        _, n, values = examples[int(eid.split("-")[1])]
        for f in fields:
            want = _expected(values[f.name], f.dtype)
            got = np.array(batch_out[f.name][i])
            assert got.shape == f.resolve(t_max)
            cut = tuple(slice(0, n) if d == "T" else slice(None) for d in f.shape)
            np.testing.assert_array_equal(got[cut], want)
            padding = got.copy()
            padding[cut] = 0
            assert not padding.any()  # everything outside the example is zero padding
    assert verify_cache(path).ok


def _simple_cache(path, n=10, shard_bytes=200):
    fields = [FieldSpec("logits", "float32", ("T", 2)), FieldSpec("hidden.0", "bfloat16", (4,)),
              FieldSpec("label", "int64", ())]
    lengths = np.arange(n) % 5
    ids = [f"e{i}" for i in range(n)]
    logits = np.arange(n * 5 * 2, dtype=np.float32).reshape(n, 5, 2)
    hidden = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4).to(torch.bfloat16)
    with CacheWriter(path, fields, teacher_fingerprint="t", data_fingerprint="d", settings={"k": 1},
                     shard_bytes=shard_bytes) as w:
        for s in range(0, n, 3):
            w.append(ids[s : s + 3], lengths[s : s + 3],
                     {"logits": logits[s : s + 3], "hidden.0": hidden[s : s + 3], "label": np.arange(s, min(s + 3, n))})
    return ids, lengths, logits, hidden


def test_gather_pad_to_truncates_and_keeps_full_length(tmp_path):
    ids, lengths, logits, _ = _simple_cache(tmp_path / "c")
    reader = CacheReader(tmp_path / "c")
    out = reader.gather(["e4", "e1"], fields=["logits"], pad_to=2)
    assert set(out) == {"length", "logits"}
    assert out["logits"].shape == (2, 2, 2)
    np.testing.assert_array_equal(out["length"], [4, 1])
    np.testing.assert_array_equal(out["logits"][0], logits[4, :2])
    np.testing.assert_array_equal(out["logits"][1, 0], logits[1, 0])
    assert (out["logits"][1, 1] == 0).all()


def test_gather_torch_bf16_exact_and_get_is_zero_copy(tmp_path):
    ids, lengths, logits, hidden = _simple_cache(tmp_path / "c")
    reader = CacheReader(tmp_path / "c")
    out = reader.gather_torch(ids)
    assert out["hidden.0"].dtype == torch.bfloat16
    assert torch.equal(out["hidden.0"], hidden)
    assert out["label"].tolist() == list(range(10))
    view = reader.get("e3")["logits"]
    assert not view.flags.writeable and view.base is not None  # a view into the mapped shard


def test_prefetch_matches_gather_and_propagates_errors(tmp_path):
    ids, *_ = _simple_cache(tmp_path / "c")
    reader = CacheReader(tmp_path / "c")
    batches = [ids[i : i + 4] for i in range(0, len(ids), 4)]
    got = list(reader.prefetch(batches, torch=False, depth=1))
    assert len(got) == len(batches)
    for b, out in zip(batches, got):
        want = reader.gather(b)
        for k in want:
            np.testing.assert_array_equal(out[k], want[k])
    with pytest.raises(CacheMissError, match="nope"):
        list(reader.prefetch([ids[:2], ["nope"], ids[2:4]]))
    it = reader.prefetch(batches * 100)
    next(it)
    it.close()  # breaking out early stops the thread (join in finally)


def test_finished_cache_reopen_is_noop(tmp_path):
    ids, lengths, logits, hidden = _simple_cache(tmp_path / "c")
    fields = [FieldSpec("logits", "float32", ("T", 2)), FieldSpec("hidden.0", "bfloat16", (4,)),
              FieldSpec("label", "int64", ())]
    w = CacheWriter(tmp_path / "c", fields, teacher_fingerprint="t", data_fingerprint="d", settings={"k": 1})
    assert w.complete and w.done_ids == set(ids)
    w.append(ids[:1], lengths[:1], {"logits": logits[:1], "hidden.0": hidden[:1], "label": np.zeros(1)})
    w.close()
    assert verify_cache(tmp_path / "c").ok


def test_resume_skips_committed_ids(tmp_path):
    path = tmp_path / "c"
    fields = [FieldSpec("x", "float32", ("T",))]
    kw = dict(teacher_fingerprint="t", data_fingerprint="d", settings={}, shard_bytes=1)
    w = CacheWriter(path, fields, **kw)
    w.append(["a", "b"], np.array([1, 2]), {"x": np.ones((2, 2), np.float32)})
    w.close(finalize=False)
    w2 = CacheWriter(path, fields, **kw)
    assert w2.done_ids == {"a", "b"} and not w2.complete
    w2.append(["c"], np.array([0]), {"x": np.zeros((1, 0), np.float32)})
    manifest = w2.close()
    assert manifest.count == 3 and CacheReader(path).ids == ["a", "b", "c"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 5), min_size=1, max_size=10), pad_to=st.integers(0, 8),
       shard_bytes=st.sampled_from([1, 100, 1 << 20]), seed=st.integers(0, 2**16))
def test_gather_pad_to_across_shards(tmp_path_factory, lengths, pad_to, shard_bytes, seed):
    """Ragged gather near shard ends, across shards, padded past and truncated below the lengths."""
    path = tmp_path_factory.mktemp("c") / "cache"
    rng = np.random.default_rng(seed)
    fields = [FieldSpec("h", "float32", ("T", 2)), FieldSpec("a", "int16", (2, "T", "T"))]
    examples = [(f"id-{j}", n, {f.name: _random_value(rng, f.dtype, f.resolve(n)) for f in fields})
                for j, n in enumerate(lengths)]
    _write(path, fields, examples, 3, shard_bytes, padded=True)
    reader = CacheReader(path)
    order = list(rng.permutation(len(examples)))
    out = reader.gather([f"id-{j}" for j in order], pad_to=pad_to)
    for i, j in enumerate(order):
        _, n, values = examples[j]
        k = min(n, pad_to)
        assert out["length"][i] == n
        want_h = np.zeros((pad_to, 2), np.float32)
        want_h[:k] = values["h"][:k]
        np.testing.assert_array_equal(out["h"][i], want_h)
        want_a = np.zeros((2, pad_to, pad_to), np.int16)
        want_a[:, :k, :k] = values["a"][:, :k, :k]
        np.testing.assert_array_equal(out["a"][i], want_a)
