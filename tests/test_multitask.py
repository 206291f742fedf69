"""Multi-task distillation: the task sampler, one student with a head per task, per-task metrics, exact resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from stages.train import RUN_FILE, TaskMix, TaskSampler
from stages.config import ConfigError, config_from_dict
from cache_format import CacheReader
from stages.data import Encoded, model_inputs
from stages.models import ModelError
from tests.tiny_models import make_tiny_classifier
from stages.methods import MultiTaskObjective
from tests.test_task_token_classification import TAGS, _sentences, _write_jsonl


def _encoded(n: int, name: str) -> Encoded:
    return Encoded(ids=[f"{name}{i}" for i in range(n)], input_ids=np.ones(n, np.int32),
                   offsets=np.arange(n + 1, dtype=np.int64), token_type_ids=None,
                   labels=np.zeros(n, np.int64), pad_token_id=0)


def _mix(sizes: dict[str, int]) -> TaskMix:
    return TaskMix(list(sizes), [_encoded(n, name) for name, n in sizes.items()])


@pytest.mark.parametrize("tau, expected", [(1.0, 0.75), (0.5, 3 ** 0.5 / (3 ** 0.5 + 1)), (0.0, 0.5)])
def test_tasks_are_drawn_in_proportion_to_size_to_the_tau(tau, expected):
    mix = _mix({"big": 3000, "small": 1000})
    sampler = TaskSampler(mix, 10, seed=0, tau=tau, group_by_length=False)
    tasks = [mix.task_of(rows) for _ in range(5) for rows in sampler]  # 5 epochs of 400 batches
    share = tasks.count(0) / len(tasks)
    # 2,000 draws: the binomial standard deviation is <= 0.0112; 4 of them is far beyond chance.
    assert abs(share - expected) < 0.045, (share, expected)
    assert sampler.epoch == 5 and sampler.batches_per_epoch == 400


def test_each_batch_is_one_task_and_every_row_of_a_task_comes_once_per_its_epoch():
    mix = _mix({"a": 50, "b": 20})
    sampler = TaskSampler(mix, 7, seed=3, tau=0.0, group_by_length=False)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(4):
        for rows in sampler:
            t = mix.task_of(rows)
            assert np.all((rows >= mix.starts[t]) & (rows < mix.starts[t + 1]))  # never mixes tasks
            seen[t].extend((rows - mix.starts[t]).tolist())
    for t, n in ((0, 50), (1, 20)):
        full = len(seen[t]) // n * n  # whole epochs of task t: each row exactly once in each
        for e in range(full // n):
            assert sorted(seen[t][e * n:(e + 1) * n]) == list(range(n))


def test_the_sampler_state_resumes_the_exact_stream():
    mix = _mix({"a": 33, "b": 11, "c": 5})
    first = TaskSampler(mix, 4, seed=9, tau=1.0, group_by_length=False)
    stream = iter(first)
    head = [next(stream) for _ in range(6)]
    state = copy.deepcopy(first.state_dict())
    rest = [r.tolist() for r in stream] + [r.tolist() for r in first]  # the epoch, then a whole next one
    second = TaskSampler(mix, 4, seed=9, tau=1.0, group_by_length=False)
    second.load_state_dict(json.loads(json.dumps(state)))  # checkpoints hold plain values
    again = [r.tolist() for r in second] + [r.tolist() for r in second]
    assert head and again == rest


# ----------------------------------------------------------------------------------------------------------------
# End to end: a sentence task and a token task (different kinds, different label sets), one student


def _ner_data(root: Path) -> Path:
    root.mkdir()
    rows = _sentences(160, seed=4)
    _write_jsonl(root / "train.jsonl", rows[:100])
    _write_jsonl(root / "dev.jsonl", rows[100:130], 100)
    _write_jsonl(root / "test.jsonl", rows[130:], 130)
    return root


def _params(tmp: Path, sentiment: Path, ner: Path, base_model: Path, **distill) -> dict:
    return {
        "tasks": [{"name": "sentiment",
                   "data": {"train": str(sentiment / "train.csv"), "dev": str(sentiment / "dev.csv"),
                            "test": str(sentiment / "test.csv")}},
                  {"name": "ner", "weight": 0.5, "kd": {"temperature": 2.0},
                   "data": {"task": "token_classification", "train": str(ner / "train.jsonl"),
                            "dev": str(ner / "dev.jsonl"), "test": str(ner / "test.jsonl"),
                            "num_labels": len(TAGS), "label_names": TAGS}}],
        "train_teacher": {"model": str(base_model), "output": str(tmp / "teachers"), "epochs": 1, "batch_size": 16,
                          "max_length": 32, "lr": 1e-3, "metrics": str(tmp / "m_teacher.json")},
        "precompute": {"cache_root": str(tmp / "caches"), "batch_size": 32, "max_length": 32, "dtype": "float32"},
        "distill": {"student": {"config": str(base_model), "num_layers": 1, "hidden_size": 32, "num_heads": 2,
                                "intermediate_size": 64},
                    "epochs": 2, "batch_size": 16, "max_length": 32, "lr": 1e-3, "output": str(tmp / "student"),
                    "log_dir": str(tmp / "live"), "metrics": str(tmp / "m_distill.json"), **distill},
        "evaluate": {"models": {"teacher": str(tmp / "teachers"), "student": str(tmp / "student")},
                     "max_length": 32, "throughput_batches": 1, "output": str(tmp / "m_eval.json"),
                     "predictions": str(tmp / "m_preds.json")},
    }


@pytest.fixture(scope="module")
def trained_tasks(tmp_path_factory, tiny_data_dir, tiny_model_dir, _kd_home) -> Path:
    """A folder with the NER data, both tasks' teachers (`teachers/<task>`) and their caches (`caches/`): trained
    and precomputed once for the module's tests, which only read them."""
    root = tmp_path_factory.mktemp("multitask")
    with pytest.MonkeyPatch.context() as env:  # the sandbox of the function-scoped autouse fixture, for this setup
        env.setenv("HF_HOME", str(root / "hf_home"))
        env.setenv("KD_CACHE_HOME", str(_kd_home))
        cfg = config_from_dict(_params(root, tiny_data_dir, _ner_data(root / "ner"), tiny_model_dir))
        teachers = train_teacher(cfg)
        assert [r.output for r in teachers] == [root / "teachers" / "sentiment", root / "teachers" / "ner"]
        caches = precompute(cfg)
        assert len({r.path for r in caches}) == 2 and all(r.status == "written" for r in caches)
    return root


@pytest.fixture()
def two_tasks(tmp_path, trained_tasks, tiny_data_dir, tiny_model_dir):
    """Params with the module's teachers and caches, and this test's own outputs under `tmp_path`."""
    params = _params(tmp_path, tiny_data_dir, trained_tasks / "ner", tiny_model_dir)
    params["train_teacher"]["output"] = str(trained_tasks / "teachers")  # where each task's teacher is read
    params["precompute"]["cache_root"] = str(trained_tasks / "caches")
    params["evaluate"]["models"]["teacher"] = str(trained_tasks / "teachers")
    return params


def _heads(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {"sentiment": AutoModelForSequenceClassification.from_pretrained(out / "sentiment").state_dict(),
            "ner": AutoModelForTokenClassification.from_pretrained(out / "ner").state_dict()}


def _record_first_batches(monkeypatch) -> dict[str, dict]:
    """For the first batch of each task: the terms `MultiTaskObjective.losses` returned, the batch, its ids and
    the logits of the task's head on it, from a forward with the same dropout masks as the objective's own."""
    seen: dict[str, dict] = {}
    real = MultiTaskObjective.losses

    def losses(self, model, batch, ids, step, total_steps):
        name = ids[0].split("/", 1)[0]
        if name in seen:
            return real(self, model, batch, ids, step, total_steps)
        rng = torch.get_rng_state()
        with torch.no_grad():
            logits = model.heads[name](**model_inputs(batch)).logits.double()
        torch.set_rng_state(rng)  # the objective's forward draws the same dropout masks
        inputs = {k: v.clone() for k, v in batch.items()}
        terms = real(self, model, batch, ids, step, total_steps)
        seen[name] = {"terms": {k: v.item() for k, v in terms.items()}, "batch": inputs, "logits": logits,
                      "ids": [i.split("/", 1)[1] for i in ids]}
        return terms

    monkeypatch.setattr(MultiTaskObjective, "losses", losses)
    return seen


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes at `temperature`, per row of [..., C] logits."""
    log_t = torch.log_softmax(teacher / temperature, -1)
    return (log_t.exp() * (log_t - torch.log_softmax(student / temperature, -1))).sum(-1)


def _expected_terms(first: dict, sentiment_cache: str, ner_cache: str) -> dict[str, float]:
    """Each task's kd and hard terms of its first batch, computed directly: task weight x T^2 x KL at the task's
    temperature (sentiment: weight 1, distill.kd.temperature 4; ner: weight 0.5, its own temperature 2)."""
    s = first["sentiment"]
    teacher = torch.tensor(CacheReader(sentiment_cache).gather(s["ids"])["logits"], dtype=torch.float64)
    out = {"sentiment/kd": 1.0 * 4.0**2 * _kl(s["logits"], teacher, 4.0).mean().item(),
           "sentiment/hard": 1.0 * F.cross_entropy(s["logits"], s["batch"]["labels"]).item()}
    # The token task: each word's first sub-token, over the words both the student and the teacher kept.
    n = first["ner"]
    reader, word_index, labels = CacheReader(ner_cache), n["batch"]["word_index"], n["batch"]["labels"]
    kl, ce = [], []
    for row, example in enumerate(n["ids"]):
        teacher = torch.tensor(reader.get(example)["logits"], dtype=torch.float64)
        for token in (word_index[row] >= 0).nonzero()[:, 0].tolist():
            word, student = int(word_index[row, token]), n["logits"][row, token]
            if word < len(teacher):
                kl.append(_kl(student, teacher[word], 2.0).item())
            if labels[row, token] != -100:
                ce.append(F.cross_entropy(student[None], labels[row, token][None]).item())
    assert len(kl) > len(n["ids"]) and len(ce) > len(n["ids"])  # several words a row
    out["ner/kd"] = 0.5 * 2.0**2 * float(np.mean(kl))
    out["ner/hard"] = 0.5 * float(np.mean(ce))
    return out


def test_two_kinds_share_an_encoder_and_report_per_task_metrics(tmp_path, two_tasks, monkeypatch):
    first = _record_first_batches(monkeypatch)
    res = distill(config_from_dict(two_tasks))
    # Each task's terms carry its weight and its KD temperature.
    got = {k: v for name in ("sentiment", "ner") for k, v in first[name]["terms"].items()}
    expected = _expected_terms(first, *res.caches)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        # abs: the sentiment KL is ~3e-6 a row (both models near uniform at T 4), where float32 keeps 2 digits
        assert got[key] == pytest.approx(value, rel=1e-5, abs=5e-7), key
    # 200 + 100 rows in batches of 16: 13 + 7 batches per epoch, 2 epochs.
    assert res.fit.steps == 40 and len(res.caches) == 2
    assert {"sentiment/accuracy", "ner/f1", "ner/accuracy"} <= set(res.fit.dev)
    heads = _heads(tmp_path / "student")
    encoder = [k for k in heads["ner"] if k.startswith("bert.")]
    assert encoder and all(torch.equal(heads["sentiment"][k], heads["ner"][k]) for k in encoder)
    assert heads["sentiment"]["classifier.weight"].shape[0] == 2 and heads["ner"]["classifier.weight"].shape[0] == 5
    ner = AutoModelForTokenClassification.from_pretrained(tmp_path / "student" / "ner")
    assert ner.config.id2label == dict(enumerate(TAGS))
    assert (tmp_path / "student" / RUN_FILE).exists() and not (tmp_path / "student" / "checkpoint").exists()

    results = evaluate(config_from_dict(two_tasks))
    assert set(results) == {"sentiment", "ner"}
    for name, key, n in (("sentiment", "accuracy", 50), ("ner", "f1", 30)):
        assert set(results[name]) == {"teacher", "student"}
        for model in results[name].values():
            assert 0 <= model[key] <= 1 and model["examples"] == n
    assert json.loads((tmp_path / "m_eval.json").read_text()) == results


def test_multi_task_cached_equals_online_and_labels_only_differs(tmp_path, two_tasks):
    distill(config_from_dict(two_tasks))
    cached = _heads(tmp_path / "student")
    online = {**two_tasks, "distill": {**two_tasks["distill"], "teacher_signal": "online",
                                       "output": str(tmp_path / "online")}}
    distill(config_from_dict(online))
    got = _heads(tmp_path / "online")
    for name in cached:
        for key, value in cached[name].items():
            torch.testing.assert_close(got[name][key], value, rtol=0, atol=1e-5)
    labels_only = {**two_tasks, "distill": {**two_tasks["distill"], "teacher_signal": "none",
                                            "output": str(tmp_path / "baseline")}}
    res = distill(config_from_dict(labels_only))
    assert res.caches == [] and res.fit.steps == 40
    baseline = _heads(tmp_path / "baseline")
    assert not torch.allclose(baseline["ner"]["classifier.weight"], cached["ner"]["classifier.weight"])


def test_multi_task_resume_gives_the_uninterrupted_student(tmp_path, two_tasks):
    whole = distill(config_from_dict(two_tasks))
    expected = _heads(tmp_path / "student")

    def crash(step: int) -> None:
        if step == 26:
            raise KeyboardInterrupt

    interrupted = {**two_tasks, "distill": {**two_tasks["distill"], "checkpoint_every": 3}}  # last: step 24, mid-epoch
    with pytest.raises(KeyboardInterrupt):
        distill(config_from_dict(interrupted), on_step=crash)
    assert (tmp_path / "student" / "checkpoint" / "state.pt").exists()
    resumed = distill(config_from_dict({**interrupted, "distill": {**interrupted["distill"], "resume": True}}))
    assert resumed.fit.steps == whole.fit.steps
    got = _heads(tmp_path / "student")
    for name in expected:
        for key, value in expected[name].items():
            torch.testing.assert_close(got[name][key], value, rtol=0, atol=1e-6)


def test_several_teachers_and_matches_per_task(tmp_path, trained_tasks, tiny_data_dir, tiny_model_dir, monkeypatch):
    params = _params(tmp_path, tiny_data_dir, trained_tasks / "ner", tiny_model_dir)
    params["train_teacher"]["output"] = str(trained_tasks / "teachers")  # the module's teachers
    second = make_tiny_classifier(tmp_path / "ner2", num_labels=len(TAGS), layers=2, hidden=32, heads=2,
                                  intermediate=64, vocab_texts=[" ".join(w for s, _ in _sentences(50) for w in s)],
                                  seed=7, auto_model=AutoModelForTokenClassification)
    params["tasks"][0]["matches"] = [{"kind": "hidden_mse", "teacher_layer": 2, "student_layer": 1,
                                      "projection": "linear"}]
    params["tasks"][1]["teachers"] = [str(trained_tasks / "teachers" / "ner"), str(second)]
    params["precompute"]["hidden_layers"] = [2]  # for the sentence task's match (a token task caches logits only)
    cfg = config_from_dict(params)
    caches = precompute(cfg)
    assert len(caches) == 3
    assert "hidden.2" in str(json.loads((caches[0].path / "manifest.json").read_text())["fields"])
    terms: set[str] = set()
    orig = MultiTaskObjective.losses

    def losses(self, *args):
        out = orig(self, *args)
        terms.update(out)
        return out

    monkeypatch.setattr(MultiTaskObjective, "losses", losses)
    res = distill(cfg)
    assert len(res.caches) == 3
    assert terms == {"sentiment/kd", "sentiment/hard", "sentiment/hidden_mse.t2.s1", "ner/kd", "ner/hard"}


def test_task_settings_errors(tiny_data_dir):
    data = {"train": str(tiny_data_dir / "train.csv")}
    with pytest.raises(ConfigError, match=r"tasks\[1\].name: task name 'a' is used twice"):
        config_from_dict({"tasks": [{"name": "a", "data": data}, {"name": "a", "data": data}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\].name: 'a/b' must be letters"):
        config_from_dict({"tasks": [{"name": "a/b", "data": data}]})
    with pytest.raises(ConfigError, match=r"tasks\[0\].kd.loss: task r: 'kl' .* set tasks\[0\].kd.loss: mse"):
        config_from_dict({"tasks": [{"name": "r", "data": {**data, "task": "regression"}}]})
    with pytest.raises(ConfigError, match=r"data: is not read when tasks: is set \(each task has its own\); move "
                                          r"it to tasks\[i\].data[^\n]*\n  precompute.teachers: is not read"):
        config_from_dict({"data": data, "precompute": {"teachers": ["t"]}, "tasks": [{"name": "a", "data": data}]})
    with pytest.raises(ConfigError, match=r"distill.task_tau: must be >= 0"):
        config_from_dict({"distill": {"task_tau": -1}})


def test_a_task_whose_teacher_has_another_head_is_refused(tmp_path, tiny_data_dir, tiny_model_dir):
    params = _params(tmp_path, tiny_data_dir, _ner_data(tmp_path / "ner"), tiny_model_dir)
    params["tasks"][0]["teachers"] = [str(tiny_model_dir)]
    params["tasks"][1]["teachers"] = [str(tiny_model_dir)]  # a sentence classifier for the token task
    with pytest.raises(ModelError, match=r"is a BertForSequenceClassification, not the token-classification model"):
        precompute(config_from_dict(params))


def test_prepare_writes_each_task_that_has_its_own_prepare_section(tmp_path, tiny_data_dir):
    from stages.prepare import prepare

    source = tiny_data_dir / "train.csv"
    split = {s: str(tmp_path / "a" / f"{s}.csv") for s in ("train", "dev", "test")}
    given = {s: str(tiny_data_dir / f"{s}.csv") for s in ("train", "dev", "test")}
    cfg = config_from_dict({"tasks": [
        {"name": "a", "data": split, "prepare": {"source": str(source), "out_dir": str(tmp_path / "a"), "seed": 1}},
        {"name": "b", "data": given},  # its files exist already: nothing to prepare (prepare checks them)
    ]})
    paths = prepare(cfg)
    assert set(paths) == {"a/train", "a/dev", "a/test"}
    assert all(p.parent == tmp_path / "a" and p.exists() for p in paths.values())
    assert json.loads((tmp_path / "a" / "split.json").read_text())["seed"] == 1
