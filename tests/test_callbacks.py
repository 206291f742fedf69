"""Evaluation every N steps, keep_best, gs{step} snapshots and user callbacks, through the one training loop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from pipeline.cli import cli
from stages.distill import distill
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.train import RUN_FILE, CallbackError
from stages.config import ConfigError, config_from_dict
from stages.tasks import SequenceClassification
from tests.helpers import stage_params

# What the callbacks below saw and do; the tests reset it. They are imported by path, as a user's would be.
CALLS: list[dict] = []
RAISE_AT: set[int] = set()


def record(*, step, metrics, model):
    """A callback: remembers its arguments and returns a number derived from the metrics."""
    CALLS.append({"step": step, "metrics": dict(metrics), "model": type(model).__name__, "training": model.training})
    model.eval()  # the loop restores train mode
    torch.rand(3)  # and the RNG: training must not depend on what a callback does
    return {"double_accuracy": 2 * metrics["accuracy"], "note": "ok"}


def flaky(*, step, metrics, model):
    """A callback that raises at the steps in RAISE_AT."""
    if step in RAISE_AT:
        raise RuntimeError(f"no disk left\nat step {step}")
    return step


NOT_A_FUNCTION = 3


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    RAISE_AT.clear()


@pytest.fixture()
def cached(tmp_path, tiny_data_dir, tiny_teacher_dir):
    """A function making distill params (the teacher cache written once)."""

    def params(name: str = "student", **distill_settings) -> dict:
        files = {split: str(tiny_data_dir / f"{split}.csv") for split in ("train", "dev", "test")}
        p = stage_params(tmp_path, tiny_teacher_dir, files)
        p["distill"].update(output=str(tmp_path / name), log_dir=str(tmp_path / f"live_{name}"),
                            metrics=str(tmp_path / f"m_{name}.json"), **distill_settings)
        return p

    precompute(config_from_dict(params()))
    return params


@pytest.fixture()
def scripted(monkeypatch):
    """Adds a dev metric `score` whose value at each step the test sets (real accuracy stays)."""
    now = {"step": 0}
    script: dict[int, float] = {}
    orig = SequenceClassification.evaluate

    def evaluate(self, model, data, batch_size, device):
        return {**orig(self, model, data, batch_size, device), "score": script.get(now["step"], 0.0),
                "loss": -script.get(now["step"], 0.0)}

    monkeypatch.setattr(SequenceClassification, "evaluate", evaluate)
    return script, lambda step: now.update(step=step)


def _weights(path: Path, cls=AutoModelForSequenceClassification) -> dict[str, torch.Tensor]:
    return cls.from_pretrained(path).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_every_snapshots_and_callbacks(tmp_path, cached, capsys):
    out = tmp_path / "student"
    res = distill(config_from_dict(cached(epochs=2, eval_every=5, snapshots=True,
                                          callbacks=["tests.test_callbacks:record"])))
    steps = [5, 10, 15, 20, 25, 26]  # 2 epochs x 13 steps: every 5 steps and the last, not the epoch end (13)
    assert res.fit.steps == 26 and [e["step"] for e in res.fit.evaluations] == steps

    # Each snapshot loads with from_pretrained; the last is the saved model (no keep_best).
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == sorted(f"gs{s}" for s in steps)
    final = _weights(out)
    assert _same(_weights(out / "snapshots" / "gs26"), final)
    assert not _same(_weights(out / "snapshots" / "gs5"), final)
    assert not (out / "checkpoint").exists() and not list(out.parent.glob("student.*"))

    # The callback got each evaluation's step, metrics and model (in train mode); its return is logged.
    assert [c["step"] for c in CALLS] == steps
    run = json.loads((out / RUN_FILE).read_text())
    for call, ev in zip(CALLS, run["evaluations"]):
        assert call["metrics"] == ev["dev"] and call["model"] == "BertForSequenceClassification" and call["training"]
        assert ev["snapshot"] == f"snapshots/gs{ev['step']}"
        assert ev["callbacks"]["tests.test_callbacks:record"] == {"double_accuracy": 2 * ev["dev"]["accuracy"],
                                                                 "note": "ok"}
    assert run["settings"]["eval_every"] == 5 and run["settings"]["callbacks"] == ["tests.test_callbacks:record"]
    logged = (tmp_path / "live_student" / "plots" / "metrics" / "callbacks" / "tests.test_callbacks.record"
              / "double_accuracy.tsv").read_text().splitlines()
    assert len(logged) == 1 + len(steps)  # header + one row per evaluation
    assert "callback tests.test_callbacks:record -> {'double_accuracy'" in capsys.readouterr().out

    # Callbacks change nothing about training: same weights as a run without them.
    distill(config_from_dict(cached("plain", epochs=2, eval_every=5)))
    assert _same(_weights(tmp_path / "plain"), final)


@pytest.mark.parametrize("keep_best, best_step", [("score", 10), ("min:loss", 10), ("accuracy", None)])
def test_keep_best_saves_the_best_snapshot(tmp_path, cached, scripted, keep_best, best_step):
    script, at_step = scripted
    script.update({5: 0.3, 10: 0.9, 13: 0.5})  # score; loss = -score, so min:loss picks the same step
    res = distill(config_from_dict(cached(eval_every=5, snapshots=True, keep_best=keep_best)), on_step=at_step)
    evaluations = res.fit.evaluations
    assert [e["step"] for e in evaluations] == [5, 10, 13]
    if best_step is None:  # real accuracy: the first step with the highest value
        best = max(e["dev"]["accuracy"] for e in evaluations)
        best_step = next(e["step"] for e in evaluations if e["dev"]["accuracy"] == best)
    out = tmp_path / "student"
    assert res.fit.best_step == best_step
    assert _same(_weights(out), _weights(out / "snapshots" / f"gs{best_step}"))
    if best_step != 13:
        assert not _same(_weights(out), _weights(out / "snapshots" / "gs13"))
    metrics = json.loads((tmp_path / "m_student.json").read_text())
    best_dev = next(e["dev"] for e in evaluations if e["step"] == best_step)
    assert metrics["best_step"] == best_step and metrics["dev_accuracy"] == best_dev["accuracy"]
    assert json.loads((out / RUN_FILE).read_text())["best_step"] == best_step


def test_unknown_keep_best_metric_lists_the_metrics(cached):
    with pytest.raises(ConfigError, match=r"keep_best: 'acc' is not a dev metric.*accuracy, macro_f1") as e:
        distill(config_from_dict(cached(keep_best="acc", eval_every=3)))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs dev metrics, but there is no dev split"):
        p = cached(keep_best="accuracy")
        p["data"]["dev"] = None
        distill(config_from_dict(p))


def test_a_raising_callback_keeps_the_checkpoint_and_resume_finishes_the_same_run(tmp_path, cached, scripted):
    script, at_step = scripted
    script.update({5: 0.9, 10: 0.2, 15: 0.4})  # the best (step 5) comes before the failure
    settings = {"epochs": 2, "eval_every": 5, "snapshots": True, "keep_best": "score",
                "callbacks": ["tests.test_callbacks:flaky", "tests.test_callbacks:record"]}
    full = distill(config_from_dict(cached("full", **settings)), on_step=at_step)
    calls_full = [c["step"] for c in CALLS]

    CALLS.clear()
    RAISE_AT.add(15)
    with pytest.raises(CallbackError) as e:
        distill(config_from_dict(cached("part", **settings)), on_step=at_step)
    msg = str(e.value)
    assert "\n" not in msg and "callback tests.test_callbacks:flaky raised at step 15" in msg
    assert "no disk left at step 15" in msg and "--resume" in msg
    part = tmp_path / "part"
    assert (part / "checkpoint" / "state.pt").exists() and not (part / RUN_FILE).exists()
    assert (part / "snapshots" / "gs15").exists()
    assert [c["step"] for c in CALLS] == [5, 10]  # `record` comes after `flaky`: not called at 15

    # The CLI says the same in one line and exits 1.
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cached("cli", **settings)))
    r = CliRunner().invoke(cli, ["distill", "--params", str(params)])
    assert r.exit_code == 1 and "callback tests.test_callbacks:flaky raised at step 15" in r.output
    assert "Traceback" not in r.output

    RAISE_AT.clear()
    CALLS.clear()
    resumed = distill(config_from_dict(cached("part", **settings, resume=True)), on_step=at_step)
    assert [c["step"] for c in CALLS] == calls_full[2:]  # step 15's callbacks run again, then the rest
    assert resumed.fit.best_step == full.fit.best_step == 5
    assert resumed.fit.evaluations == full.fit.evaluations  # steps, metrics, snapshots, callbacks' returns
    assert _same(_weights(part), _weights(tmp_path / "full"))
    assert _same(_weights(part), _weights(part / "snapshots" / "gs5"))
    assert sorted(p.name for p in (part / "snapshots").iterdir()) == sorted(
        p.name for p in (tmp_path / "full" / "snapshots").iterdir())


def test_the_checkpoint_keeps_its_format(tmp_path, cached, scripted):
    """The checkpoint is user data (a run killed by an older version resumes): its keys, in order, and what the
    evaluations' part holds. A callback raising at step 10 leaves it with `callbacks_due` set."""
    script, at_step = scripted
    script.update({5: 0.7, 10: 0.3})
    RAISE_AT.add(10)
    settings = {"eval_every": 5, "keep_best": "score", "callbacks": ["tests.test_callbacks:flaky"]}
    with pytest.raises(CallbackError):
        distill(config_from_dict(cached("part", **settings)), on_step=at_step)
    state = torch.load(tmp_path / "part" / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    assert list(state) == ["model", "modules", "optimizer", "scheduler", "sampler", "step", "rng", "settings", "dev",
                           "evaluations", "best", "callbacks_due"]
    assert state["step"] == 10 and state["callbacks_due"] == 0 and state["dev"]["score"] == 0.3
    assert set(state["sampler"]) == {"epoch", "position", "seed", "n"}
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert [e["step"] for e in state["evaluations"]] == [5, 10] and state["evaluations"][0]["callbacks"] == {
        "tests.test_callbacks:flaky": 5}
    assert set(state["best"]) == {"step", "value", "dev", "model", "modules"} and state["best"]["step"] == 5
    assert state["settings"]["keep_best"] == "score"


@pytest.mark.parametrize("path, problem", [
    ("tests.no_such_module:fn", "does not import (ModuleNotFoundError"),
    ("tests.test_callbacks:nope", "does not import (AttributeError"),
    ("tests.test_callbacks:NOT_A_FUNCTION", "is a int, not a function"),
])
def test_a_bad_callback_path_fails_before_training(cached, monkeypatch, path, problem):
    from stages.methods import DistillObjective

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(DistillObjective, "losses", never)
    with pytest.raises(ConfigError, match=re.escape(f"callbacks: '{path}' {problem}")) as e:
        distill(config_from_dict(cached(callbacks=[path])))
    assert "\n" not in str(e.value)


def test_settings_are_checked():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"distill": {"eval_every": -1, "keep_best": "max:accuracy", "callbacks": ["nocolon"]},
                          "train_teacher": {"keep_best": "min:"}})
    msg = str(e.value)
    assert "distill.eval_every: must be >= 0" in msg
    assert "distill.keep_best: 'max:accuracy' is not a metric name" in msg and "min:<metric>" in msg
    assert "distill.callbacks[0]: 'nocolon' is not an import path" in msg
    assert "train_teacher.keep_best: 'min:' is not a metric name" in msg


def test_train_teacher_keeps_the_best_and_its_snapshots(tmp_path, tiny_data_dir, tiny_model_dir):
    files = {split: str(tiny_data_dir / f"{split}.csv") for split in ("train", "dev", "test")}
    p = stage_params(tmp_path, tiny_model_dir, files,
                     train_teacher={"epochs": 2, "eval_every": 4, "snapshots": True, "keep_best": "accuracy",
                                    "callbacks": ["tests.test_callbacks:record"]})
    [res] = train_teacher(config_from_dict(p))
    steps = [4, 8, 12, 16, 20, 24, 26]
    assert [e["step"] for e in res.fit.evaluations] == steps and [c["step"] for c in CALLS] == steps
    out = tmp_path / "teacher"
    assert _same(_weights(out), _weights(out / "snapshots" / f"gs{res.fit.best_step}"))
    best = max(e["dev"]["accuracy"] for e in res.fit.evaluations)
    assert res.fit.dev["accuracy"] == best
    assert json.loads((tmp_path / "m_teacher.json").read_text())["best_step"] == res.fit.best_step


def test_multi_task_snapshots_hold_every_head(tmp_path, tiny_data_dir, tiny_model_dir):
    from tests.test_multitask import _ner_data, _params

    p = _params(tmp_path, tiny_data_dir, _ner_data(tmp_path / "ner"), tiny_model_dir, epochs=1, eval_every=8,
                snapshots=True, keep_best="ner/accuracy")
    cfg = config_from_dict(p)
    train_teacher(cfg)
    precompute(cfg)
    res = distill(cfg)
    steps = [8, 16, 20]  # 13 + 7 batches
    assert [e["step"] for e in res.fit.evaluations] == steps
    assert all({"sentiment/accuracy", "ner/accuracy"} <= set(e["dev"]) for e in res.fit.evaluations)
    out = tmp_path / "student"
    for s in steps:
        AutoModelForSequenceClassification.from_pretrained(out / "snapshots" / f"gs{s}" / "sentiment")
        AutoModelForTokenClassification.from_pretrained(out / "snapshots" / f"gs{s}" / "ner")
    best = out / "snapshots" / f"gs{res.fit.best_step}"
    assert _same(_weights(out / "ner", AutoModelForTokenClassification),
                 _weights(best / "ner", AutoModelForTokenClassification))
    assert _same(_weights(out / "sentiment"), _weights(best / "sentiment"))


# ----------------------------------------------------------------------------------------------------------------
# On the real bundled model (opt in: `pytest -m slow`); the stage fixtures are tests/test_slow.py's.

from tests.test_slow import cache, cfg, prepared, teacher  # noqa: E402,F401  (module-scoped stage fixtures)


@pytest.mark.slow
def test_bundled_model_eval_every_keep_best_snapshots_and_a_callback(cfg, cache, tmp_path):
    d = cfg.distill.model_copy(update={"output": str(tmp_path / "student"), "log_dir": str(tmp_path / "live"),
                                       "metrics": str(tmp_path / "m.json"), "eval_every": 5, "snapshots": True,
                                       "keep_best": "accuracy", "callbacks": ["tests.test_callbacks:record"]})
    res = distill(cfg.model_copy(update={"distill": d}))
    steps = [e["step"] for e in res.fit.evaluations]
    assert steps == [*range(5, res.fit.steps, 5), res.fit.steps] and [c["step"] for c in CALLS] == steps
    out = tmp_path / "student"
    for s in steps:
        AutoModelForSequenceClassification.from_pretrained(out / "snapshots" / f"gs{s}")
    assert _same(_weights(out), _weights(out / "snapshots" / f"gs{res.fit.best_step}"))
    assert res.fit.dev["accuracy"] == max(e["dev"]["accuracy"] for e in res.fit.evaluations)
    assert all(e["callbacks"]["tests.test_callbacks:record"]["double_accuracy"] == 2 * e["dev"]["accuracy"]
               for e in res.fit.evaluations)
