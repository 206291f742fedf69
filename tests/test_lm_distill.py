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
from stages.kinds import LM_CODECS, LM_LOSSES
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
                    "kd": {"weight": 1.0, "hard_weight": 1.0}, "lm": lm or {},  # T: precompute.lm.temperature
                    "output": str(student_dir), "log_dir": str(tmp / "live"), "metrics": str(tmp / "m.json"),
                    **distill_settings},
        "evaluate": {"models": {"teacher": str(root / "teacher"), "student": str(student_dir)},
                     "max_length": L, "batch_size": 8, "throughput_batches": 1, "output": str(tmp / "eval.json"),
                     "predictions": str(tmp / "pred.json")},
    })


def _record_kd(monkeypatch) -> list[float]:
    """The KD term of every training step of the next distills (LMObjective.losses' "kd"), in order."""
    from stages.methods.lm import LMObjective

    seen: list[float] = []
    real = LMObjective.losses

    def recording(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append(float(out["kd"]))
        return out

    monkeypatch.setattr(LMObjective, "losses", recording)
    return seen


def _untrained_perplexity(cfg) -> float:
    """Dev perplexity of the student distill builds, before any step (same seed, same init)."""
    from stages.methods.lm import _build_student
    from stages.models import lm_metrics
    from stages.tasks import get_task
    from stages.train import set_seed

    set_seed(cfg.distill.seed)
    student, tok = _build_student(cfg)
    task = get_task(cfg.data)
    dev = task.encode(tok, task.load(cfg.data.dev), L)
    return lm_metrics(student, dev, batch_size=8, device="cpu")["perplexity"]


@pytest.mark.parametrize("codec, loss, hard_weight", [({"codec": "topk", "k": 8}, "forward_kl", 1.0),
                                                      ({"codec": "sampled", "samples": 6}, "forward_kl", 1.0),
                                                      ({"codec": "dense"}, "forward_kl", 1.0),
                                                      ({"codec": "topk", "k": 8}, "skew_reverse_kl", 0.0)])
def test_cached_distill_trains_a_loadable_student(lm, tmp_path, monkeypatch, codec, loss, hard_weight):
    """The KD term falls over training and, with the text's cross-entropy, the student's dev perplexity ends far
    below the untrained one's. (This teacher is a random model with a peaked output layer: its next tokens are
    not the text's, so a mode-seeking loss is seen to fall on its own, without the cross-entropy pulling away.)"""
    cfg = _cfg(lm, tmp_path, codec=codec, lm={"loss": loss}, epochs=3,
               kd={"weight": 1.0, "hard_weight": hard_weight})
    precompute(cfg)
    kd = _record_kd(monkeypatch)
    res = distill(cfg)
    assert res.teacher_signal == "cached" and res.fit.steps == len(kd) > 10
    assert np.mean(kd[-3:]) < 0.85 * np.mean(kd[:3]), kd
    metrics = json.loads((tmp_path / "m.json").read_text())
    if hard_weight:
        untrained = _untrained_perplexity(cfg)
        assert metrics["dev_perplexity"] < 0.5 * untrained, (metrics["dev_perplexity"], untrained)
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


@pytest.mark.parametrize("loss", sorted(LM_LOSSES))
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


# ---------------------------------------------------------------------------------------------------------------
# the KD term on one batch: temperature, T^2, every loss through every cache, the one head function


def _kd_of_one_batch(cfg, source, codec, student, rows, pairs=None) -> float:
    """LMObjective's KD term on the first 8 rows of `rows` (one teacher `source`, no gradient)."""
    from stages.data import collate
    from stages.methods.lm import LMObjective

    ids = list(rows.ids[:8])
    batch, _ = collate(rows, np.arange(8))
    settings = dict(source.readers[0].manifest.settings["lm"]) if codec else {}
    objective = LMObjective(cfg, source, codec, settings, pairs, L)
    objective.start_epoch([ids])
    try:
        with torch.no_grad():
            return float(objective.losses(student, batch, ids, 0, 1)["kd"])
    finally:
        objective.close()


def _cached(path):
    import cache_format as cf
    from stages.methods.lm import _codec
    from stages.teacher import CachedTeachers

    reader = cf.CacheReader(path)
    codec = _codec(reader)
    return CachedTeachers([reader], list(LM_CODECS[codec].kd_fields), torch.device("cpu"), prefetch=1), codec


def _online(root, rows):
    from stages.models import load_causal_lm
    from stages.tasks import TeacherSpec, get_task
    from stages.teacher import OnlineTeachers

    teacher = load_causal_lm(str(root / "teacher")).eval()
    return OnlineTeachers([teacher], [rows], TeacherSpec(full_logits=True), torch.device("cpu"),
                          get_task(config_from_dict({"data": {"task": "causal_lm"}}).data))


@pytest.fixture(scope="module")
def batch_setup(lm, tmp_path_factory):
    """Caches captured at T = 2 (dense; topk with k = V = 300; topk k = 8; sampled), the teacher's rows and a
    1-layer student (seeded) to score them with."""
    from stages.methods.lm import _build_student
    from stages.models import load_tokenizer
    from stages.tasks import get_task
    from stages.train import set_seed

    tmp = tmp_path_factory.mktemp("batch")
    caches = {}
    for name, codec in {"dense": {"codec": "dense"}, "topk_v": {"codec": "topk", "k": 300},
                        "topk": {"codec": "topk", "k": 8}, "sampled": {"codec": "sampled", "samples": 12}}.items():
        cfg = _cfg(lm, tmp, codec={**codec, "temperature": 2.0})
        caches[name] = precompute(cfg)[0].path
    task = get_task(cfg.data)
    rows = task.encode(load_tokenizer(str(lm / "teacher")), task.load(lm / "train.txt"), L)
    set_seed(0)
    student, _ = _build_student(cfg)
    with torch.no_grad():  # a random init predicts almost uniformly: a peaked student makes T matter
        student.lm_head.weight.mul_(20)
    return {"caches": caches, "rows": rows, "student": student.eval(), "tmp": tmp}


def _hot(lm, tmp, **kd):
    """Settings of a T = 2 run (the caches' capture temperature; distill.kd.temperature follows it)."""
    cfg = _cfg(lm, tmp, codec={"codec": "dense", "temperature": 2.0})
    return cfg.model_copy(update={"distill": cfg.distill.model_copy(update={
        "kd": cfg.distill.kd.model_copy(update=kd)})})


def test_cached_dense_at_t2_equals_online_forward_kl_at_t2_with_t_squared(lm, batch_setup):
    """A dense cache captured at T = 2 gives the online KD term at T = 2, T^2 included: both equal
    T^2 * mean KL(softmax(teacher / T) || softmax(student / T)) computed here from the two models' logits."""
    from stages.models import load_causal_lm

    rows, student = batch_setup["rows"], batch_setup["student"]
    cfg = _hot(lm, batch_setup["tmp"])
    assert cfg.distill.kd.temperature == 2.0 and cfg.distill.kd.temperature_squared
    cached = _kd_of_one_batch(cfg, *_cached(batch_setup["caches"]["dense"]), student, rows)
    online = _kd_of_one_batch(cfg, _online(lm, rows), None, student, rows)
    ids = torch.from_numpy(rows.input_ids[: 8 * L].astype(np.int64)).view(8, L)
    with torch.no_grad():
        t = load_causal_lm(str(lm / "teacher"))(input_ids=ids).logits[:, :-1].reshape(-1, 300) / 2
        s = student(input_ids=ids).logits[:, :-1].reshape(-1, 300) / 2
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert online == pytest.approx(4 * float(kl), rel=1e-4)
    assert cached == pytest.approx(online, rel=5e-3)  # the cache holds float16 log-probabilities


def test_a_topk_cache_with_k_equal_v_gives_the_dense_kd_term_for_every_loss(lm, batch_setup):
    """At k = V the top-k bucket is the whole distribution: for every loss, the topk cache's KD term equals the
    dense cache's (same float16 values, in another order) and the online one (within float16 rounding)."""
    rows, student = batch_setup["rows"], batch_setup["student"]
    for loss in LM_LOSSES:
        cfg = _hot(lm, batch_setup["tmp"])
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={
            "lm": cfg.distill.lm.model_copy(update={"loss": loss})})})
        dense = _kd_of_one_batch(cfg, *_cached(batch_setup["caches"]["dense"]), student, rows)
        topk = _kd_of_one_batch(cfg, *_cached(batch_setup["caches"]["topk_v"]), student, rows)
        online = _kd_of_one_batch(cfg, _online(lm, rows), None, student, rows)
        assert dense > 0 and np.isfinite(topk), loss
        assert topk == pytest.approx(dense, rel=1e-4), loss
        assert dense == pytest.approx(online, rel=1e-2), loss


def test_sampled_estimates_and_topk_bounds_the_dense_forward_kl_at_t2(lm, batch_setup):
    """At the caches' T = 2: the sampled estimate (12 seeded draws per position, unbiased) is within 10% of the
    dense forward KL on one batch of 120 positions, and the k = 8 bucket is a lower bound of it (the student at
    T = 1 instead would give the sampled codec 25 against the dense 14 here)."""
    rows, student = batch_setup["rows"], batch_setup["student"]
    cfg = _hot(lm, batch_setup["tmp"])
    kd = {name: _kd_of_one_batch(cfg, *_cached(batch_setup["caches"][name]), student, rows)
          for name in ("dense", "topk", "sampled")}
    assert kd["sampled"] == pytest.approx(kd["dense"], rel=0.1), kd
    assert 0 < kd["topk"] < kd["dense"], kd


@pytest.mark.parametrize("signal", ["online", "dense", "topk", "sampled", "uld"])
def test_every_signal_multiplies_the_kd_term_by_t_squared(lm, batch_setup, signal):
    """One rule: with distill.kd.temperature_squared the KD term is T^2 times the one without, for every signal."""
    from stages.methods.lm import _alignment
    from stages.models import load_tokenizer
    from stages.tasks import get_task

    rows, student, pairs = batch_setup["rows"], batch_setup["student"], None
    if signal == "uld":  # a student with another tokenizer, on the teacher's blocks re-tokenised
        from stages.methods.lm import _build_student

        task = get_task(config_from_dict({"data": {"task": "causal_lm"}}).data)
        rows = task.encode_like(load_tokenizer(str(lm / "other")), rows, L)
        student, _ = _build_student(_cfg(lm, batch_setup["tmp"], student={"config": str(lm / "other"),
                                                                           "num_layers": 1}))
        source, codec = _cached(batch_setup["caches"]["topk"])
        pairs = _alignment(rows, source.readers[0], L)
        lm_settings = {"cross_tokenizer": True}
    else:
        lm_settings = {}
    values = []
    for squared in (True, False):
        cfg = _hot(lm, batch_setup["tmp"], temperature_squared=squared)
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={
            "lm": cfg.distill.lm.model_copy(update=lm_settings)})})
        if signal == "online":
            source, codec = _online(lm, rows), None
        else:
            source, codec = _cached(batch_setup["caches"]["topk" if signal == "uld" else signal])
        values.append(_kd_of_one_batch(cfg, source, codec, student, rows, pairs))
    assert values[1] > 0 and values[0] == pytest.approx(4 * values[1], rel=1e-6), values


def test_the_training_loss_reads_the_softcapped_head(lm, tmp_path):
    """The LM objective's logits are `head_logits`' (Gemma-2 style final_logit_softcapping applied), as in
    precompute and evaluate: its loss is the cross-entropy of the capped logits, not of the raw output layer."""
    import torch.nn.functional as F

    from stages.data import collate
    from stages.methods.lm import LMObjective
    from stages.models import head_logits, load_causal_lm, load_tokenizer
    from stages.tasks import get_task

    model = load_causal_lm(str(lm / "teacher")).eval()  # its output layer is scaled: large logits
    model.config.final_logit_softcapping = 2.0
    cfg = _cfg(lm, tmp_path, signal="none")
    task = get_task(cfg.data)
    rows = task.encode(load_tokenizer(str(lm / "teacher")), task.load(lm / "train.txt"), L)
    batch, ids = collate(rows, np.arange(4))
    with torch.no_grad():
        loss = float(LMObjective(cfg, None, None, {}, None, L).losses(model, batch, ids, 0, 1)["hard"])
        hidden = model.base_model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1].reshape(-1, 48)
        labels = batch["input_ids"][:, 1:].reshape(-1)
        capped = float(F.cross_entropy(head_logits(model, hidden), labels))
        raw = float(F.cross_entropy(model.get_output_embeddings()(hidden), labels))
    assert abs(capped - raw) > 1.0
    assert loss == pytest.approx(capped, rel=1e-5)


def test_a_cached_distill_never_builds_the_teacher(lm, tmp_path, monkeypatch):
    """With teacher_signal cached, no teacher model is loaded (only its tokenizer and config are read): loading it
    raises here, and a cached distill still runs, while an online one stops at the teacher."""
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    cfg = _cfg(lm, tmp_path, codec={"codec": "topk", "k": 8})
    precompute(cfg)
    teacher = (lm / "teacher").resolve()

    def guard(real):
        def load(cls, name, *args, **kwargs):
            if Path(str(name)).resolve() == teacher:
                raise AssertionError(f"the teacher model was built from {name}")
            return real.__func__(cls, name, *args, **kwargs)
        return classmethod(load)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", guard(PreTrainedModel.from_pretrained))
    monkeypatch.setattr(_BaseAutoModelClass, "from_pretrained", guard(_BaseAutoModelClass.from_pretrained))
    assert distill(cfg).fit.steps > 0
    with pytest.raises(AssertionError, match="the teacher model was built"):
        distill(_cfg(lm, tmp_path / "online", signal="online"))


def test_a_cache_at_another_temperature_or_of_the_old_topk_format_is_refused(lm, tmp_path):
    """Explicit distill.caches are checked against their manifests: the capture temperature must be the distill
    temperature, the codec must serve the loss, and a top-k cache from before tail_logprob is refused."""
    from stages.methods.lm import _codec

    cache = precompute(_cfg(lm, tmp_path, codec={"codec": "topk", "k": 8}))[0].path
    cfg = _cfg(lm, tmp_path, caches=[str(cache)], kd={"temperature": 2.0, "weight": 1.0, "hard_weight": 1.0})
    with pytest.raises(KDError) as err:
        distill(cfg)
    assert str(err.value) == (
        f"distill.kd.temperature: 2 differs from cache {cache}'s capture temperature 1: a cached teacher holds its "
        "distribution at the temperature it was captured at; set precompute.lm.temperature: 2 and rerun kd "
        "precompute (or distill.kd.temperature: 1)")
    sampled = precompute(_cfg(lm, tmp_path, codec={"codec": "sampled", "samples": 4}))[0].path
    with pytest.raises(KDError, match=r"^distill.lm.loss: jsd is not served by a sampled cache \(it serves "
                                      r"forward_kl only\)"):
        distill(_cfg(lm, tmp_path, caches=[str(sampled)], lm={"loss": "jsd"}))
    import cache_format as cf

    old = cf.CacheReader(Path(__file__).parent / "fixtures" / "cache_v1")  # topk_ids, topk_logprobs, logsumexp
    with pytest.raises(KDError, match=r"written before the exact tail mass \(tail_logprob\) .* re-run `kd "
                                      "precompute`"):
        _codec(old)


def test_uld_runs_at_the_distill_temperature(lm, batch_setup):
    """Cross-tokenizer KD on one batch at T = 2: T^2 times the mean `uld_loss` at T = 2 over the paired positions,
    each student position's logits against the teacher position's cached top k and tail."""
    import cache_format as cf
    from stages.data import collate
    from stages.losses import uld_loss
    from stages.methods.lm import _alignment, _build_student
    from stages.models import head_logits, load_tokenizer
    from stages.tasks import get_task
    from stages.train import set_seed

    task = get_task(config_from_dict({"data": {"task": "causal_lm"}}).data)
    rows = task.encode_like(load_tokenizer(str(lm / "other")), batch_setup["rows"], L)
    set_seed(0)
    student, _ = _build_student(_cfg(lm, batch_setup["tmp"], student={"config": str(lm / "other"), "num_layers": 1}))
    with torch.no_grad():
        student.lm_head.weight.mul_(20)
    path = batch_setup["caches"]["topk"]
    pairs = _alignment(rows, cf.CacheReader(path), L)
    cfg = _hot(lm, batch_setup["tmp"])
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={
        "lm": cfg.distill.lm.model_copy(update={"cross_tokenizer": True})})})
    got = _kd_of_one_batch(cfg, *_cached(path), student, rows, pairs)
    batch, ids = collate(rows, np.arange(8))
    reader, parts = cf.CacheReader(path), []
    with torch.no_grad():
        hidden = student.base_model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).last_hidden_state
        for b, rid in enumerate(ids):
            s_pos, t_pos = pairs[rid]
            cached = reader.get(rid)
            parts.append(uld_loss(head_logits(student, hidden[b, torch.from_numpy(s_pos)]),
                                  torch.from_numpy(cached["topk_logprobs"][t_pos].astype(np.float32)),
                                  torch.from_numpy(cached["tail_logprob"][t_pos]), temperature=2.0))
    want = 4 * float(torch.cat(parts).mean())
    assert got == pytest.approx(want, rel=1e-5)
