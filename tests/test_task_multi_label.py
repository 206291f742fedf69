"""data.task: multi_label (several labels per example) end to end on tiny models, its losses, metrics and errors."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

import cache_format as cf
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.config import config_from_dict
from stages.data import DataError
from stages.tasks import get_task
from stages.tasks import MultiLabel
from stages.tasks.multi_label import multi_label_kd_loss, multi_label_scores
from tests.helpers import stage_params

NAMES = ["animal", "color", "vehicle"]
_GROUPS = {"animal": ["cat", "dog", "bird", "horse"], "color": ["red", "blue", "green", "yellow"],
           "vehicle": ["car", "bus", "train", "bike"]}
_FILLER = ["the", "a", "near", "with", "and", "sees", "likes", "old", "small", "big", "today", "there"]


def _rows(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """Texts holding words of 0-3 groups; an example's labels are the groups it mentions (some have none)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        groups = rng.sample(NAMES, rng.randint(0, 3))
        words = rng.sample(_FILLER, rng.randint(2, 5)) + [rng.choice(_GROUPS[g]) for g in groups]
        rng.shuffle(words)
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append((text, [g for g in NAMES if g in groups]))
    return out


@pytest.fixture(scope="module")
def ml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv (120), dev.csv (30), test.csv (30): id,text,labels with names joined by '|'."""
    root = tmp_path_factory.mktemp("multi_label")
    rows = _rows(180, seed=0)
    start = 0
    for name, k in (("train", 120), ("dev", 30), ("test", 30)):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text", "labels"])
            w.writerows((f"m{start + i:03d}", t, "|".join(ls)) for i, (t, ls) in enumerate(rows[start : start + k]))
        start += k
    return root


@pytest.fixture(scope="module")
def ml_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_classifier

    vocab = " ".join(_FILLER + [w for ws in _GROUPS.values() for w in ws])
    return make_tiny_classifier(tmp_path_factory.mktemp("ml_teacher"), num_labels=3, layers=4, hidden=64,
                                heads=4, intermediate=128, vocab_texts=[vocab], seed=1)


def _data(**extra) -> dict:
    return {"task": "multi_label", "label_field": "labels", "label_delimiter": "|", "num_labels": 3,
            "label_names": NAMES, **extra}


def _params(tmp: Path, data: Path, teacher: Path, **sections) -> dict:
    files = {split: str(data / f"{split}.csv") for split in ("train", "dev", "test")}
    return stage_params(tmp, teacher, _data(**files), kd={"hard_weight": 0.5, "temperature": 2.0}, **sections)


def _task(**extra) -> MultiLabel:
    return MultiLabel(config_from_dict({"data": _data(**extra)}).data)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


# -- losses and metrics ------------------------------------------------------------------------------------


def test_kd_losses_by_hand():
    s = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    t = torch.tensor([[1.0, -2.0], [-1.0, 3.0]])
    for kind in ("kl", "ce", "mse"):
        assert multi_label_kd_loss(s, s.clone(), 2.0, kind=kind).item() == pytest.approx(
            0.0 if kind != "ce" else float(_entropy(torch.sigmoid(s / 2)).mean() * 4), abs=1e-6)
    p_s, p_t = torch.sigmoid(s / 2), torch.sigmoid(t / 2)
    kl = (p_t * torch.log(p_t / p_s) + (1 - p_t) * torch.log((1 - p_t) / (1 - p_s))).mean()
    assert multi_label_kd_loss(s, t, 2.0, kind="kl", temperature_squared=False).item() == pytest.approx(kl.item(), rel=1e-5)
    assert multi_label_kd_loss(s, t, 2.0, kind="kl").item() == pytest.approx(4 * kl.item(), rel=1e-5)
    # ce = kl + the teacher's binary entropy (which does not depend on the student).
    ce = multi_label_kd_loss(s, t, 2.0, kind="ce", temperature_squared=False).item()
    assert ce == pytest.approx(kl.item() + _entropy(p_t).mean().item(), rel=1e-5)
    mse = multi_label_kd_loss(s, t, 2.0, kind="mse", temperature_squared=False).item()
    assert mse == pytest.approx(((p_s - p_t) ** 2).mean().item(), rel=1e-6)
    # Logits far out (cached fp16 teachers can hold +-60): finite, no log(0).
    big = torch.tensor([[60.0, -60.0]])
    assert math.isfinite(multi_label_kd_loss(-big, big, 1.0, kind="kl").item())


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p) + (1 - p) * torch.log(1 - p))


def test_hard_loss_is_bce_mean():
    task = _task()
    logits, labels = torch.tensor([[0.0, 1.0, -1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    want = -(math.log(0.5) + math.log(1 - 1 / (1 + math.exp(-1))) + math.log(1 - 1 / (1 + math.exp(1)))) / 3
    assert task.hard_loss(logits, {"labels": labels}).item() == pytest.approx(want, rel=1e-6)


def test_scores_by_hand():
    gold = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    pred = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    s = multi_label_scores(gold, pred)
    # Cells: TP 2 (label 0), FN 1 (ex 1 label 1), FP 1 (ex 2 label 1) -> micro 4 / 6.
    assert s["micro_f1"] == pytest.approx(4 / 6)
    # Label 0: F1 1; label 1: TP 0 -> 0; label 2 never occurs: left out -> macro 0.5.
    assert s["macro_f1"] == pytest.approx(0.5)
    assert s["subset_accuracy"] == pytest.approx(1 / 3)
    assert multi_label_scores(np.zeros((2, 3)), np.zeros((2, 3))) == {"micro_f1": 1.0, "macro_f1": 1.0,
                                                                     "subset_accuracy": 1.0}


def test_predictions_use_the_threshold():
    logits = torch.tensor([[0.0, 1.0, -3.0]])  # probabilities 0.5, 0.73, 0.05
    assert _task().predictions(logits, {}).tolist() == [[1, 1, 0]]
    assert _task(threshold=0.6).predictions(logits, {}).tolist() == [[0, 1, 0]]
    assert get_task(config_from_dict({"data": _data()}).data).head_config() == {
        "problem_type": "multi_label_classification"}


# -- reading labels ----------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_labels_from_a_list_column_and_a_delimited_string(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"id": "a", "text": "red car", "labels": ["color", "vehicle"]}\n'
                     '{"id": "b", "text": "the sun", "labels": []}\n'
                     '{"id": "c", "text": "a cat", "labels": ["animal", "animal"]}\n')
    ex = _task(label_delimiter=None).load(jsonl)
    assert ex.labels.dtype == np.float32 and ex.labels.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    path = _csv(tmp_path / "d.csv", [["id", "text", "labels"], ["a", "red car", "color | vehicle"],
                                     ["b", "the sun", ""], ["c", "a cat", "animal"]])
    assert _task().load(path).labels.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    # Int ids, no names: "0|2" strings, and a column of single ints.
    ids = _csv(tmp_path / "ids.csv", [["id", "text", "labels"], ["a", "red car", "1|2"], ["b", "a cat", "0"]])
    cfg = config_from_dict({"data": {"task": "multi_label", "label_field": "labels", "label_delimiter": "|",
                                     "num_labels": 3}})
    assert MultiLabel(cfg.data).load(ids).labels.tolist() == [[0, 1, 1], [1, 0, 0]]


def test_a_string_column_without_a_delimiter_says_to_set_it(tmp_path):
    path = _csv(tmp_path / "d.csv", [["id", "text", "labels"], ["a", "red car", "color|vehicle"]])
    with pytest.raises(DataError, match=r"set data\.label_delimiter") as err:
        _task(label_delimiter=None).load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_text_labels_without_names_list_the_names_found(tmp_path):
    path = _csv(tmp_path / "d.csv", [["id", "text", "labels"], ["a", "red car", "color|vehicle"],
                                     ["b", "a cat", "animal"]])
    cfg = config_from_dict({"data": {"task": "multi_label", "label_field": "labels", "label_delimiter": "|",
                                     "num_labels": 3}})
    with pytest.raises(DataError) as err:
        MultiLabel(cfg.data).load(path)
    assert 'data.label_names: ["animal", "color", "vehicle"]' in str(err.value) and str(path) in str(err.value)


def test_an_unknown_label_is_one_line_naming_example_and_label(tmp_path):
    path = _csv(tmp_path / "d.csv", [["id", "text", "labels"], ["a", "red car", "color|vehicle"],
                                     ["b", "a cat", "animal|pet"]])
    with pytest.raises(DataError) as err:
        _task().load(path)
    msg = str(err.value)
    assert "example b (row 2)" in msg and "'pet'" in msg and str(path) in msg and "\n" not in msg
    assert "add it to data.label_names" in msg


def test_an_id_out_of_range_is_refused(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"id": "a", "text": "red car", "labels": [1, 3]}\n')
    cfg = config_from_dict({"data": {"task": "multi_label", "label_field": "labels", "num_labels": 3}})
    with pytest.raises(DataError, match=r"example a \(row 1\) .* has label 3, outside the valid range \[0, 3\)"):
        MultiLabel(cfg.data).load(jsonl)


# -- end to end --------------------------------------------------------------------------------------------


def test_multi_label_end_to_end(tmp_path, ml_dir, ml_teacher):
    cfg = config_from_dict(_params(tmp_path, ml_dir, ml_teacher))
    [res] = train_teacher(cfg)
    assert set(res.fit.dev) == {"micro_f1", "macro_f1", "subset_accuracy"}
    saved = AutoConfig.from_pretrained(tmp_path / "teacher")
    assert saved.problem_type == "multi_label_classification"
    assert saved.id2label == {0: "animal", 1: "color", 2: "vehicle"}

    [cache] = precompute(cfg)
    reader = cf.CacheReader(cache.path)
    assert reader.fields["logits"].shape == (3,) and reader.fields["label"].shape == (3,)
    first = next(csv.DictReader(open(ml_dir / "train.csv")))
    want = [float(n in first["labels"].split("|")) for n in NAMES]
    assert reader.get(first["id"])["label"].tolist() == want

    distill(cfg)
    metrics = json.loads((tmp_path / "m_distill.json").read_text())
    assert {"dev_micro_f1", "dev_macro_f1", "dev_subset_accuracy"} <= set(metrics)
    student = AutoConfig.from_pretrained(tmp_path / "student")
    assert student.problem_type == "multi_label_classification" and student.label2id["vehicle"] == 2
    distill(config_from_dict(_params(tmp_path, ml_dir, ml_teacher,
                                     distill={"teacher_signal": "none", "output": str(tmp_path / "baseline")})))

    results = evaluate(config_from_dict(_params(tmp_path, ml_dir, ml_teacher, evaluate={"models": {
        "teacher": str(tmp_path / "teacher"), "student": str(tmp_path / "student"),
        "baseline": str(tmp_path / "baseline")}})))
    for r in results.values():
        assert 0 <= r["micro_f1"] <= 1 and 0 <= r["macro_f1"] <= 1 and 0 <= r["subset_accuracy"] <= 1
        assert r["examples"] == 30


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_cached_float32_and_online_give_the_same_student(tmp_path, ml_dir, ml_teacher, kind):
    common = {"epochs": 0.5, "kd": {"loss": kind, "hard_weight": 0.5, "temperature": 2.0}}
    precompute(config_from_dict(_params(tmp_path, ml_dir, ml_teacher)))
    distill(config_from_dict(_params(tmp_path, ml_dir, ml_teacher,
                                     distill={**common, "output": str(tmp_path / "s_cached")})))
    distill(config_from_dict(_params(tmp_path, ml_dir, ml_teacher,
                                     distill={**common, "teacher_signal": "online",
                                              "output": str(tmp_path / "s_online")})))
    distill(config_from_dict(_params(tmp_path, ml_dir, ml_teacher,
                                     distill={**common, "teacher_signal": "none", "output": str(tmp_path / "s_none")})))
    a, b, c = (_weights(tmp_path / n) for n in ("s_cached", "s_online", "s_none"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # the teacher term changed the student


def test_an_unseen_label_at_evaluation_is_an_error_naming_it(tmp_path, ml_dir, ml_teacher):
    test = tmp_path / "test.csv"
    lines = (ml_dir / "test.csv").read_text().splitlines()
    lines.append("m999,the red boat,color|boat")
    test.write_text("\n".join(lines) + "\n")
    p = _params(tmp_path, ml_dir, ml_teacher, evaluate={"models": {"teacher": str(ml_teacher)}})
    p["data"]["test"] = str(test)
    with pytest.raises(DataError) as err:
        evaluate(config_from_dict(p))
    assert "example m999 (row 31)" in str(err.value) and "'boat'" in str(err.value)
    assert not (tmp_path / "m_eval.json").exists()


# -- the real model (opt in: pytest -m slow) ----------------------------------------------------------------


@pytest.mark.slow
def test_multi_label_with_the_bundled_minilm(tmp_path, ml_dir):
    """The hand-made topic set through every stage with the real MiniLM teacher (no quality threshold: one
    short epoch; the checks are on what each stage writes), string labels kept in the saved models."""
    models = tmp_path / "models"
    p = _params(tmp_path, ml_dir, Path("bundled:all-MiniLM-L6-v2"))
    p["train_teacher"].update(model="bundled:all-MiniLM-L6-v2", output=str(models / "teacher"), lr=5e-5)
    p["precompute"]["teachers"] = [str(models / "teacher")]
    p["distill"].update(student={"config": str(models / "teacher"), "num_layers": 2, "hidden_size": 192,
                                 "intermediate_size": 768, "num_heads": 3}, lr=5e-4, output=str(models / "student"))
    p["evaluate"]["models"] = {"teacher": str(models / "teacher"), "student": str(models / "student")}
    cfg = config_from_dict(p)
    train_teacher(cfg)
    [cache] = precompute(cfg)
    assert cache.written == 120 and cf.CacheReader(cache.path).fields["logits"].shape == (3,)
    distill(cfg)
    for name in ("teacher", "student"):
        saved = AutoConfig.from_pretrained(models / name)
        assert saved.problem_type == "multi_label_classification" and list(saved.label2id) == NAMES
    results = evaluate(cfg)
    for r in results.values():
        assert r["examples"] == 30 and 0 <= r["micro_f1"] <= 1 and 0 <= r["subset_accuracy"] <= 1
