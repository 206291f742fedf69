"""data.task: regression (one float target, STS-style) end to end on tiny models, its errors and metrics."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForSequenceClassification

import cache_format as cf
from pipeline.cli import cli
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.config import ConfigError, config_from_dict
from stages.data import DataError
from stages.losses import LossInputError
from stages.tasks import get_task
from stages.tasks import Regression
from stages.tasks.regression import pearson, spearman
from tests.helpers import stage_params

_WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "eats", "big", "small", "old", "new",
          "house", "tree", "river", "car", "road", "sun", "moon"]


def _pairs(n: int, seed: int) -> list[tuple[str, str, float]]:
    """Sentence pairs scored by word overlap (Jaccard), a similarity a model can learn from tokens."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        a = rng.sample(_WORDS, rng.randint(3, 6))
        b = rng.sample(a, rng.randint(0, len(a))) + rng.sample(_WORDS, rng.randint(1, 3))
        rng.shuffle(b)
        key = (" ".join(a), " ".join(b))
        if key in seen:
            continue
        seen.add(key)
        out.append((key[0], key[1], round(len(set(a) & set(b)) / len(set(a) | set(b)), 4)))
    return out


@pytest.fixture(scope="module")
def sts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train.csv (120 pairs), dev.csv (30), test.csv (30): id,text,text_pair,label (a float)."""
    root = tmp_path_factory.mktemp("sts")
    rows = _pairs(180, seed=0)
    start = 0
    for name, k in (("train", 120), ("dev", 30), ("test", 30)):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "text", "text_pair", "label"])
            w.writerows((f"p{start + i:03d}", *row) for i, row in enumerate(rows[start : start + k]))
        start += k
    return root


@pytest.fixture(scope="module")
def reg_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_classifier

    return make_tiny_classifier(tmp_path_factory.mktemp("reg_teacher"), num_labels=1, layers=4, hidden=64,
                                heads=4, intermediate=128, vocab_texts=[" ".join(_WORDS)], seed=1)


def _params(tmp: Path, data: Path, teacher: Path, **sections) -> dict:
    files = {split: str(data / f"{split}.csv") for split in ("train", "dev", "test")}
    return stage_params(tmp, teacher, {"task": "regression", **files, "text_pair_field": "text_pair"},
                        kd={"loss": "mse", "hard_weight": 0.5}, **sections)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


# -- metrics and losses ------------------------------------------------------------------------------------


def test_pearson_and_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert pearson(x, np.ones(4)) == 0.0  # constant predictions: no linear relation, not NaN in the metrics
    # Monotone but not linear: Spearman 1, Pearson below 1.
    assert spearman(x, x ** 3) == pytest.approx(1.0) and pearson(x, x ** 3) < 0.99
    # Ties get average ranks: y ranks are [1.5, 1.5, 3, 4]; Pearson of [1,2,3,4] with them is 0.9486833.
    assert spearman(x, np.array([5.0, 5.0, 6.0, 7.0])) == pytest.approx(0.9486833, abs=1e-6)


def test_spearman_agrees_with_scipy_on_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 7, 200).astype(float)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_losses():
    task = _task()
    s, t = torch.tensor([[0.5], [1.0]]), torch.tensor([[0.5], [2.0]])
    kd = task.kd_loss(s, t, {}, temperature=4.0, kind="mse", temperature_squared=True)
    assert kd.item() == pytest.approx(0.5)  # ((0)^2 + (1)^2) / 2: no temperature, no T^2
    assert task.kd_loss(s, s, {}, temperature=4.0, kind="mse", temperature_squared=True).item() == 0.0
    with pytest.raises(LossInputError, match="distill.kd.loss: mse"):
        task.kd_loss(s, t, {}, temperature=1.0, kind="kl", temperature_squared=True)
    assert task.hard_loss(s, {"labels": torch.tensor([1.5, 1.0])}).item() == pytest.approx(0.5)


def test_settings_for_regression():
    cfg = config_from_dict({"data": {"task": "regression"}, "distill": {"kd": {"loss": "mse"}}})
    task = get_task(cfg.data)
    assert task.num_labels == 1 and cfg.data.num_labels == 2  # the default num_labels is not read, not an error
    assert task.logits_shape() == (1,)
    with pytest.raises(ConfigError, match="distill.kd.loss"):
        config_from_dict({"data": {"task": "regression"}})  # kl is the default: refused for one number


# -- data errors -------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _task() -> Regression:
    return Regression(config_from_dict({"data": {"task": "regression"}, "distill": {"kd": {"loss": "mse"}}}).data)


def test_int_targets_are_read_as_floats(tmp_path):
    path = _write(tmp_path / "d.csv", [["id", "text", "label"], ["a", "red cat", 1], ["b", "blue dog", 0]])
    ex = _task().load(path)
    assert ex.labels.dtype == np.float64 and ex.labels.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("bad, what", [("high", "target 'high', not a number"), ("inf", "target inf"),
                                       ("nan", "no target (empty or NaN)"), ("", "no target")])
def test_a_target_that_is_not_a_number_is_one_line_naming_file_and_row(tmp_path, bad, what):
    path = _write(tmp_path / "d.csv", [["id", "text", "label"], ["a", "red cat", "0.5"], ["b", "blue dog", bad]])
    with pytest.raises(DataError) as err:
        _task().load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "example b (row 2)" in msg and what in msg
    assert "finite number" in msg  # the fix


def test_cli_names_a_bad_target_in_one_line(tmp_path, sts_dir, reg_teacher):
    import yaml

    bad = tmp_path / "train.csv"
    lines = (sts_dir / "train.csv").read_text().splitlines()
    parts = lines[5].rsplit(",", 1)
    lines[5] = parts[0] + ",very similar"
    bad.write_text("\n".join(lines) + "\n")
    p = _params(tmp_path, sts_dir, reg_teacher)
    p["data"]["train"] = str(bad)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    r = CliRunner().invoke(cli, ["precompute", "--params", str(tmp_path / "params.yaml")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "example p004 (row 5)" in r.output and "'very similar', not a number" in r.output
    assert not (tmp_path / "caches").exists() or not any((tmp_path / "caches").iterdir())


# -- end to end --------------------------------------------------------------------------------------------


def test_regression_end_to_end(tmp_path, sts_dir, reg_teacher):
    cfg = config_from_dict(_params(tmp_path, sts_dir, reg_teacher))
    [res] = train_teacher(cfg)
    assert set(res.fit.dev) == {"pearson", "spearman", "mse"}
    saved = AutoConfig.from_pretrained(tmp_path / "teacher")
    assert saved.problem_type == "regression" and saved.num_labels == 1

    [cache] = precompute(cfg)
    reader = cf.CacheReader(cache.path)
    assert reader.fields["logits"].shape == (1,) and reader.fields["label"].dtype == "float32"
    got = reader.get("p000")["label"]
    assert float(got) == pytest.approx(float((sts_dir / "train.csv").read_text().splitlines()[1].rsplit(",", 1)[1]))

    out = distill(cfg)
    assert out.fit.steps == 8
    metrics = json.loads((tmp_path / "m_distill.json").read_text())
    assert {"dev_pearson", "dev_spearman", "dev_mse"} <= set(metrics)
    assert AutoConfig.from_pretrained(tmp_path / "student").problem_type == "regression"

    baseline = _params(tmp_path, sts_dir, reg_teacher,
                       distill={"teacher_signal": "none", "output": str(tmp_path / "baseline")})
    distill(config_from_dict(baseline))

    cfg = config_from_dict(_params(tmp_path, sts_dir, reg_teacher, evaluate={"models": {
        "teacher": str(tmp_path / "teacher"), "student": str(tmp_path / "student"),
        "baseline": str(tmp_path / "baseline")}}))
    results = evaluate(cfg)
    for name in ("teacher", "student", "baseline"):
        r = results[name]
        assert -1 <= r["pearson"] <= 1 and -1 <= r["spearman"] <= 1 and r["mse"] >= 0 and r["examples"] == 30
    # The three models differ (labels-only training does not see the teacher).
    assert len({results[n]["mse"] for n in results}) == 3


def test_cached_float32_and_online_give_the_same_student(tmp_path, sts_dir, reg_teacher):
    common = {"epochs": 0.5, "kd": {"loss": "mse", "hard_weight": 0.5}}
    precompute(config_from_dict(_params(tmp_path, sts_dir, reg_teacher)))
    distill(config_from_dict(_params(tmp_path, sts_dir, reg_teacher,
                                     distill={**common, "output": str(tmp_path / "s_cached")})))
    distill(config_from_dict(_params(tmp_path, sts_dir, reg_teacher,
                                     distill={**common, "teacher_signal": "online",
                                              "output": str(tmp_path / "s_online")})))
    distill(config_from_dict(_params(tmp_path, sts_dir, reg_teacher,
                                     distill={**common, "teacher_signal": "none",
                                              "output": str(tmp_path / "s_none")})))
    a, b, c = (_weights(tmp_path / n) for n in ("s_cached", "s_online", "s_none"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # The teacher term matters: without it the same seed and data give another student.
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4


def test_a_classifier_teacher_is_refused_for_regression(tmp_path, sts_dir, tiny_teacher_dir):
    from stages.models import ModelError

    with pytest.raises(ModelError, match="2-label"):
        precompute(config_from_dict(_params(tmp_path, sts_dir, tiny_teacher_dir)))


# -- the real model on the real set (opt in: pytest -m slow) ------------------------------------------------


@pytest.mark.slow
def test_lee_similarity_with_the_bundled_minilm(tmp_path):
    """Lee pairs (gensim's lee.cor, fetched once from PyPI) through every stage with the real MiniLM teacher.

    400 of the 1,225 pairs and one short epoch per training stage: no quality threshold (too little to
    fine-tune); the checks are on what each stage writes and that the metrics are real correlations.
    """
    from stages.prepare import prepare

    data, models = tmp_path / "data", tmp_path / "models"
    p = _params(tmp_path, data, Path("bundled:all-MiniLM-L6-v2"))
    p["prepare"] = {"source": "bundled:lee_similarity", "max_examples": 400, "out_dir": str(data)}
    p["train_teacher"].update(model="bundled:all-MiniLM-L6-v2", output=str(models / "teacher"), lr=5e-5,
                              max_length=64)
    p["precompute"].update(teachers=[str(models / "teacher")], max_length=64)
    p["distill"].update(student={"config": str(models / "teacher"), "num_layers": 2, "hidden_size": 192,
                                 "intermediate_size": 768, "num_heads": 3}, max_length=64, lr=5e-4,
                        output=str(models / "student"))
    p["evaluate"].update(models={"teacher": str(models / "teacher"), "student": str(models / "student")},
                         max_length=64)
    cfg = config_from_dict(p)
    paths = prepare(cfg)
    header = (data / "train.csv").read_text().splitlines()[0]
    assert header == '"id","text","text_pair","label"' and set(paths) == {"train", "dev", "test"}

    [res] = train_teacher(cfg)
    assert set(res.fit.dev) == {"pearson", "spearman", "mse"}
    assert AutoConfig.from_pretrained(models / "teacher").problem_type == "regression"
    [cache] = precompute(cfg)
    assert cache.written == 320 and cf.CacheReader(cache.path).fields["logits"].shape == (1,)
    distill(cfg)
    results = evaluate(cfg)
    for r in results.values():
        assert r["examples"] == 40 and all(np.isfinite(r[k]) for k in ("pearson", "spearman", "mse"))
        assert -1 <= r["pearson"] <= 1 and 0 <= r["mse"] < 1  # scores are in [0.2, 1]
    assert results["student"]["parameters"] < results["teacher"]["parameters"] / 3
