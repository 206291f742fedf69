"""Regression tests for the stage hardening of issue 13 (tiny models, CPU)."""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForSequenceClassification

from cache_format import CacheCorruptError, CacheMismatchError, CacheReader, KDError
from pipeline.cli import cli
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages._io import OutputError
from stages.train import RUN_FILE, NonFiniteLossError, ResumeError
from stages.config import config_from_dict
from stages.data import DataError
from stages.methods import DistillObjective
from stages.models import TEACHER_MEMOS, ModelError, teacher_fingerprint
from tests.tiny_models import make_tiny_classifier
from stages.teacher import CachedTeachers
from stages.tasks import load_split
from tests.test_cache_durability import flip_value_bit
from tests.test_stages import _params


def _cfg(tmp_path, data_dir, teacher, **sections):
    """The test_stages settings with `sections` merged in (including `data`, which _params cannot take)."""
    p = _params(tmp_path, data_dir, teacher)
    for section, values in sections.items():
        p.setdefault(section, {}).update(values)
    return config_from_dict(p)


def _module(name: str):
    """The module stages.<name>, whose globals a test patches."""
    return importlib.import_module(f"stages.{name}")


def _ckpt(out: Path) -> Path:
    return out / "checkpoint" / "state.pt"


def _saved(out: Path) -> bool:
    return (out / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# 1. Non-finite loss; a teacher-source error mid-run


def _inject(monkeypatch, at_call: int, action) -> dict:
    """Patch CachedTeachers.next so that call `at_call` (1-based) goes through `action(outputs)`."""
    orig = CachedTeachers.next
    calls = {"n": 0}

    def next_(self, seq_len):
        calls["n"] += 1
        outs = orig(self, seq_len)
        return action(outs) if calls["n"] == at_call else outs

    monkeypatch.setattr(CachedTeachers, "next", next_)
    return calls


def _snapshot_checkpoint_at(step: int, out: Path, store: dict):
    def on_step(s: int) -> None:
        if s == step + 1:  # the checkpoint of `step` was written at the end of that step
            store["bytes"] = _ckpt(out).read_bytes()
    return on_step


def test_nan_teacher_logit_stops_training_and_saves_nothing(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch):
    out = tmp_path / "student"
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={"checkpoint_every": 3})
    precompute(cfg)

    def poison(outs):
        outs[0]["logits"] = outs[0]["logits"].clone()
        outs[0]["logits"][0, 0] = float("nan")
        return outs

    _inject(monkeypatch, 5, poison)
    store: dict = {}
    with pytest.raises(NonFiniteLossError) as err:
        distill(cfg, on_step=_snapshot_checkpoint_at(3, out, store))
    msg = str(err.value)
    assert "\n" not in msg and "step 5/13" in msg and "kd" in msg and "hard" not in msg
    assert "kd cache verify" in msg and "lr" in msg
    assert not _saved(out) and not (tmp_path / "m_distill.json").exists()
    assert _ckpt(out).read_bytes() == store["bytes"]  # the step-3 checkpoint, not one of NaN weights
    state = torch.load(_ckpt(out), weights_only=False)
    assert state["step"] == 3 and all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_teacher_source_error_mid_run_keeps_the_last_checkpoint(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                                 monkeypatch):
    import yaml

    out = tmp_path / "student"
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={"checkpoint_every": 3})
    precompute(config_from_dict(p))

    def corrupt(outs):
        raise CacheCorruptError("shard shard-0-000000.arrow content hash differs from the manifest")

    _inject(monkeypatch, 5, corrupt)
    store: dict = {}
    orig_losses = DistillObjective.losses

    def losses(self, model, batch, ids, step, total):
        if step == 4 and "bytes" not in store:
            store["bytes"] = _ckpt(out).read_bytes()
        return orig_losses(self, model, batch, ids, step, total)

    monkeypatch.setattr(DistillObjective, "losses", losses)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    r = CliRunner().invoke(cli, ["distill", "--params", str(params)])
    assert r.exit_code == 1 and "shard-0-000000.arrow" in r.output and "Traceback" not in r.output
    assert not _saved(out) and _ckpt(out).read_bytes() == store["bytes"]
    assert torch.load(_ckpt(out), weights_only=False)["step"] == 3


# ---------------------------------------------------------------------------------------------------------------
# 2. Label-count mismatch


@pytest.mark.parametrize("head_labels, num_labels", [(3, 2), (2, 3)])
def test_precompute_refuses_a_head_of_another_label_count(tmp_path, tiny_data_dir, tiny_texts, head_labels,
                                                            num_labels):
    teacher = make_tiny_classifier(tmp_path / "t", num_labels=head_labels, vocab_texts=[t for t, _ in tiny_texts])
    cfg = _cfg(tmp_path, tiny_data_dir, teacher, data={"num_labels": num_labels})
    with pytest.raises(ModelError, match=rf"{head_labels}-label classification head but data.num_labels is "
                                         rf"{num_labels}"):
        precompute(cfg)
    assert not any((tmp_path / "caches").glob("*"))  # no folder of a randomly re-initialised head


def test_distill_and_evaluate_refuse_a_head_of_another_label_count(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                                     tiny_texts):
    three = make_tiny_classifier(tmp_path / "three", num_labels=3, vocab_texts=[t for t, _ in tiny_texts])
    # A pretrained student with a 3-label head, 2-label data.
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={
        "teacher_signal": "none", "kd": {"hard_weight": 1.0},
        "student": {"from_teacher": None, "pretrained": str(three)}})
    with pytest.raises(ModelError, match="3-label classification head but data.num_labels is 2"):
        distill(cfg)
    # Online teachers.
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir,
               distill={"teacher_signal": "online", "teachers": [str(three)]})
    with pytest.raises(ModelError, match="3-label classification head but data.num_labels is 2"):
        distill(cfg)
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, evaluate={"models": {"three": str(three)}})
    with pytest.raises(ModelError, match="3-label classification head but data.num_labels is 2"):
        evaluate(cfg)


def _base_model(model_dir: Path, out: Path) -> Path:
    """The encoder of a saved classifier, saved without its head (as a hub base model is)."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(model_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_train_teacher_may_make_a_new_head(tmp_path, tiny_data_dir, tiny_model_dir):
    # A 2-label model fine-tuned for 3 labels, and a base model (no head): both get a new head.
    for model in (tiny_model_dir, _base_model(tiny_model_dir, tmp_path / "base")):
        cfg = _cfg(tmp_path, tiny_data_dir, model, data={"num_labels": 3}, train_teacher={"epochs": 0.2})
        train_teacher(cfg)
        assert AutoConfig.from_pretrained(tmp_path / "teacher").num_labels == 3


def test_a_pretrained_base_model_student_gets_a_new_head(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_model_dir):
    base = _base_model(tiny_model_dir, tmp_path / "base")
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={
        "teacher_signal": "none", "kd": {"hard_weight": 1.0}, "epochs": 0.2,
        "student": {"from_teacher": None, "pretrained": str(base)}})
    distill(cfg)
    assert AutoConfig.from_pretrained(tmp_path / "student").num_labels == 2


# ---------------------------------------------------------------------------------------------------------------
# 3. Explicit caches are checked against the configured teacher


def test_explicit_cache_of_another_teacher_is_refused(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_model_dir,
                                                       capsys):
    [res] = precompute(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir))
    other = _params(tmp_path, tiny_data_dir, tiny_teacher_dir, precompute={"teachers": [str(tiny_model_dir)]},
                    distill={"caches": [str(res.path)], "epochs": 0.2})
    with pytest.raises(CacheMismatchError) as err:
        distill(config_from_dict(other))
    msg = str(err.value)
    assert str(res.path) in msg and str(tiny_model_dir) in msg and "distill.check_cache_teacher: false" in msg
    assert teacher_fingerprint(str(tiny_model_dir)) in msg and teacher_fingerprint(str(tiny_teacher_dir)) in msg
    # distill.teachers wins over precompute.teachers; a count mismatch names both counts.
    other["distill"]["teachers"] = [str(tiny_teacher_dir), str(tiny_model_dir)]
    with pytest.raises(CacheMismatchError, match=r"lists 1 cache\(s\) but distill.teachers lists 2 teacher"):
        distill(config_from_dict(other))
    other["distill"]["teachers"] = [str(tiny_teacher_dir)]
    distill(config_from_dict(other))  # the right teacher: accepted
    # The named override: used anyway, with a one-line warning.
    other["distill"]["teachers"] = [str(tiny_model_dir)]
    other["distill"]["check_cache_teacher"] = False
    capsys.readouterr()
    assert distill(config_from_dict(other)).caches == [str(res.path)]
    warning = [line for line in capsys.readouterr().err.splitlines() if "check_cache_teacher" in line]
    assert len(warning) == 1 and warning[0].startswith("warning:")


# ---------------------------------------------------------------------------------------------------------------
# 4. Cached distillation never builds the teacher


def test_cached_distill_does_not_load_the_teacher(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_model_dir,
                                                  monkeypatch):
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={
        "student": {"from_teacher": None, "pretrained": str(tiny_model_dir)}, "epochs": 0.2})
    [res] = precompute(cfg)
    orig = AutoModelForSequenceClassification.from_pretrained.__func__
    loaded = []

    def from_pretrained(cls, name, *args, **kwargs):
        loaded.append(str(name))
        if Path(name) == Path(tiny_teacher_dir):
            raise AssertionError("cached distill loaded the teacher's weights")
        return orig(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr("stages.models.identity.model_fingerprint", lambda *a: pytest.fail("model_fingerprint called"))
    out = distill(cfg)
    assert out.caches == [str(res.path)] and loaded == [str(tiny_model_dir)]


# ---------------------------------------------------------------------------------------------------------------
# 5. Resume checks


def _crash_at(monkeypatch, call: int) -> None:
    orig = DistillObjective.losses
    n = {"calls": 0}

    def losses(self, model, batch, ids, step, total):
        n["calls"] += 1
        if n["calls"] == call:
            raise KeyboardInterrupt
        return orig(self, model, batch, ids, step, total)

    monkeypatch.setattr(DistillObjective, "losses", losses)


def test_resume_with_changed_settings_is_refused(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch):
    base = {"checkpoint_every": 3}
    precompute(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir))
    with monkeypatch.context() as m:
        _crash_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            distill(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill=base))
    before = _ckpt(tmp_path / "student").read_bytes()
    changed = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir,
                   distill={**base, "resume": True, "lr": 2e-3, "batch_size": 32, "kd": {"temperature": 2.0}})
    with pytest.raises(ResumeError) as err:
        distill(changed)
    msg = str(err.value)
    assert "\n" not in msg
    assert "lr 0.001 -> 0.002" in msg and "batch_size 16 -> 32" in msg and "kd.temperature 4.0 -> 2.0" in msg
    assert "epochs" not in msg and _ckpt(tmp_path / "student").read_bytes() == before
    # Settings that do not change the run may change (eval batch size, checkpoint interval).
    ok = distill(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir,
                      distill={"checkpoint_every": 5, "eval_batch_size": 7, "resume": True}))
    assert ok.fit.steps == 13


def test_resume_after_a_finished_run_and_without_a_checkpoint(tmp_path, tiny_data_dir, tiny_teacher_dir, capsys):
    precompute(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir))
    out = tmp_path / "student"
    resume = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={"resume": True})
    capsys.readouterr()
    res = distill(resume)  # nothing to resume from, nothing finished: starts from scratch, says so
    assert res.fit.steps == 13 and "no checkpoint" in capsys.readouterr().err
    run = json.loads((out / RUN_FILE).read_text())
    assert run["steps"] == 13 and run["epochs_done"] == 1.0 and run["dev_accuracy"] == res.fit.dev["accuracy"]
    assert run["settings"]["lr"] == 1e-3 and run["settings"]["teacher_signal"] == "cached"
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(ResumeError, match=re.escape(f"nothing to resume: the model at {out} is finished; run "
                                                    "without --resume to retrain")):
        distill(resume)
    assert (out / "model.safetensors").read_bytes() == weights


# ---------------------------------------------------------------------------------------------------------------
# 6. Output locations are checked before any work


def test_outputs_of_the_wrong_kind_are_refused_before_loading(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                              monkeypatch):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "m_distill.json").mkdir()
    loads = []
    monkeypatch.setattr(_module("methods.kd"), "load_split", lambda *a, **k: loads.append(a))
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, precompute={"cache_root": str(tmp_path / "afile")},
               distill={"log_dir": str(tmp_path / "afile" / "live")})
    with pytest.raises(OutputError) as err:
        distill(cfg)
    msg = str(err.value)
    assert "distill.log_dir" in msg and "distill.metrics" in msg and "distill.output" not in msg and not loads
    with pytest.raises(OutputError, match=r"precompute.cache_root: .*afile is a file, a folder is expected"):
        precompute(cfg)


def _read_only_cases(tmp_path, tiny_data_dir, tiny_teacher_dir):
    ro = tmp_path / "ro"
    ro.mkdir()
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                distill={"metrics": str(ro / "m.json"), "output": str(ro / "student"), "log_dir": str(ro / "live")},
                train_teacher={"output": str(ro / "teacher"), "metrics": str(ro / "t.json")},
                precompute={"cache_root": str(ro / "caches")})
    return ro, config_from_dict(p)


def _assert_read_only_refused(cfg, monkeypatch):
    calls = []
    for module in ("methods.kd", "train_teacher", "precompute"):
        monkeypatch.setattr(_module(module), "load_split", lambda *a, **k: calls.append(a))
    with pytest.raises(OutputError) as err:
        distill(cfg)
    assert all(k in str(err.value) for k in ("distill.metrics", "distill.output", "distill.log_dir"))
    with pytest.raises(OutputError, match=r"train_teacher.output: .*not writable.*train_teacher.metrics"):
        train_teacher(cfg)
    with pytest.raises(OutputError, match=r"precompute.cache_root: folder .*ro is not writable"):
        precompute(cfg)
    assert calls == []  # refused before reading anything


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_outputs_are_refused_chmod(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch):
    ro, cfg = _read_only_cases(tmp_path, tiny_data_dir, tiny_teacher_dir)
    ro.chmod(0o555)
    try:
        _assert_read_only_refused(cfg, monkeypatch)
    finally:
        ro.chmod(0o755)


def test_read_only_outputs_are_refused(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch):
    # The same as above where chmod cannot be used (running as root): the permission probe says read-only.
    ro, cfg = _read_only_cases(tmp_path, tiny_data_dir, tiny_teacher_dir)
    monkeypatch.setattr("stages._io._writable", lambda folder: Path(folder).absolute() != ro.absolute())
    _assert_read_only_refused(cfg, monkeypatch)


# ---------------------------------------------------------------------------------------------------------------
# 7. Debris and the metrics of a resumed, already finished training


def test_stale_partial_and_old_folders_are_removed(tmp_path, tiny_data_dir, tiny_teacher_dir):
    debris = [tmp_path / f"student.{'a' * 32}.partial", tmp_path / f"student.{'b' * 32}.old"]
    kept = [tmp_path / "student.keep.partial", tmp_path / f"other.{'c' * 32}.partial"]
    for d in debris + kept:
        (d / "sub").mkdir(parents=True)
    cfg = _cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={"teacher_signal": "none", "epochs": 0.2,
                                                                    "kd": {"hard_weight": 1.0}})
    distill(cfg)
    assert not any(d.exists() for d in debris) and all(d.exists() for d in kept)


def test_resume_from_a_checkpoint_at_the_final_step_keeps_the_dev_metrics(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                                           monkeypatch):
    precompute(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir))

    def killed(*a, **k):
        raise KeyboardInterrupt  # killed after the last checkpoint, before the final save

    with monkeypatch.context() as m:
        m.setattr(_module("methods.kd"), "save_model", killed)
        with pytest.raises(KeyboardInterrupt):
            distill(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir))
    assert torch.load(_ckpt(tmp_path / "student"), weights_only=False)["step"] == 13
    res = distill(_cfg(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={"resume": True}))
    metrics = json.loads((tmp_path / "m_distill.json").read_text())
    assert isinstance(metrics["dev_accuracy"], float) and metrics["dev_accuracy"] == res.fit.dev["accuracy"]


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows(rows)
    return path


@pytest.mark.parametrize("case", ["max_length", "long_id"])
def test_precompute_errors_come_before_the_cache_folder(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_texts, case):
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    if case == "max_length":
        p["precompute"]["max_length"] = 1
        error = DataError
    else:
        rows = [(f"ex{i}", t, y) for i, (t, y) in enumerate(tiny_texts[:20])] + [("x" * 1025, "a fine film", 1)]
        p["data"]["train"] = str(_write_csv(tmp_path / "long.csv", rows))
        error = KDError
    with pytest.raises(error, match="max_length|1024"):
        precompute(config_from_dict(p))
    assert [p.name for p in (tmp_path / "caches").glob("*")] in ([], [TEACHER_MEMOS])  # a memo, no cache folder


# ---------------------------------------------------------------------------------------------------------------
# 8. The data is read before any model is loaded


def test_data_errors_come_before_model_loads(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text,label\nex1,a fine film,1\nex2,,0\n")  # an empty text
    calls = []
    # precompute loads its teacher through the task (Task.load_teacher, stages/tasks/base.py).
    for module, names in (("train_teacher", ("load_classifier", "load_tokenizer")), ("precompute", ("load_tokenizer",)),
                          ("tasks.base", ("load_classifier",)), ("methods.kd", ("load_classifier", "load_tokenizer"))):
        for name in names:
            monkeypatch.setattr(_module(module), name, lambda *a, _n=name, **k: calls.append(_n))
    monkeypatch.setattr(_module("methods.kd"), "build_student", lambda *a: calls.append("build_student"))
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    p["data"]["train"] = str(bad)
    cfg = config_from_dict(p)
    for stage in (train_teacher, precompute, distill):
        with pytest.raises(DataError, match="empty text"):
            stage(cfg)
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# 9. Label names


def test_label_names_reach_the_saved_model(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_texts):
    names = ["pos", "neg"]
    for split, rows in (("train", tiny_texts[:100]), ("dev", tiny_texts[100:130])):
        _write_csv(tmp_path / f"{split}.csv", [(f"{split}{i}", t, names[y]) for i, (t, y) in enumerate(rows)])
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                distill={"teacher_signal": "none", "kd": {"hard_weight": 1.0}, "epochs": 0.2})
    p["data"] = {"train": str(tmp_path / "train.csv"), "dev": str(tmp_path / "dev.csv"), "test": None,
                 "label_names": names}
    cfg = config_from_dict(p)
    assert load_split(cfg, "train").labels.tolist() == [y for _, y in tiny_texts[:100]]
    distill(cfg)
    config = AutoConfig.from_pretrained(tmp_path / "student")
    assert config.id2label == {0: "pos", 1: "neg"} and config.label2id == {"pos": 0, "neg": 1}


def test_kd_distill_refuses_a_cache_with_one_flipped_bit(tmp_path, tiny_data_dir, tiny_teacher_dir):
    # The user's report: `kd cache verify` failed but `kd distill` trained to the end and saved (exit 0).
    import yaml

    params = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    runner = CliRunner()
    assert runner.invoke(cli, ["precompute", "--params", str(params_file)]).exit_code == 0
    [cache] = [p for p in (tmp_path / "caches").iterdir() if p.is_dir() and p.name != TEACHER_MEMOS]
    [shard] = sorted(cache.glob("shard-*.arrow"))
    reader = CacheReader(cache)
    example = reader.ids[7]
    want = reader.get(example)["logits"].copy()  # not a view of the mapped shard, which is changed next
    del reader
    data = bytearray(shard.read_bytes())
    flip_value_bit(data, want.tobytes())  # one bit of one example's stored teacher logits
    shard.write_bytes(bytes(data))

    result = runner.invoke(cli, ["distill", "--params", str(params_file)])
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert shard.name in message and "kd cache verify" in message, result.output
    assert not _saved(Path(params["distill"]["output"]))
    assert not Path(params["distill"]["metrics"]).exists()
    # The control: unhashed, the shard parses and serves that example's logits with the one value changed.
    got = CacheReader(cache, verify="off").get(example)["logits"]
    assert (got != want).tolist() == [True] + [False] * (len(want) - 1)
