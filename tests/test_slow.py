"""Every stage on the REAL bundled model and data (opt in: `pytest -m slow tests/test_slow.py`).

The repository's params.yaml, with a 400-example Rotten Tomatoes split, 200 IMDB transfer sentences,
one short epoch per training stage and every path moved into a temporary folder. Each stage is a
module-scoped fixture built on the previous one, so a test run alone still runs the stages it needs.
About half a minute on 2 CPU cores (no quality threshold: one short epoch on 320 examples is too
little to fine-tune; the checks are on what each stage writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import cache_format as cf
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.prepare import prepare
from stages.train_teacher import train_teacher
from stages.config import Config, config_from_dict
from stages.data import load_examples
from stages.models import load_classifier
from stages.models import resolve_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_EXAMPLES = 400
TRANSFER = 200


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        base[k] = _deep_update(base.get(k) or {}, v) if isinstance(v, dict) and k != "models" else v
    return base


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The repository's params.yaml, shrunk (sizes, epochs) and pointed at a temporary folder."""
    root = tmp_path_factory.mktemp("slow")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["prepare"]["source"] == "bundled:rotten_tomatoes"
    assert params["train_teacher"]["model"] == "bundled:all-MiniLM-L6-v2"
    data, models, metrics = root / "data", root / "models", root / "metrics"
    return config_from_dict(_deep_update(params, {
        "data": {s: str(data / f"{s}.csv") for s in ("train", "dev", "test", "transfer")},
        "prepare": {"max_examples": MAX_EXAMPLES, "transfer_examples": TRANSFER, "out_dir": str(data)},
        "train_teacher": {"output": str(models / "teacher"), "epochs": 1, "metrics": str(metrics / "teacher.json")},
        "precompute": {"teachers": [str(models / "teacher")], "cache_root": str(root / "caches")},
        "distill": {"student": {"config": str(models / "teacher")}, "epochs": 1, "output": str(models / "student"),
                    "log_dir": str(root / "dvclive"), "metrics": str(metrics / "distill.json")},
        "evaluate": {"models": {"teacher": str(models / "teacher"), "student": str(models / "student")},
                     "throughput_batches": 2, "output": str(metrics / "evaluate.json"),
                     "predictions": str(metrics / "predictions.json")},
    }))


@pytest.fixture(scope="module")
def prepared(cfg: Config) -> dict[str, Path]:
    return prepare(cfg)


@pytest.fixture(scope="module")
def teacher(cfg: Config, prepared: dict[str, Path]):
    [result] = train_teacher(cfg)
    return result


@pytest.fixture(scope="module")
def cache(cfg: Config, teacher):
    [res] = precompute(cfg)
    return res


@pytest.fixture(scope="module")
def student(cfg: Config, cache):
    return distill(cfg)


def _n(path: str | Path) -> int:
    return len(load_examples(path, text_field="text"))


def test_prepare_writes_a_disjoint_stratified_split(cfg: Config, prepared: dict[str, Path]):
    assert set(prepared) == {"train", "dev", "test", "transfer"}
    splits = {s: load_examples(prepared[s], text_field="text", label_field="label", id_field="id", num_labels=2)
              for s in ("train", "dev", "test")}
    assert sum(len(e) for e in splits.values()) == MAX_EXAMPLES
    assert len(splits["train"]) == pytest.approx(0.8 * MAX_EXAMPLES, abs=2)
    for e in splits.values():
        assert set(e.labels) == {0, 1}  # stratified: both classes in every split
    texts = [set(e.texts) for e in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    transfer = load_examples(prepared["transfer"], text_field="text")
    assert len(transfer) == TRANSFER and transfer.labels is None
    assert not set(transfer.texts) & set().union(*texts)  # no labelled text leaks into the transfer set
    assert (Path(cfg.prepare.out_dir) / "split.json").exists()


def test_train_teacher_fine_tunes_the_bundled_model(cfg: Config, teacher):
    out = Path(cfg.train_teacher.output)
    assert (out / "config.json").exists() and not (out / "checkpoint").exists()
    n_train = _n(cfg.data.train)
    assert teacher.fit.steps == -(-n_train // cfg.train_teacher.batch_size)  # one epoch
    metrics = json.loads(Path(cfg.train_teacher.metrics).read_text())
    assert 0.0 <= metrics["dev_accuracy"] <= 1.0
    base = load_classifier(resolve_model(cfg.train_teacher.model), 2, head="if_missing").state_dict()  # a base model
    tuned = load_classifier(str(out), 2).state_dict()
    key = "bert.encoder.layer.5.output.dense.weight"
    assert key in tuned and not torch.equal(base[key], tuned[key])  # the encoder itself was trained


def test_precompute_writes_a_verified_cache_then_is_up_to_date(cfg: Config, cache):
    expected = _n(cfg.data.train) + TRANSFER  # the transfer sentences are cached with the training split
    assert cache.status == "written" and cache.written == cache.examples == expected
    report = cf.verify_cache(cache.path)
    assert report.ok, report.problems
    assert report.count == expected
    reader = cf.CacheReader(cache.path)
    logits = reader.gather(reader.ids[:64], ["logits"])["logits"]
    assert logits.shape == (64, 2) and bool(torch.isfinite(torch.from_numpy(logits.astype("float32"))).all())
    [again] = precompute(cfg)
    assert again.status == "up to date" and again.path == cache.path and again.written == 0


def test_distill_trains_a_smaller_student_from_the_cache(cfg: Config, cache, student):
    assert student.teacher_signal == "cached" and student.caches == [str(cache.path)]
    assert student.fit.steps == -(-cache.examples // cfg.distill.batch_size)
    metrics = json.loads(Path(cfg.distill.metrics).read_text())
    assert 0.0 <= metrics["dev_accuracy"] <= 1.0
    model = load_classifier(str(student.output), 2)
    assert model.config.num_hidden_layers == cfg.distill.student.num_layers
    assert model.config.hidden_size == cfg.distill.student.hidden_size
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluate_reports_both_models_on_the_test_split(cfg: Config, student):
    results = evaluate(cfg)
    assert set(results) == {"teacher", "student"}
    n_test = _n(cfg.data.test)
    for r in results.values():
        assert r["examples"] == n_test and r["split"] == "test"
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        assert r["examples_per_second"] > 0
    assert results["student"]["parameters"] < results["teacher"]["parameters"] / 2
    assert json.loads(Path(cfg.evaluate.output).read_text()) == results
