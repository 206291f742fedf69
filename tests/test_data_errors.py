"""Regression tests for data-layer defects (issue 13): CSV with quoted newlines, non-text columns, bad ids,
the string-label hint, and the shared progress-bar policy in `encode`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cache_format import MAX_ID_BYTES
from stages.data import examples as data  # its module globals are patched
from stages.data import DataError, Examples, encode, load_examples
from stages.models import load_tokenizer
from stages.prepare import split_examples, transfer_sentences

# pyarrow's CSV reader works in 1 MiB blocks; a quoted newline only breaks it when a block boundary lands inside
# a quoted value, so the files below are a few MiB.
_PAD = " ".join(["word"] * 160)


def _tricky_text(i: int) -> str:
    """A text with line breaks (\\n and \\r\\n), double quotes, commas, and (every third) outer spaces."""
    text = f'review {i}, first line\nsays "hi, there"\r\nlast line {_PAD}'
    return f"  {text} " if i % 3 == 0 else text


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# CSV with quoted newlines


def test_prepare_output_round_trips_multiline_texts(tmp_path):
    rows = [{"id": f"{i:05d}", "text": _tricky_text(i), "label": i % 2} for i in range(3000)]
    src = _write_jsonl(tmp_path / "src.jsonl", rows)
    paths = split_examples(src, tmp_path / "out", text_field="text", label_field="label",
                           fractions={"train": 0.8, "dev": 0.1, "test": 0.1}, seed=0)
    assert paths["train"].stat().st_size > 1 << 20  # more than one reader block
    by_id = {r["id"]: r for r in rows}
    seen = []
    for path in paths.values():
        ex = load_examples(path, text_field="text", label_field="label", id_field="id", num_labels=2)
        assert ex.texts == [by_id[i]["text"] for i in ex.ids]  # exact: newlines, quotes, outer spaces kept
        assert ex.labels.tolist() == [by_id[i]["label"] for i in ex.ids]
        assert ex.ids == sorted(ex.ids)  # source order, "00007" keeps its zeros
        seen += ex.ids
    assert sorted(seen) == sorted(by_id)


def test_prepare_content_ids_survive_the_csv(tmp_path):
    texts = [_tricky_text(i) for i in range(3000)]
    src = _write_jsonl(tmp_path / "src.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    paths = split_examples(src, tmp_path / "out", text_field="text", label_field="label",
                           fractions={"train": 0.9, "test": 0.1}, seed=0)
    expected = dict(zip(data.content_ids(texts), texts))
    for path in paths.values():
        written = load_examples(path, text_field="text", id_field="id")
        rehashed = load_examples(path, text_field="text")  # no id column: hashes the texts as read
        assert written.ids == rehashed.ids and all(expected[i] == t for i, t in zip(written.ids, written.texts))


def test_hand_written_csv_with_quoted_newlines_reads(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)  # quotes only where needed, \r\n row ends: Python's csv defaults
        writer.writerow(["text", "label"])
        writer.writerows((_tricky_text(i), i % 2) for i in range(2000))
    ex = load_examples(path, text_field="text", label_field="label")
    assert ex.texts == [_tricky_text(i) for i in range(2000)]
    assert ex.labels.tolist() == [i % 2 for i in range(2000)]
    small = tmp_path / "small.csv"
    small.write_text('text,label\n"two\nlines",1\n')
    assert load_examples(small, text_field="text").texts == ["two\nlines"]


# ---------------------------------------------------------------------------------------------------------------
# Non-text columns


def test_token_list_text_column_is_a_data_error(tmp_path):
    path = _write_jsonl(tmp_path / "tok.jsonl", [{"tokens": ["a", "b"], "text": "a b", "label": 1}])
    with pytest.raises(DataError, match=r"column 'tokens' \(text_field\) in .*tok\.jsonl has type list<.*string>; "
                                        r"text columns must hold one string per row .*data.task: token_classification"):
        load_examples(path, text_field="tokens")
    path = _write_jsonl(tmp_path / "pair.jsonl", [{"text": "a b", "pair": {"x": 1}}])
    with pytest.raises(DataError, match=r"column 'pair' \(text_pair_field\) .* has type struct<x: int64>"):
        load_examples(path, text_field="text", text_pair_field="pair")
    path = _write_jsonl(tmp_path / "id.jsonl", [{"id": [1], "text": "a"}])
    with pytest.raises(DataError, match=r"column 'id' \(id_field\) .* has type list<"):
        load_examples(path, text_field="text", id_field="id")
    path = _write_jsonl(tmp_path / "label.jsonl", [{"text": "a", "label": [0, 1]}])
    with pytest.raises(DataError, match=r"column 'label' \(label_field\) in .* has type list<.*; labels must be"):
        load_examples(path, text_field="text", label_field="label")


@pytest.mark.parametrize(("column", "role", "kwargs"), [
    ("text", r" \(text_field\)", {}),
    ("label", r" \(label_field\)", {}),
    ("source", r" \(filter\)", {"filter": {"source": "rt"}}),
    ("tags", "", {}),  # a column the pipeline does not use, but the CSV splits would have to hold
])
def test_split_examples_names_a_list_column(tmp_path, column, role, kwargs):
    rows = [{"text": f"text {i}", "label": i % 2, "source": "rt", "tags": ["x"]} for i in range(10)]
    for r in rows:
        r[column] = [str(r[column]), "more"] if column != "tags" else ["x", "y"]
    src = _write_jsonl(tmp_path / "src.jsonl", rows)
    with pytest.raises(DataError, match=rf"column '{column}'{role} in .*src\.jsonl has type list<"):
        split_examples(src, tmp_path / "out", text_field="text", label_field="label",
                       fractions={"train": 1.0}, seed=0, **kwargs)
    if column == "text":
        with pytest.raises(DataError, match=r"column 'text' \(text_field\) .* token_classification"):
            transfer_sentences(src, tmp_path / "t.csv", text_field="text", n=1, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Ids


def test_empty_and_too_long_ids_name_the_file_and_row(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('id,text\ne1,x\n"",y\n')
    with pytest.raises(DataError, match=r"row 2 of .*a\.csv has an empty 'id'"):
        load_examples(path, text_field="text", id_field="id")
    path.write_text('id,text\ne1,x\ne2,y\n"  ",z\n')
    with pytest.raises(DataError, match=r"row 3 of .*a\.csv has an empty 'id'"):
        load_examples(path, text_field="text", id_field="id")
    ok = "é" * (MAX_ID_BYTES // 2)  # exactly the limit in UTF-8 bytes
    path.write_text(f"id,text\n{ok},x\n{ok}x,y\n")
    with pytest.raises(DataError, match=rf"row 2 of .*a\.csv has an 'id' of {MAX_ID_BYTES + 1} UTF-8 bytes.*"
                                        rf"at most {MAX_ID_BYTES}"):
        load_examples(path, text_field="text", id_field="id")
    path.write_text(f"id,text\n{ok},x\n")
    assert load_examples(path, text_field="text", id_field="id").ids == [ok]


def test_content_and_transfer_ids_fit_the_cache_limit():
    texts = ["x" * 5000, "x" * 5000, "y"]
    ids = ["transfer-" + i for i in data.content_ids(texts, texts)]
    assert max(len(i.encode()) for i in ids) <= MAX_ID_BYTES


# ---------------------------------------------------------------------------------------------------------------
# String labels


def test_string_label_hint_is_copy_pasteable(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("text,label\nx,pos\ny,neg\nz,pos\nw,yes\n")
    with pytest.raises(DataError) as err:
        load_examples(path, text_field="text", label_field="label")
    assert 'set data.label_names: ["neg", "pos", "yes"] in params.yaml' in str(err.value)
    assert "\n" not in str(err.value)
    many = tmp_path / "b.csv"
    many.write_text("text,label\n" + "".join(f"t{i},lab{i:02d}\n" for i in range(12)))
    with pytest.raises(DataError) as err:
        load_examples(many, text_field="text", label_field="label")
    shown = json.loads(str(err.value).split("data.label_names: ")[1].split(" in params.yaml")[0])
    assert shown == [f"lab{i:02d}" for i in range(10)]


# ---------------------------------------------------------------------------------------------------------------
# Progress bar


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_encode_progress_follows_the_shared_policy(tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(data, "_PROGRESS_MIN_EXAMPLES", 20)
    big = Examples(ids=[str(i) for i in range(25)], texts=["great film"] * 25, text_pairs=None, labels=None)
    small = Examples(ids=["a"], texts=["great film"], text_pairs=None, labels=None)
    monkeypatch.setenv("KD_PROGRESS", "1")
    encode(tokenizer, big, max_length=16)
    assert "tokenize" in capsys.readouterr().err  # shown in logs too (stderr is not a terminal here)
    encode(tokenizer, small, max_length=16)
    assert "tokenize" not in capsys.readouterr().err  # small data sets: no bar
    monkeypatch.setenv("KD_PROGRESS", "0")
    enc = encode(tokenizer, big, max_length=16)
    assert "tokenize" not in capsys.readouterr().err and np.array_equal(enc.lengths, [4] * 25)
