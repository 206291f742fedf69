"""Causal-LM distillation end to end on tiny Llamas: cached (topk, sampled, dense), online (forward/reverse KL,
JSD), cross-tokenizer ULD, labels only, resume, evaluate, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cache_format import KDError
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.config import ConfigError, config_from_dict
from tests.tiny_models import make_tiny_causal_lm

L = 16
_WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "barked", "at", "N", "years", "old", "former", "chairman",
          "of", "gold", "fields", "was", "named", "director", "board", "will", "join"]


def _documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=rng.integers(3, 12))) + " ." for _ in range(n)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmd")
    docs = _documents(120, 0)
    (root / "train.txt").write_text("\n".join(docs) + "\n")
    (root / "test.txt").write_text("\n".join(_documents(30, 1)) + "\n")
    make_tiny_causal_lm(root / "teacher", texts=docs, vocab_size=300, hidden=48)
    # A random init predicts almost uniformly; a scaled output layer gives the teacher a peaked distribution
    # that a student can be seen to learn.
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)
    teacher.save_pretrained(root / "teacher")
    make_tiny_causal_lm(root / "other", texts=docs, vocab_size=400, seed=1)
    return root


def _cfg(root: Path, tmp: Path, *, signal: str = "cached", codec: dict | None = None, lm: dict | None = None,
         student: dict | None = None, cache_root: Path | None = None, student_dir: Path | None = None,
         **distill_settings):
    student_dir = student_dir or tmp / "student"
    return config_from_dict({
        "data": {"task": "causal_lm", "train": str(root / "train.txt"), "dev": str(root / "test.txt"),
                 "test": str(root / "test.txt")},
        "precompute": {"teachers": [str(root / "teacher")], "cache_root": str(cache_root or tmp / "caches"), "max_length": L,
                       "batch_size": 8, "lm": codec or {}},
        "distill": {"teacher_signal": signal, "max_length": L, "batch_size": 8, "epochs": 1, "lr": 3e-3,
                    "student": student or {"config": str(root / "teacher"), "num_layers": 1},
                    "kd": {"temperature": 1.0, "weight": 1.0, "hard_weight": 1.0}, "lm": lm or {},
                    "output": str(student_dir), "log_dir": str(tmp / "live"), "metrics": str(tmp / "m.json"),
                    **distill_settings},
        "evaluate": {"models": {"teacher": str(root / "teacher"), "student": str(student_dir)},
                     "max_length": L, "batch_size": 8, "throughput_batches": 1, "output": str(tmp / "eval.json"),
                     "predictions": str(tmp / "pred.json")},
    })


@pytest.mark.parametrize("codec", [{"codec": "topk", "k": 8}, {"codec": "sampled", "samples": 6},
                                   {"codec": "dense"}])
def test_cached_distill_trains_a_loadable_student(lm, tmp_path, codec):
    cfg = _cfg(lm, tmp_path, codec=codec)
    precompute(cfg)
    res = distill(cfg)
    assert res.teacher_signal == "cached" and res.fit.steps > 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert np.isfinite(metrics["dev_perplexity"])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    out = student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_kd_term_follows_the_teacher(lm, tmp_path):
    """With only the KD term, the student's top-1 agrees with the teacher's far more than an untrained one."""
    settings = dict(codec={"codec": "topk", "k": 32}, epochs=3, kd={"temperature": 1.0, "weight": 1.0,
                                                                    "hard_weight": 0.0})
    cfg = _cfg(lm, tmp_path, **settings)
    precompute(cfg)
    distill(cfg)
    trained = evaluate(cfg)["student"]["top1_agreement"]
    frozen = _cfg(lm, tmp_path / "b", cache_root=tmp_path / "caches", lr=1e-12, **settings)
    distill(frozen)
    untrained = evaluate(frozen)["student"]["top1_agreement"]
    assert trained > untrained + 0.2, (trained, untrained)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_online_losses_run(lm, tmp_path, loss):
    cfg = _cfg(lm, tmp_path, signal="online", lm={"loss": loss})
    res = distill(cfg)
    assert res.fit.steps > 0 and set(res.fit.dev) >= {"perplexity", "ece"}


def test_labels_only_and_evaluate(lm, tmp_path):
    cfg = _cfg(lm, tmp_path, signal="none")
    distill(cfg)
    out = evaluate(cfg)
    assert "top1_agreement" not in out["teacher"]  # agreement is with the teacher, not of it
    s = out["student"]
    assert {"perplexity", "word_perplexity", "ece", "tokens_per_second", "top1_agreement"} <= set(s)
    assert 1 < s["perplexity"] < 1000


def test_evaluate_runs_the_teacher_once_for_every_models_agreement(lm, tmp_path, monkeypatch):
    """The teacher's top-1 is computed in its own scoring pass and reused: three students add no teacher pass."""
    import stages.models.lm as lm_models
    from stages.models import lm_metrics, lm_scores
    from stages.models import load_causal_lm, load_tokenizer
    from stages.tasks import get_task

    cfg = _cfg(lm, tmp_path, signal="none")
    distill(cfg)
    models = {"teacher": str(lm / "teacher"), "a": str(tmp_path / "student"), "b": str(tmp_path / "student"),
              "c": str(lm / "teacher")}
    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"models": models})})
    passes: dict[str, int] = {}
    scored_hidden = lm_models._scored_hidden

    def counting(model, batch, keep):
        passes[model.name_or_path] = passes.get(model.name_or_path, 0) + 1
        return scored_hidden(model, batch, keep)

    monkeypatch.setattr(lm_models, "_scored_hidden", counting)
    out = evaluate(cfg)
    monkeypatch.setattr(lm_models, "_scored_hidden", scored_hidden)
    task = get_task(cfg.data)
    rows = task.encode(load_tokenizer(str(lm / "teacher")), task.load(lm / "test.txt"), L)
    batches = -(-len(rows) // 8)
    # One scoring pass for "teacher" and one for "c" (the same folder, evaluated as a model): none per student.
    assert passes == {str(lm / "teacher"): 2 * batches, str(tmp_path / "student"): 2 * batches}
    assert out["c"]["top1_agreement"] == 1.0 and "top1_agreement" not in out["teacher"]
    _, top1 = lm_scores(load_causal_lm(str(lm / "teacher")), rows, batch_size=8, device="cpu")
    direct = lm_metrics(load_causal_lm(str(tmp_path / "student")), rows, batch_size=8, device="cpu",
                        teacher_top1=top1)["top1_agreement"]
    assert out["a"]["top1_agreement"] == out["b"]["top1_agreement"] == pytest.approx(direct, abs=1e-4)


def test_cross_tokenizer_uld(lm, tmp_path):
    cfg = _cfg(lm, tmp_path, codec={"codec": "topk", "k": 8}, lm={"cross_tokenizer": True},
               student={"config": str(lm / "other"), "num_layers": 1})
    precompute(cfg)
    res = distill(cfg)
    assert res.fit.steps > 0 and np.isfinite(res.fit.dev["word_perplexity"])


def test_other_vocabulary_without_cross_tokenizer_is_refused(lm, tmp_path):
    cfg = _cfg(lm, tmp_path, codec={"codec": "topk", "k": 8}, student={"config": str(lm / "other"), "num_layers": 1})
    precompute(cfg)
    with pytest.raises(KDError, match="cross_tokenizer"):
        distill(cfg)


def test_cross_tokenizer_needs_a_topk_cache(lm, tmp_path):
    with pytest.raises(ConfigError, match="topk"):
        _cfg(lm, tmp_path, codec={"codec": "sampled"}, lm={"cross_tokenizer": True})
    # An explicit cache of another codec is refused when it is opened.
    sampled = _cfg(lm, tmp_path, codec={"codec": "sampled"})
    precompute(sampled)
    cache = next(p for p in (tmp_path / "caches").iterdir() if not p.name.startswith("."))
    cfg = _cfg(lm, tmp_path, lm={"cross_tokenizer": True}, caches=[str(cache)],
               student={"config": str(lm / "other"), "num_layers": 1})
    with pytest.raises(KDError, match="needs a topk cache"):
        distill(cfg)


def test_resume_gives_the_same_student(lm, tmp_path):
    base = dict(codec={"codec": "topk", "k": 8}, epochs=2, checkpoint_every=3)
    cfg = _cfg(lm, tmp_path / "a", **base)
    precompute(cfg)
    distill(cfg)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "student").state_dict()

    cfg2 = _cfg(lm, tmp_path / "b", cache_root=tmp_path / "a" / "caches", **base)

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(cfg2, on_step=crash)
    distill(_cfg(lm, tmp_path / "b", cache_root=tmp_path / "a" / "caches", resume=True, **base))
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "student").state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_num_kv_heads_is_refused_for_classifiers(tmp_path):
    from stages.methods import build_student

    cfg = config_from_dict({"distill": {"student": {"config": "x", "num_kv_heads": 1}}})
    with pytest.raises(ConfigError, match="num_kv_heads"):
        build_student(cfg)


def test_uld_pairs_positions_that_predict_the_same_character(lm, tmp_path):
    import cache_format as cf
    from stages.methods.lm import _alignment
    from stages.models import load_tokenizer
    from stages.tasks import get_task

    cfg = _cfg(lm, tmp_path, codec={"codec": "topk", "k": 8})
    cache = precompute(cfg)[0].path
    task = get_task(cfg.data)
    teacher_rows = task.encode(load_tokenizer(str(lm / "teacher")), task.load(lm / "train.txt"), L)
    student_rows = task.encode_like(load_tokenizer(str(lm / "other")), teacher_rows, L)
    pairs = _alignment(student_rows, cf.CacheReader(cache), L)
    checked = 0
    for i, row in enumerate(student_rows.ids[:20]):
        s_off = student_rows.extras["char_offsets"][student_rows.offsets[i]:student_rows.offsets[i + 1]]
        t_off = teacher_rows.extras["char_offsets"][teacher_rows.offsets[i]:teacher_rows.offsets[i + 1]]
        s_pos, t_pos = pairs[row]
        assert len(s_pos) > 0
        for a, b in zip(s_pos, t_pos):
            assert s_off[a + 1][0] == t_off[b + 1][0]  # the tokens they predict start at the same character
            checked += 1
    assert checked > 50


def test_distill_picks_the_method_that_serves_the_task_kind(lm, tmp_path, monkeypatch):
    """distill.method: kd means the kind's own KD method (`TASK_KINDS[...].method`): lm for causal_lm."""
    import stages.distill as distill_module
    from stages.kinds import TASK_KINDS

    assert {k: v.method for k, v in TASK_KINDS.items()} == {
        "sequence_classification": "kd", "multi_label": "kd", "regression": "kd", "token_classification": "kd",
        "extractive_qa": "kd", "causal_lm": "lm"}
    called = []
    monkeypatch.setitem(distill_module._METHODS, "lm", lambda cfg, on_step=None: called.append("lm") or "done")
    assert distill(_cfg(lm, tmp_path, signal="none")) == "done" and called == ["lm"]
    assert distill_module._method(config_from_dict({})) == "kd"
    theseus = {"method": "theseus", "theseus": {"groups": 2}, "teacher_signal": "online"}
    assert distill_module._method(config_from_dict({"distill": theseus})) == "theseus"
    assert distill_module._method(config_from_dict({"tasks": [{"name": "a", "data": {}}, {"name": "b", "data": {}}]})) == "multitask"
