"""Sentence-pair classification (data.text_pair_field) end to end on a tiny hand-made task.

Task: does the second sentence repeat a word of the first (label 1) or not (label 0)? The answer depends on
both sentences, so a pipeline that dropped the pair could not tell the examples apart.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import cache_format as cf
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.config import config_from_dict
from stages.data import content_ids
from stages.models import load_tokenizer
from stages.tasks import get_task

_WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "garden", "window", "silver", "forest", "candle",
          "bridge", "planet", "ocean", "summer", "winter"]


def _pairs(n: int, seed: int) -> list[tuple[str, str, int]]:
    rng = random.Random(seed)
    out, seen = [], set()
    # The first sentences repeat across pairs, so only the pair tells two rows apart.
    firsts = [" ".join(rng.sample(_WORDS, 4)) for _ in range(20)]
    while len(out) < n:
        first = rng.choice(firsts)
        a = first.split()
        label = len(out) % 2
        rest = [w for w in _WORDS if w not in a]
        second = rng.sample(rest, 2) + ([rng.choice(a)] if label else [rng.choice(rest)])
        rng.shuffle(second)
        if (first, " ".join(second)) in seen:
            continue
        seen.add((first, " ".join(second)))
        out.append((first, " ".join(second), label))
    return out


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv (120), dev.csv (30), test.csv (30) with columns sentence1,sentence2,label and no id column."""
    root = tmp_path_factory.mktemp("pairs")
    rows = _pairs(180, seed=0)
    start = 0
    for name, k in (("train", 120), ("dev", 30), ("test", 30)):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence1", "sentence2", "label"])
            w.writerows(rows[start : start + k])
        start += k
    return root


@pytest.fixture(scope="module")
def pair_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("pair_teacher"), num_labels=2, layers=4, hidden=64,
                                heads=4, intermediate=128, vocab_texts=[" ".join(_WORDS)], seed=1)


def _params(tmp: Path, data: Path, teacher: Path, **distill_extra) -> dict:
    return {
        "data": {"train": str(data / "train.csv"), "dev": str(data / "dev.csv"), "test": str(data / "test.csv"),
                 "text_field": "sentence1", "text_pair_field": "sentence2", "id_field": None},
        "train_teacher": {"model": str(teacher), "output": str(tmp / "teacher"), "epochs": 1, "batch_size": 16,
                          "max_length": 32, "lr": 1e-3, "metrics": str(tmp / "m_teacher.json")},
        "precompute": {"teachers": [str(tmp / "teacher")], "cache_root": str(tmp / "caches"), "batch_size": 16,
                       "max_length": 32, "dtype": "float32"},
        "distill": {"student": {"from_teacher": str(tmp / "teacher"), "keep_layers": [0, 3]}, "epochs": 1,
                    "batch_size": 16, "max_length": 32, "lr": 1e-3, "output": str(tmp / "student"),
                    "log_dir": str(tmp / "live"), "metrics": str(tmp / "m_distill.json"),
                    "kd": {"hard_weight": 0.5}, **distill_extra},
        "evaluate": {"models": {"teacher": str(tmp / "teacher"), "student": str(tmp / "student"),
                                "online": str(tmp / "s_online")},
                     "max_length": 32, "throughput_batches": 1, "output": str(tmp / "m_eval.json"),
                     "predictions": str(tmp / "m_preds.json")},
    }


def test_sentence_pairs_end_to_end(tmp_path, pair_dir, pair_teacher):
    cfg = config_from_dict(_params(tmp_path, pair_dir, pair_teacher))
    task = get_task(cfg.data)
    train = task.load(pair_dir / "train.csv")
    assert train.text_pairs is not None and len(set(train.texts)) < len(train)  # first sentences repeat
    assert train.ids == content_ids(train.texts, train.text_pairs)  # ids hash the pair too: all distinct
    enc = task.encode(load_tokenizer(str(pair_teacher)), train, 32)
    assert enc.token_type_ids is not None and set(np.unique(enc.token_type_ids).tolist()) == {0, 1}

    train_teacher(cfg)
    [cache] = precompute(cfg)
    reader = cf.CacheReader(cache.path)
    assert len(reader) == 120
    # Two rows with the same first sentence and different second ones: the teacher saw the pair.
    first = train.texts[0]
    same = [i for i, t in enumerate(train.texts) if t == first][:2]
    assert len(same) == 2
    a, b = (reader.get(train.ids[i])["logits"] for i in same)
    assert not np.array_equal(a, b)
    # The cached length counts both sentences' tokens: [CLS] s1 [SEP] s2 [SEP] (one token a word here).
    want = len(first.split()) + len(train.text_pairs[0].split()) + 3
    assert int(reader.get(train.ids[0])["length"]) == int(enc.lengths[0]) == want

    distill(cfg)
    online = _params(tmp_path, pair_dir, pair_teacher, teacher_signal="online", output=str(tmp_path / "s_online"))
    distill(config_from_dict(online))
    w1 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").state_dict()
    w2 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s_online").state_dict()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5

    results = evaluate(cfg)
    assert set(results) == {"teacher", "student", "online"}
    for r in results.values():
        assert 0 <= r["accuracy"] <= 1 and r["examples"] == 30
    preds = json.loads((tmp_path / "m_preds.json").read_text())
    assert len(preds["ids"]) == 30


def test_a_pair_column_with_an_empty_cell_names_the_row(tmp_path, pair_dir, pair_teacher):
    from stages.data import DataError

    bad = tmp_path / "train.csv"
    lines = (pair_dir / "train.csv").read_text().splitlines()
    s1, _, label = lines[3].split(",")
    lines[3] = f"{s1},,{label}"
    bad.write_text("\n".join(lines) + "\n")
    p = _params(tmp_path, pair_dir, pair_teacher)
    p["data"]["train"] = str(bad)
    with pytest.raises(DataError) as err:
        precompute(config_from_dict(p))
    assert "(row 3)" in str(err.value) and "empty text pair" in str(err.value) and str(bad) in str(err.value)
