"""Every error class raised in its situation, with a message that names the problem and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cache_format import (
    CacheCorruptError,
    CacheExistsError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheMissError,
    CacheNotFoundError,
    CacheReader,
    CacheValueError,
    CacheVersionError,
    CacheWriter,
    FieldSpec,
    KDError,
    finalize_cache,
)
from tests.test_cache_durability import flip_value_bit

FIELDS = [FieldSpec("logits", "float16", ("T", 2)), FieldSpec("label", "int32", ())]
KW = dict(teacher_fingerprint="teach", data_fingerprint="data", settings={"max_length": 8})


def _writer(path, **over):
    return CacheWriter(path, over.pop("fields", FIELDS), **{**KW, **over})


def _batch(ids, length=3):
    n = len(ids)
    return ids, np.full(n, length), {"logits": np.ones((n, length, 2), np.float32), "label": np.arange(n)}


@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "c"
    with _writer(path) as w:
        w.append(*_batch(["a", "b", "c"]))
    return path


def test_errors_are_kd_errors_with_builtin_mixins():
    assert issubclass(CacheMissError, KeyError) and issubclass(CacheMissError, KDError)
    assert issubclass(CacheNotFoundError, FileNotFoundError)
    assert issubclass(CacheValueError, ValueError)


def test_not_found(tmp_path):
    with pytest.raises(CacheNotFoundError, match="no cache folder.*run precompute"):
        CacheReader(tmp_path / "nope")


def test_incomplete_without_manifest(tmp_path):
    w = _writer(tmp_path / "c")
    w.append(*_batch(["a"]))
    w.close(finalize=False)
    with pytest.raises(CacheIncompleteError, match="no manifest.json.*rerun precompute.*resume"):
        CacheReader(tmp_path / "c")


def test_unknown_format_version(cache):
    data = json.loads((cache / "manifest.json").read_text())
    data["format_version"] = 99
    (cache / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheVersionError, match="format_version 99.*upgrade kd-pipeline"):
        CacheReader(cache)


def test_mismatch_names_expected_and_found(cache):
    with pytest.raises(CacheMismatchError, match="teacher fingerprint expected other, found teach.*rerun precompute"):
        CacheReader(cache, expect_teacher="other")
    with pytest.raises(CacheMismatchError, match="data fingerprint expected x, found data"):
        CacheReader(cache, expect_data="x")
    with pytest.raises(CacheMismatchError, match="'max_length' expected 16, found 8"):
        CacheReader(cache, expect_settings={"max_length": 16})
    CacheReader(cache, expect_teacher="teach", expect_data="data", expect_settings={"max_length": 8})


def test_miss_names_id_and_size(cache):
    reader = CacheReader(cache)
    with pytest.raises(CacheMissError, match=r"1 of 2 ids not in the cache \(3 examples.*\['zz'\].*rerun precompute"):
        reader.gather(["a", "zz"])
    with pytest.raises(CacheMissError, match="'q'"):
        reader.get("q")
    assert "a" in reader and "q" not in reader


def test_corrupt_truncated_shard_caught_at_open(cache):
    shard = next(cache.glob("shard-*.arrow"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheCorruptError, match="bytes, the manifest says.*kd cache verify"):
        CacheReader(cache)


def test_corrupt_flipped_byte_caught_at_open_with_verify_open(tmp_path):
    path = tmp_path / "c"
    logits = (100 + np.arange(18, dtype=np.float32)).reshape(3, 3, 2)  # distinct values, exact in float16
    with _writer(path) as w:
        w.append(["a", "b", "c"], np.full(3, 3), {"logits": logits, "label": np.arange(3)})
    [shard] = path.glob("shard-*.arrow")
    data = bytearray(shard.read_bytes())
    flip_value_bit(data, np.float16(logits[2, 1, 0]).tobytes())  # one stored value of example "c"
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=f"{shard.name} content hash differs"):
        CacheReader(path, verify="open")
    # The control: unhashed, the shard still parses and serves example "c" with that one value changed.
    got = CacheReader(path, verify="off").get("c")["logits"]
    changed = got != logits[2]
    assert changed.tolist() == [[False, False], [True, False], [False, False]]


def test_exists_with_other_configuration(cache):
    with pytest.raises(CacheExistsError, match="setting 'max_length' 8 there vs 9 now.*use another path"):
        _writer(cache, settings={"max_length": 9})
    with pytest.raises(CacheExistsError, match="teacher_fingerprint"):
        _writer(cache, teacher_fingerprint="other")


def test_unfinished_with_other_configuration(tmp_path):
    w = _writer(tmp_path / "c")
    w.append(*_batch(["a"]))
    w.close(finalize=False)
    with pytest.raises(CacheMismatchError, match="unfinished cache of another configuration.*fields.*delete it"):
        _writer(tmp_path / "c", fields=[FieldSpec("logits", "float32", ("T", 2)), FieldSpec("label", "int32", ())])


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheExistsError, match="not a cache"):
        _writer(tmp_path)


def test_finished_cache_refuses_new_ids(cache):
    w = _writer(cache)
    with pytest.raises(CacheExistsError, match="finished cache without ids"):
        w.append(*_batch(["new"]))


@pytest.mark.parametrize(
    "ids, lengths, arrays, pattern",
    [
        (["a", "a"], [1, 1], None, "'a' appears twice"),
        (["x"], [1], {"logits": np.full((1, 1, 2), np.nan, np.float32), "label": [0]}, "'logits', example 'x'.*NaN"),
        (["x"], [1], {"logits": np.full((1, 1, 2), 1e6, np.float32), "label": [0]}, "overflows float16"),
        (["x"], [1], {"logits": np.ones((1, 1, 3)), "label": [0]}, r"'logits'.*shape \(1, 1, 3\)"),
        (["x"], [4], {"logits": np.ones((1, 2, 2)), "label": [0]}, "example 'x': length 4 exceeds"),
        (["x"], [1], {"logits": [np.ones((2, 2))], "label": [0]}, r"example 'x': shape \(2, 2\)"),
        (["x"], [1], {"logits": np.ones((1, 1, 2)), "label": [0.5]}, "float64 cannot be stored as int32"),
        (["x"], [1], {"logits": np.ones((1, 1, 2)), "label": [2**40]}, "outside the range of int32"),
        (["x"], [1], {"logits": np.ones((1, 1, 2))}, r"missing fields \['label'\]"),
        (["x"], [1], {"logits": np.ones((1, 1, 2)), "label": [0], "extra": [1]}, r"unknown fields \['extra'\]"),
        (["x"], [-1], {"logits": np.ones((1, 1, 2)), "label": [0]}, "example 'x': length -1"),
        ([""], [1], {"logits": np.ones((1, 1, 2)), "label": [0]}, "ids are non-empty str"),
    ],
)
def test_value_errors_name_example_and_field(tmp_path, ids, lengths, arrays, pattern):
    w = _writer(tmp_path / "c")
    arrays = arrays if arrays is not None else _batch(ids, 1)[2]
    with pytest.raises(CacheValueError, match=pattern):
        w.append(ids, np.array(lengths), arrays)


def test_bf16_nan_refused(tmp_path):
    w = _writer(tmp_path / "c", fields=[FieldSpec("h", "bfloat16", (2,))])
    with pytest.raises(CacheValueError, match="'h', example 'b'.*NaN"):
        w.append(["a", "b"], np.array([0, 0]), {"h": torch.tensor([[1.0, 2.0], [float("inf"), 0]]).bfloat16()})


def test_duplicate_vs_committed_and_buffered(tmp_path):
    w = _writer(tmp_path / "c")
    w.append(*_batch(["a"]))
    with pytest.raises(CacheValueError, match="'a' is already in the cache"):
        w.append(*_batch(["a"]))
    w.flush()
    w.close(finalize=False)
    w2 = _writer(tmp_path / "c")
    with pytest.raises(CacheValueError, match="'a' is already in the cache"):
        w2.append(*_batch(["a"]))


def test_duplicates_across_writers_refused_at_finalize(tmp_path):
    # Both open before either commits (as concurrent ranks do), so neither sees the other's ids.
    writers = [_writer(tmp_path / "c", writer_id=wid) for wid in ("0", "1")]
    writers[0].append(*_batch(["both"]))
    writers[1].append(*_batch(["only1", "both"]))
    for w in writers:
        w.close(finalize=False)
    with pytest.raises(CacheValueError, match="'both' is in both shard-0-000000.arrow and shard-1-000000.arrow"):
        finalize_cache(tmp_path / "c")


def test_finalize_expected_count(tmp_path):
    w = _writer(tmp_path / "c")
    w.append(*_batch(["a"]))
    w.close(finalize=False)
    with pytest.raises(CacheIncompleteError, match="1 committed examples, expected 2.*resume"):
        finalize_cache(tmp_path / "c", expected_count=2)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (("Logits", "float16", (2,)), "field name 'Logits' is invalid"),
        (("id", "float16", (2,)), "reserved"),
        (("x", "float8", (2,)), "dtype 'float8' is not supported"),
        (("x", "float16", ("L", 2)), "use positive ints"),
        (("x", "float16", (0,)), "use positive ints"),
        (("x", "float16", (1,) * 7), "rank 7 exceeds"),
    ],
)
def test_fieldspec_validation(args, pattern):
    with pytest.raises(CacheValueError, match=pattern):
        FieldSpec(*args)


def test_writer_argument_validation(tmp_path):
    with pytest.raises(CacheValueError, match="writer_id"):
        _writer(tmp_path / "c", writer_id="a-b")
    with pytest.raises(CacheValueError, match="shard_bytes"):
        _writer(tmp_path / "c", shard_bytes=0)
    with pytest.raises(CacheValueError, match="JSON-serialisable"):
        _writer(tmp_path / "c", settings={"x": object()})
    with pytest.raises(CacheValueError, match="unique"):
        _writer(tmp_path / "c", fields=[FieldSpec("a", "int8", ()), FieldSpec("a", "int8", ())])


def test_unknown_codec_is_a_version_error(cache):
    data = json.loads((cache / "manifest.json").read_text())
    data["fields"][0]["codec"] = "zarr-v9"
    (cache / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CacheVersionError, match=r"codecs \['zarr-v9'\].*upgrade kd-pipeline"):
        CacheReader(cache)
