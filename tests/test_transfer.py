"""Unlabelled transfer data: the teacher labels it once, distillation learns from it, labels-only runs skip it."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import cache_format as cf
from stages.distill import distill
from stages.precompute import precompute
from stages.config import config_from_dict
from stages.data import IGNORE_LABEL, DataError, Examples, with_transfer
from stages.prepare import transfer_sentences
from tests.test_stages import _params


def test_with_transfer_marks_transfer_examples_unlabelled():
    train = Examples(ids=["a", "b"], texts=["x y", "z"], text_pairs=None, labels=np.array([0, 1]))
    extra = Examples(ids=["a"], texts=["w"], text_pairs=None, labels=None)
    both = with_transfer(train, extra)
    assert both.ids == ["a", "b", "transfer-a"]
    assert both.labels.tolist() == [0, 1, IGNORE_LABEL]
    paired = Examples(ids=["c"], texts=["q"], text_pairs=["r"], labels=None)
    with pytest.raises(DataError, match="text pair"):
        with_transfer(train, paired)


def test_transfer_sentences_are_seeded_distinct_and_exclude_labelled_text(tmp_path):
    src = tmp_path / "reviews.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "source"])
        for i in range(30):
            w.writerow([f"Review {i} was long enough to keep here. Short one.<br /><br />Another sentence number {i} "
                        "stays in the pool!", "imdb" if i % 3 else "other"])
    out_a = transfer_sentences(src, tmp_path / "a.csv", text_field="text", n=10, seed=1, filter={"source": "imdb"},
                               exclude=["Review 1 was long enough to keep here."])
    out_b = transfer_sentences(src, tmp_path / "b.csv", text_field="text", n=10, seed=1, filter={"source": "imdb"},
                               exclude=["Review 1 was long enough to keep here."])
    with open(out_a, newline="") as f:
        rows = list(csv.DictReader(f))
    assert out_a.read_text() == out_b.read_text()  # same seed, same file
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts)) == 10
    assert "Review 1 was long enough to keep here." not in texts
    assert all("<br" not in t and len(t.split()) >= 5 for t in texts)
    with pytest.raises(DataError, match="transfer_examples"):
        transfer_sentences(src, tmp_path / "c.csv", text_field="text", n=1000, seed=1)


def test_distill_learns_from_transfer_data_and_the_baseline_skips_it(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                                     tiny_texts):
    transfer = tmp_path / "transfer.csv"
    with open(transfer, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([[t + " again"] for t, _ in tiny_texts[:64]])
    cfg = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    cfg["data"]["transfer"] = str(transfer)
    [res] = precompute(config_from_dict(cfg))
    reader = cf.CacheReader(res.path)
    assert len(reader) == 200 + 64
    labels = reader.gather([i for i in reader.ids if i.startswith("transfer-")][:4], fields=["label"])["label"]
    assert labels.tolist() == [IGNORE_LABEL] * 4
    assert distill(config_from_dict(cfg)).fit.steps == 17  # (200 + 64) / 16
    cfg["distill"].update({"teacher_signal": "none", "kd": {"hard_weight": 1.0}})
    assert distill(config_from_dict(cfg)).fit.steps == 13  # labels only: the 200 labelled examples
