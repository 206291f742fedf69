"""End-to-end tests of the stages on tiny random models: the Python API and the `kd` CLI."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification

import cache_format as cf
from cache_format import KDError
from pipeline.cli import cli
from stages.config import config_from_dict
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.methods import DistillObjective
from stages.tasks import get_task
from tests.helpers import stage_params


def _params(tmp: Path, data: Path, teacher: Path, **sections) -> dict:
    files = {split: str(data / f"{split}.csv") for split in ("train", "dev", "test")}
    evaluate = {"throughput_batches": 2, **sections.pop("evaluate", {})}
    return stage_params(tmp, teacher, files, evaluate=evaluate, **sections)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


def test_precompute_then_distill_then_evaluate(tmp_path, tiny_data_dir, tiny_teacher_dir):
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir))
    [res] = precompute(cfg)
    assert res.status == "written" and res.written == 200
    reader = cf.CacheReader(res.path)
    assert len(reader) == 200 and set(reader.fields) >= {"logits", "input_ids"}
    # Same teacher, data and settings: nothing to do, same folder.
    [again] = precompute(cfg)
    assert again.status == "up to date" and again.path == res.path

    out = distill(cfg)
    assert out.caches == [str(res.path)]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert model.config.num_hidden_layers == 2
    metrics = json.loads((tmp_path / "m_distill.json").read_text())
    assert 0.0 <= metrics["dev_accuracy"] <= 1.0 and metrics["steps"] == 13
    assert (tmp_path / "live" / "metrics.json").exists()

    results = evaluate(cfg)
    assert set(results) == {"teacher", "student"}
    assert results["student"]["parameters"] < results["teacher"]["parameters"]
    assert results["student"]["examples_per_second"] > 0

    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_params(tmp_path, tiny_data_dir, tiny_teacher_dir)))
    r = CliRunner().invoke(cli, ["report", "--params", str(params)])
    assert r.exit_code == 0, r.output
    assert f"| student | {results['student']['accuracy']:.4f} |" in r.output


def test_changed_setting_gets_its_own_cache(tmp_path, tiny_data_dir, tiny_teacher_dir):
    base = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    [a] = precompute(config_from_dict(base))
    [b] = precompute(config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                              precompute={"hidden_layers": [2]})))
    assert a.path != b.path and b.status == "written"
    assert "hidden.2" in cf.CacheReader(b.path).fields


def test_cached_and_online_distillation_give_the_same_student(tmp_path, tiny_data_dir, tiny_teacher_dir):
    matches = [{"kind": "hidden_mse", "teacher_layer": 4, "student_layer": 2, "projection": "linear"}]
    common = {"matches": matches, "epochs": 0.5, "kd": {"hard_weight": 0.5}}
    cfg = _params(tmp_path, tiny_data_dir, tiny_teacher_dir, precompute={"hidden_layers": [4]})
    precompute(config_from_dict(cfg))
    cached = _params(tmp_path, tiny_data_dir, tiny_teacher_dir, precompute={"hidden_layers": [4]},
                     distill={**common, "output": str(tmp_path / "s_cached")})
    online = _params(tmp_path, tiny_data_dir, tiny_teacher_dir, precompute={"hidden_layers": [4]},
                     distill={**common, "teacher_signal": "online", "output": str(tmp_path / "s_online")})
    distill(config_from_dict(cached))
    distill(config_from_dict(online))
    a, b = _weights(tmp_path / "s_cached"), _weights(tmp_path / "s_online")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    # And training did something: the student moved away from its initialisation from the teacher.
    teacher = _weights(tiny_teacher_dir)
    assert not torch.equal(a["bert.embeddings.word_embeddings.weight"], teacher["bert.embeddings.word_embeddings.weight"])


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch):
    precompute(config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir)))
    orig = DistillObjective.losses
    log: list[list[str]] = []
    crash_at = {"call": None}

    def spy(self, model, batch, ids, step, total):
        if crash_at["call"] is not None and len(log) + 1 == crash_at["call"]:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C before this batch
        log.append(list(ids))
        return orig(self, model, batch, ids, step, total)

    monkeypatch.setattr(DistillObjective, "losses", spy)

    def run(name: str, resume: bool = False) -> list[list[str]]:
        log.clear()
        p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                    distill={"epochs": 2, "checkpoint_every": 3, "output": str(tmp_path / name), "resume": resume})
        distill(config_from_dict(p))
        return list(log)

    full = run("full")
    assert len(full) == 26  # 2 epochs x 13 batches of 16 (the last one 8)

    crash_at["call"] = 20  # mid second epoch; the last checkpoint is at step 18
    with pytest.raises(KeyboardInterrupt):
        run("part")
    before = list(log)
    crash_at["call"] = None
    after = run("part", resume=True)

    assert before == full[:19]
    assert after == full[18:]  # batch 19 is redone: it was not in the step-18 checkpoint
    ids_after_resume = [i for b in before[:18] + after for i in b]
    assert sorted(ids_after_resume) == sorted(i for b in full for i in b)  # none missing, none twice
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_missing_example_is_an_error_naming_it(tmp_path, tiny_data_dir, tiny_teacher_dir):
    import numpy as np

    from cache_format import CacheMissError
    from stages.data import data_fingerprint
    from stages.models import teacher_fingerprint
    from stages.tasks import load_split

    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir))
    train = load_split(cfg, "train", transfer=True)
    # A cache of this very data set (same data and teacher fingerprints, so both checks pass) that lacks the
    # last example: only the id lookup in distill._open_caches can catch it.
    path = tmp_path / "partial_cache"
    writer = cf.CacheWriter(path, [cf.FieldSpec("logits", "float32", (2,))],
                            teacher_fingerprint=teacher_fingerprint(str(tiny_teacher_dir)),
                            data_fingerprint=data_fingerprint(train), settings={"num_layers": 4})
    kept = train.ids[:-1]
    writer.append(kept, np.full(len(kept), 8, dtype=np.int32), {"logits": np.zeros((len(kept), 2), np.float32)})
    writer.close()
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir, distill={"caches": [str(path)]}))
    with pytest.raises(CacheMissError) as err:
        distill(cfg)
    assert "1 training example(s) are not in cache" in str(err.value) and repr(train.ids[-1]) in str(err.value)
    assert not (tmp_path / "student").exists()


def test_multi_teacher_and_attention_matches(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_model_dir, monkeypatch):
    distill_module = importlib.import_module("stages.methods.kd")  # where logit KD looks its names up

    cfg = _params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                  precompute={"teachers": [str(tiny_teacher_dir), str(tiny_model_dir)], "attention_layers": [1]},
                  distill={"matches": [{"kind": "attention_mse", "teacher_layer": 1, "student_layer": 0}],
                           "kd": {"teacher_combine": "probs", "teacher_weights": [0.7, 0.3],
                                  "temperature_schedule": "flsw", "hard_weight": 0.0}})
    results = precompute(config_from_dict(cfg))
    assert len({r.path for r in results}) == 2
    cfg["distill"]["caches"] = [str(r.path) for r in results]

    # Record, per step, the teachers' logits, the combined target the KD loss got, and the loss terms.
    seen: list[dict] = []
    task_class = type(get_task(config_from_dict(cfg).data))
    orig_next, orig_kd = distill_module.CachedTeachers.next, task_class.kd_loss
    orig_losses = DistillObjective.losses

    def next_(self, seq_len):
        outs = orig_next(self, seq_len)
        seen.append({"teachers": [o["logits"].clone() for o in outs]})
        return outs

    def kd_loss(self, student, teacher, *args, **kwargs):
        seen[-1]["target"] = teacher.detach().clone()
        return orig_kd(self, student, teacher, *args, **kwargs)

    def losses(self, *args):
        terms = orig_losses(self, *args)
        seen[-1]["terms"] = {k: float(v.detach()) for k, v in terms.items()}
        return terms

    monkeypatch.setattr(distill_module.CachedTeachers, "next", next_)
    monkeypatch.setattr(task_class, "kd_loss", kd_loss)
    monkeypatch.setattr(DistillObjective, "losses", losses)
    out = distill(config_from_dict(cfg))
    assert out.caches == cfg["distill"]["caches"] and len(seen) == out.fit.steps == 13
    for s in seen:
        a, b = s["teachers"]
        assert not torch.allclose(a, b)  # two different teachers
        # The KD target combines both: it is neither teacher's signal alone.
        assert not torch.allclose(s["target"], a) and not torch.allclose(s["target"], b)
        assert set(s["terms"]) == {"kd", "attention_mse.t1.s0"}
        assert all(math.isfinite(v) for v in s["terms"].values())
        assert all(v > 0 for v in s["terms"].values())  # the attention match really contributes


def test_train_teacher_saves_a_loadable_model(tmp_path, tiny_data_dir, tiny_model_dir):
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_model_dir))
    [res] = train_teacher(cfg)
    assert res.fit.dev["accuracy"] is not None
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
    assert json.loads((tmp_path / "m_teacher.json").read_text())["steps"] == 13


def test_cli_reports_user_errors_in_one_line(tmp_path, tiny_data_dir, tiny_teacher_dir):
    runner = CliRunner()
    r = runner.invoke(cli, ["distill", "--params", str(tmp_path / "nope.yaml")])
    assert r.exit_code != 0 and "does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["precompute", "--set", "precompute.batch_size=x", "--set", "distill.bogus=1"])
    assert r.exit_code != 0
    assert "precompute.batch_size: expected int" in r.output and "distill.bogus: unknown key" in r.output

    params = tmp_path / "params.yaml"
    import yaml

    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    p["data"]["label_field"] = "sentiment"
    params.write_text(yaml.safe_dump(p))
    r = runner.invoke(cli, ["precompute", "--params", str(params)])
    assert r.exit_code != 0 and "sentiment" in r.output and "Traceback" not in r.output


def test_student_with_another_tokenizer_distills_logits_from_the_cache(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                                        tiny_texts):
    from tests.tiny_models import make_tiny_classifier

    # Another vocabulary: the same text becomes other token ids and other lengths.
    other = make_tiny_classifier(tmp_path / "other", layers=1, hidden=32, heads=2, intermediate=64,
                                 vocab_texts=["the film was quite"], seed=3)
    cfg = _params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                  distill={"student": {"from_teacher": None, "pretrained": str(other)}})
    precompute(config_from_dict(cfg))
    res = distill(config_from_dict(cfg))
    assert res.fit.steps == 13
    # Token-level matches need the same tokenisation: refused with a message that says so.
    cfg["distill"]["matches"] = [{"kind": "hidden_mse", "teacher_layer": 2, "student_layer": 1,
                                  "projection": "linear"}]
    cfg["precompute"]["hidden_layers"] = [2]
    precompute(config_from_dict(cfg))
    with pytest.raises(KDError, match="tokenise alike"):
        distill(config_from_dict(cfg))
