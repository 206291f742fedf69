"""Students that are not transformers (stages/models/module_student.py): import paths, the BiLSTM through the cache with
save/reload/evaluate and resume, matches on a module's hidden states, and the Python API on images (a CNN)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import cache_format as cf
from cache_format import CacheMissError
from pipeline.cli import cli
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.models import MODULE_FILE, WEIGHTS_FILE, ModuleStudent, as_output, load_module_student, module_student
from stages.evaluate import load_trained
from stages.config import ConfigError, KDConfig, config_from_dict
from stages.methods import DistillObjective, distill_batches
from stages.losses import MatchError, hard_ce_loss, kd_loss
from stages.models import ModelError, load_tokenizer
from stages.tasks import get_task
from stages.tasks import load_split
from tests.helpers import stage_params

BILSTM = "stages.models.module_student:BiLSTMClassifier"
SMALL = {"embedding_dim": 16, "lstm_size": 8, "mlp_size": 8}


def not_a_module():
    """Named by a test as a student: a function, not a class."""


class TinyEncoder(nn.Module):
    """A text module that returns hidden states (for matches): embedding -> one layer -> mean -> logits."""

    num_hidden_layers = 1
    hidden_size = 16

    def __init__(self, vocab_size: int, num_labels: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 16)
        self.layer = nn.Linear(16, 16)
        self.head = nn.Linear(16, num_labels)

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        e = self.embedding(input_ids)
        h = torch.tanh(self.layer(e))
        m = attention_mask.unsqueeze(-1).float()
        logits = self.head((h * m).sum(1) / m.sum(1))
        return {"logits": logits, "hidden_states": (e, h) if output_hidden_states else None}


class TinyCNN(nn.Module):
    """An image classifier: conv -> ReLU -> global average pool -> linear (returns a dict)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, images):
        return {"logits": self.fc(F.relu(self.conv(images)).mean((2, 3)))}


def _params(tmp: Path, data: Path, teacher: Path, student: dict | None = None, **distill_settings) -> dict:
    files = {split: str(data / f"{split}.csv") for split in ("train", "dev", "test")}
    p = stage_params(tmp, teacher, files, evaluate={"throughput_batches": 2})
    p["distill"]["student"] = student or {"module": BILSTM, "module_kwargs": SMALL}
    p["distill"].update(distill_settings)
    return p


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory, tiny_data_dir, tiny_teacher_dir, _kd_home) -> Path:
    """A cache root with the teacher's cache of the tiny data, written once for the module's tests."""
    root = tmp_path_factory.mktemp("any_student")
    with pytest.MonkeyPatch.context() as env:  # the sandbox of the function-scoped autouse fixture, for this setup
        env.setenv("HF_HOME", str(root / "hf_home"))
        env.setenv("KD_CACHE_HOME", str(_kd_home))
        [res] = precompute(config_from_dict(_params(root, tiny_data_dir, tiny_teacher_dir)))
    assert res.status == "written"
    return root / "caches"


@pytest.fixture()
def cached(tmp_path, tiny_data_dir, tiny_teacher_dir, teacher_cache):
    """A function making distill params for a module student, reading the module's teacher cache."""

    def params(student: dict | None = None, **distill_settings) -> dict:
        p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir, student, **distill_settings)
        p["precompute"]["cache_root"] = str(teacher_cache)
        return p

    return params


# ----------------------------------------------------------------------------------------------------------------
# Settings and import paths


@pytest.mark.parametrize("student, message", [
    ({"module": BILSTM, "config": "models/teacher"}, "set exactly one of from_teacher"),
    ({"module": "no_colon"}, "distill.student.module: 'no_colon' is not an import path; write package.module:Class"),
    ({"config": "models/teacher", "module_kwargs": {"a": 1}}, "distill.student.module_kwargs: only applies to module"),
    ({"module_kwargs": {"a": 1}}, "distill.student.module_kwargs: only applies to module, not to config"),
])
def test_student_settings_are_checked(student, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"distill": {"student": student}})


def test_outputs_are_read_as_the_stages_read_a_hugging_face_output():
    from collections import namedtuple
    from types import SimpleNamespace

    from transformers.modeling_outputs import SequenceClassifierOutput

    x = torch.ones(2, 3)
    assert as_output(x).logits is x and as_output(x).hidden_states is None
    assert as_output({"logits": x, "hidden_states": (x,)}).hidden_states == (x,)
    assert as_output(SequenceClassifierOutput(logits=x)).logits is x
    assert as_output(namedtuple("Out", "logits")(x)).logits is x
    qa = as_output(SimpleNamespace(start_logits=x, end_logits=x))  # what extractive QA reads
    assert qa.start_logits is x and qa.attentions is None
    for bad, message in (((x,), "returned a tuple"), ({"scores": x}, "has no logits")):
        with pytest.raises(ModelError, match=message):
            as_output(bad)


def test_a_multi_task_run_refuses_a_module_student(tiny_data_dir):
    data = {"train": str(tiny_data_dir / "train.csv"), "dev": None, "test": None}
    with pytest.raises(ConfigError, match="distill.student.module: a multi-task student is a transformer"):
        config_from_dict({"tasks": [{"name": "a", "data": data}, {"name": "b", "data": data}],
                          "distill": {"student": {"module": BILSTM}}})


def test_a_causal_lm_run_refuses_a_module_student():
    with pytest.raises(ConfigError, match="distill.student.module: data.task causal_lm trains a Hugging Face"):
        config_from_dict({"data": {"task": "causal_lm"}, "distill": {"student": {"module": BILSTM}}})


@pytest.mark.parametrize("path, kwargs, message", [
    ("tests.no_such_module:Net", {}, "'tests.no_such_module:Net' does not import (ModuleNotFoundError"),
    ("tests.test_any_student:Nope", {}, "'tests.test_any_student:Nope' does not import (AttributeError"),
    ("tests.test_any_student:not_a_module", {}, "is a function, not a torch.nn.Module subclass"),
    ("collections:OrderedDict", {}, "is the class OrderedDict, not a torch.nn.Module subclass"),
    (BILSTM, {"no_such_option": 1}, "BiLSTMClassifier(**{"),
])
def test_a_bad_module_is_a_one_line_error(cached, path, kwargs, message):
    with pytest.raises(ConfigError) as e:
        distill(config_from_dict(cached({"module": path, "module_kwargs": kwargs})))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"distill.student.module: '{path}'" if not kwargs else "distill.student.module: ")


def test_logits_of_another_width_are_a_one_line_error(cached):
    with pytest.raises(ModelError, match="returns 3 logits per row but the task has 2 labels") as e:
        distill(config_from_dict(cached({"module": BILSTM, "module_kwargs": {**SMALL, "num_labels": 3}})))
    assert "\n" not in str(e.value)


def test_the_cli_reports_a_bad_module_in_one_line(cached, tmp_path):
    import yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cached({"module": "tests.no_such_module:Net"})))
    r = CliRunner().invoke(cli, ["distill", "--params", str(params)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "distill.student.module: 'tests.no_such_module:Net' does not import" in r.output.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------------------
# The BiLSTM through the cache


def _train_logits(model: nn.Module, cfg) -> tuple[torch.Tensor, list[str]]:
    """The model's logits on every training row, in row order."""
    task = get_task(cfg.data)
    enc = task.encode(load_tokenizer(cfg.distill.output), load_split(cfg, "train"), cfg.distill.max_length)
    from stages.data import collate, model_inputs

    model.eval()
    with torch.no_grad():
        batch, ids = collate(enc, np.arange(len(enc)))
        return model(**model_inputs(batch)).logits, ids


def test_bilstm_distills_through_the_cache_saves_reloads_and_evaluates(cached, tmp_path):
    # Teacher terms only, so what the student learns is the cached teacher's (random) function.
    cfg = config_from_dict(cached(epochs=6, lr=1e-2, kd={"hard_weight": 0.0, "temperature": 1.0}))
    res = distill(cfg)
    out = tmp_path / "student"
    assert res.teacher_signal == "cached" and len(res.caches) == 1
    assert {MODULE_FILE, WEIGHTS_FILE, "tokenizer.json", "kd_run.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / MODULE_FILE).read_text())
    tokenizer = load_tokenizer(str(out))
    assert record["module"] == BILSTM
    assert record["module_kwargs"] == {**SMALL, "num_labels": 2, "vocab_size": len(tokenizer),
                                       "pad_token_id": tokenizer.pad_token_id}

    # The reloaded student is the trained one, and it learned the teacher: KL(teacher || student) on the
    # training rows fell to under a third of the freshly built (same seed) student's.
    model = load_trained(str(out), get_task(cfg.data))
    assert isinstance(model, ModuleStudent)
    logits, ids = _train_logits(model, cfg)
    teacher = torch.from_numpy(cf.CacheReader(res.caches[0]).gather(ids, ["logits"])["logits"]).float()
    torch.manual_seed(cfg.distill.seed)
    fresh = module_student(BILSTM, record["module_kwargs"], num_labels=2)
    before, _ = _train_logits(fresh, cfg)
    after_kl, before_kl = (float(kd_loss(x, teacher, 1.0, kind="kl")) for x in (logits, before))
    assert after_kl < before_kl / 3, (after_kl, before_kl)

    results = evaluate(cfg)
    test_enc = get_task(cfg.data).encode(tokenizer, load_split(cfg, "test"), cfg.evaluate.max_length)
    preds = get_task(cfg.data).predict(model, test_enc, 64, torch.device("cpu"))
    assert results["student"]["accuracy"] == round(float((preds == test_enc.labels).mean()), 4)
    assert results["student"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert results["student"]["parameters"] < results["teacher"]["parameters"]
    assert results["student"]["examples_per_second"] > 0


def test_a_labels_only_bilstm_uses_the_teachers_tokenizer(tmp_path, tiny_data_dir, tiny_teacher_dir):
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir, teacher_signal="none"))
    res = distill(cfg)
    assert res.caches == [] and load_tokenizer(str(res.output)).vocab == load_tokenizer(str(tiny_teacher_dir)).vocab
    assert isinstance(load_trained(str(res.output), get_task(cfg.data)), ModuleStudent)


def test_evaluate_refuses_a_module_student_of_another_label_count(cached, tmp_path):
    distill(config_from_dict(cached(epochs=0.5)))
    params = cached()
    params["data"]["num_labels"] = 3
    with pytest.raises(ModelError, match="was trained for 2 labels but data.num_labels is 3"):
        load_trained(str(tmp_path / "student"), get_task(config_from_dict(params).data))


def test_resume_mid_epoch_gives_the_same_bilstm(cached, tmp_path, monkeypatch):
    orig = DistillObjective.losses
    calls = {"n": 0, "crash_at": None}

    def spy(self, model, batch, ids, step, total):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C before this batch
        return orig(self, model, batch, ids, step, total)

    monkeypatch.setattr(DistillObjective, "losses", spy)

    def run(name: str, resume: bool = False) -> None:
        calls["n"] = 0
        distill(config_from_dict(cached(epochs=2, checkpoint_every=3, output=str(tmp_path / name), resume=resume)))

    run("full")
    calls["crash_at"] = 20  # mid second epoch; the last checkpoint is at step 18
    with pytest.raises(KeyboardInterrupt):
        run("part")
    assert (tmp_path / "part" / "checkpoint" / "state.pt").exists() and not (tmp_path / "part" / MODULE_FILE).exists()
    calls["crash_at"] = None
    run("part", resume=True)
    assert calls["n"] == 8  # batches 19..26
    a, b = (load_module_student(tmp_path / n).state_dict() for n in ("full", "part"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_matches_read_a_modules_hidden_states(tmp_path, tiny_data_dir, tiny_teacher_dir):
    match = {"kind": "hidden_mse", "teacher_layer": 4, "student_layer": 1, "projection": "linear"}
    params = _params(tmp_path, tiny_data_dir, tiny_teacher_dir, {"module": "tests.test_any_student:TinyEncoder"},
                     matches=[match], epochs=0.5)
    params["precompute"]["hidden_layers"] = [4]
    cfg = config_from_dict(params)
    precompute(cfg)
    seen: list[dict] = []
    orig = DistillObjective.losses

    def spy(self, *args):
        terms = orig(self, *args)
        seen.append({k: float(v.detach()) for k, v in terms.items()})
        return terms

    with pytest.MonkeyPatch.context() as m:
        m.setattr(DistillObjective, "losses", spy)
        distill(cfg)
    assert {"kd", "hard", "hidden_mse.t4.s1"} <= set(seen[0]) and seen[0]["hidden_mse.t4.s1"] > 0
    assert (tmp_path / "student" / "projections.pt").exists()

    # The BiLSTM returns no hidden states: it has no layer 1 to match.
    params["distill"]["student"] = {"module": BILSTM, "module_kwargs": SMALL}
    with pytest.raises(MatchError, match="student hidden layer 1 is out of range; the student has 0 layers"):
        distill(config_from_dict(params))


# ----------------------------------------------------------------------------------------------------------------
# The Python API: a CNN on images, its teacher's logits in a real cache


@pytest.fixture()
def images(tmp_path):
    """64 random 3x8x8 images, their ids, labels and a cache of a (random CNN) teacher's logits for them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    ids = [f"img{i:03d}" for i in range(64)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        teacher = TinyCNN(10, width=16)
    with torch.no_grad():
        t_logits = 3 * teacher(x)["logits"]  # peaked enough that its argmax is learnable
    fields = [cf.FieldSpec("logits", "float32", (10,))]
    with cf.CacheWriter(tmp_path / "cache", fields, teacher_fingerprint="cnn-teacher",
                        data_fingerprint="random-images", settings={"images": "3x8x8"}) as w:
        w.append(ids, np.zeros(64, np.int64), {"logits": t_logits.numpy()})
    labels = t_logits.argmax(-1)
    return x, ids, labels, cf.CacheReader(tmp_path / "cache"), t_logits


def _batches(x, ids, labels, size=16):
    return [(ids[i : i + size], x[i : i + size], labels[i : i + size]) for i in range(0, len(ids), size)]


def test_distill_batches_uses_the_stage_loss(images):
    x, ids, labels, reader, t_logits = images
    torch.manual_seed(0)
    model = TinyCNN()
    kd = KDConfig(temperature=2.0, hard_weight=0.5)
    [terms] = distill_batches(model, _batches(x, ids, labels), reader, kd,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    with torch.no_grad():
        s = model(x)["logits"]
    want_kd = np.mean([float(kd_loss(s[i : i + 16], t_logits[i : i + 16], 2.0, kind="kl")) for i in range(0, 64, 16)])
    want_hard = np.mean([0.5 * float(hard_ce_loss(s[i : i + 16], labels[i : i + 16])) for i in range(0, 64, 16)])
    assert terms["kd"] == pytest.approx(want_kd, rel=1e-5) and terms["hard"] == pytest.approx(want_hard, rel=1e-5)


def test_a_cnn_distills_from_a_cache_and_saves_as_a_module_student(images, tmp_path):
    x, ids, _, reader, t_logits = images
    torch.manual_seed(0)
    student = module_student("tests.test_any_student:TinyCNN", {"num_classes": 10, "width": 16})
    unlabelled = [(i, xb, None) for i, xb, _ in _batches(x, ids, t_logits.argmax(-1))]
    history = distill_batches(student, unlabelled, reader, KDConfig(temperature=1.0), epochs=60, lr=1e-2)
    assert history[-1]["kd"] < history[0]["kd"] / 3, history
    assert history[0]["hard"] == 0.0  # no labels: the hard term is there, and zero
    student.eval()
    with torch.no_grad():
        agree = float((student(x).logits.argmax(-1) == t_logits.argmax(-1)).float().mean())
    assert agree >= 0.8, agree

    student.save_pretrained(tmp_path / "cnn")
    assert {p.name for p in (tmp_path / "cnn").iterdir()} == {MODULE_FILE, WEIGHTS_FILE}
    again = load_module_student(tmp_path / "cnn")
    with torch.no_grad():
        assert torch.equal(again.eval()(x).logits, student(x).logits)


def test_distill_batches_names_ids_missing_from_the_cache(images):
    x, ids, labels, reader, _ = images
    with pytest.raises(CacheMissError, match="'elsewhere'"):
        distill_batches(TinyCNN(), [(["elsewhere"] + ids[1:16], x[:16], labels[:16])], reader)


# ----------------------------------------------------------------------------------------------------------------
# The real bundled model and data


@pytest.mark.slow
def test_bilstm_on_the_bundled_model_and_data(tmp_path):
    """prepare -> train-teacher -> precompute -> distill a BiLSTM (cached) and a labels-only BiLSTM -> evaluate,
    on 400 Rotten Tomatoes sentences with the bundled MiniLM teacher (one short epoch each)."""
    from stages.prepare import prepare
    from stages.train_teacher import train_teacher

    data, models = tmp_path / "data", tmp_path / "models"
    student = {"module": BILSTM, "module_kwargs": {"embedding_dim": 64, "lstm_size": 32, "mlp_size": 32}}
    common = {"student": student, "epochs": 1, "lr": 1e-3, "log_dir": str(tmp_path / "live")}
    params = {
        "data": {s: str(data / f"{s}.csv") for s in ("train", "dev", "test")},
        "prepare": {"max_examples": 400, "out_dir": str(data)},
        "train_teacher": {"output": str(models / "teacher"), "epochs": 1, "metrics": str(tmp_path / "t.json")},
        "precompute": {"teachers": [str(models / "teacher")], "cache_root": str(tmp_path / "caches")},
        "distill": {**common, "output": str(models / "bilstm"), "metrics": str(tmp_path / "d.json")},
        "evaluate": {"models": {"teacher": str(models / "teacher"), "bilstm": str(models / "bilstm"),
                                "bilstm_labels": str(models / "bilstm_labels")},
                     "throughput_batches": 2, "output": str(tmp_path / "e.json"),
                     "predictions": str(tmp_path / "p.json")},
    }
    cfg = config_from_dict(params)
    prepare(cfg)
    train_teacher(cfg)
    precompute(cfg)
    distill(cfg)
    distill(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={
        "teacher_signal": "none", "output": str(models / "bilstm_labels"), "metrics": str(tmp_path / "b.json")})}))
    results = evaluate(cfg)
    tokenizer = load_tokenizer(str(models / "teacher"))
    for name in ("bilstm", "bilstm_labels"):
        record = json.loads((models / name / MODULE_FILE).read_text())
        assert record["module_kwargs"]["vocab_size"] == len(tokenizer) == 30522
        assert 0.0 <= results[name]["accuracy"] <= 1.0
        assert results[name]["parameters"] < results["teacher"]["parameters"]
    assert results["bilstm"]["parameters"] == results["bilstm_labels"]["parameters"]
