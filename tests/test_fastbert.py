"""FastBERT: normalised entropy, real early exit per batch element, self-distillation, resume, evaluate's curve."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, DistilBertConfig, RobertaConfig

from stages.distill import distill
from stages.evaluate import evaluate
from stages.train_teacher import train_teacher
from stages.config import ConfigError, config_from_dict
from stages.methods import BRANCHES_FILE, CONFIG_FILE, FastBert, FastBertError, check_speed, exit_scores, is_fastbert, load_fastbert, normalized_entropy
from stages.models import load_classifier, load_tokenizer
from stages.tasks import get_task
from tests.helpers import stage_params

TEXTS = ["the film was great and the cast superb", "dull", "boring plot", "a wonderful movie with charming music",
         "the acting was weak and the script messy and the ending bland", "funny"]


def _inputs(model_dir: Path, texts=TEXTS) -> dict[str, torch.Tensor]:
    enc = load_tokenizer(str(model_dir))(list(texts), padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture()
def fastbert(tiny_teacher_dir: Path) -> FastBert:
    torch.manual_seed(0)
    return FastBert(load_classifier(str(tiny_teacher_dir), 2))


# ----------------------------------------------------------------------------------------------------------------
# The model


def test_normalized_entropy_is_entropy_over_log_num_labels():
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    got = normalized_entropy(p.log())
    assert got[0].item() == pytest.approx(expected, abs=1e-6) and got[1].item() == pytest.approx(1.0, abs=1e-6)
    three = torch.tensor([[0.7, 0.2, 0.1]])
    h3 = -sum(q * math.log(q) for q in (0.7, 0.2, 0.1)) / math.log(3)
    assert normalized_entropy(three.log() + 5.0).item() == pytest.approx(h3, abs=1e-6)  # logits: shift-invariant
    assert normalized_entropy(torch.tensor([[100.0, -100.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_without_exits_the_predictions_are_the_full_models(fastbert, tiny_teacher_dir):
    inputs = _inputs(tiny_teacher_dir)
    full = fastbert.backbone(**inputs).logits
    for speed in (None, 1e-9):  # None: never exit; a tiny speed: no untrained branch is that sure
        fastbert.speed = speed
        out = fastbert(**inputs)
        torch.testing.assert_close(out.logits, full, rtol=0, atol=1e-6)
        assert out.layers.tolist() == [4] * len(TEXTS)


def test_speed_one_leaves_every_example_at_the_first_branch(fastbert, tiny_teacher_dir):
    inputs = _inputs(tiny_teacher_dir)
    fastbert.speed = 1.0
    out = fastbert(**inputs)
    assert out.layers.tolist() == [1] * len(TEXTS)
    torch.testing.assert_close(out.logits, fastbert.exit_logits(**inputs)[0], rtol=0, atol=1e-6)


def test_leaving_rows_really_skip_the_later_blocks(fastbert, tiny_teacher_dir):
    inputs = _inputs(tiny_teacher_dir)
    exits = fastbert.exit_logits(**inputs)
    first = normalized_entropy(exits[0])
    fastbert.speed = float(first.median().detach())  # about half leave after block 1
    rows_run: list[int] = []
    hooks = [b.register_forward_hook(lambda m, args, out: rows_run.append(args[0].shape[0]))
             for b in fastbert.blocks]
    try:
        out = fastbert(**inputs)
    finally:
        for h in hooks:
            h.remove()
    layers = out.layers
    leave = first <= fastbert.speed
    assert 0 < int(leave.sum()) < len(TEXTS)
    assert layers[leave].tolist() == [1] * int(leave.sum())
    torch.testing.assert_close(out.logits[leave], exits[0][leave], rtol=0, atol=1e-6)
    # Block i ran on exactly the rows that had not left before it: fewer than the batch after block 1.
    assert rows_run[0] == len(TEXTS)
    assert rows_run == [int((layers > i).sum()) for i in range(len(rows_run))]
    assert sum(rows_run) == int(layers.sum()) < 4 * len(TEXTS)
    # A row that stays gets what it would have got alone: the staying rows' exits are unchanged by the others.
    stay = ~leave
    alone = {k: v[stay] for k, v in inputs.items()}
    again = fastbert(**alone)
    torch.testing.assert_close(again.logits, out.logits[stay], rtol=1e-5, atol=1e-5)
    assert again.layers.tolist() == layers[stay].tolist()


def test_roberta_backbones_run_block_by_block_too(tiny_teacher_dir):
    config = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=1)
    torch.manual_seed(0)
    model = FastBert(AutoModelForSequenceClassification.from_config(config).eval())
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 9, 2, 1, 1]])
    mask = (ids != 1).long()
    out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, model.backbone(input_ids=ids, attention_mask=mask).logits, rtol=0,
                               atol=1e-6)
    assert len(model.branches) == 2 and out.layers.tolist() == [3, 3]


def test_unsupported_backbones_and_speeds_are_one_line_errors(fastbert):
    distil = AutoModelForSequenceClassification.from_config(DistilBertConfig(
        vocab_size=50, dim=32, n_layers=2, n_heads=2, hidden_dim=64))
    with pytest.raises(FastBertError, match="BERT or RoBERTa sequence classifiers"):
        FastBert(distil)
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), "fast"):
        with pytest.raises(FastBertError, match=r"speed must be in \(0, 1\]") as err:
            fastbert.speed = bad
        assert "\n" not in str(err.value)
    assert check_speed(1) == 1 and check_speed(None) is None


def test_settings_are_checked(tiny_teacher_dir, tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"evaluate": {"fastbert_speeds": [0.5, 0, 1.2]}})
    assert "evaluate.fastbert_speeds: speeds must be in (0, 1] (got [0.0, 1.2])" in str(err.value)
    with pytest.raises(ConfigError, match="distill.fastbert.branch_width: 100 is not divisible by branch_heads 3"):
        config_from_dict({"distill": {"method": "fastbert", "fastbert": {"branch_width": 100, "branch_heads": 3}}})
    with pytest.raises(ConfigError, match="distill.fastbert: is only read when distill.method is fastbert"):
        config_from_dict({"distill": {"fastbert": {"branch_width": 64}}})
    with pytest.raises(ConfigError, match="distill.method: 'bogus' is not one of"):
        config_from_dict({"distill": {"method": "bogus"}})
    with pytest.raises(ConfigError, match="distill.method: fastbert exits on the entropy of one class"):
        config_from_dict({"data": {"task": "regression"}, "distill": {"method": "fastbert",
                                                                      "kd": {"loss": "mse"}}})
    assert config_from_dict({"distill": {"method": "fastbert"}}).distill.fastbert.branch_width == 128


# ----------------------------------------------------------------------------------------------------------------
# Self-distillation through `kd distill`, and `kd evaluate`


def _params(root: Path, data: Path, teacher: Path, **sections) -> dict:
    """A fine-tuned tiny teacher (train-teacher) as the backbone; FastBERT into root/fastbert."""
    p = stage_params(root, teacher, {k: str(data / f"{k}.csv") for k in ("train", "dev", "test")}, **sections)
    p["train_teacher"]["epochs"] = 10  # a backbone that has learned the task (dev accuracy 1.0): sure exits exist
    p["distill"].update(method="fastbert", fastbert={"backbone": str(root / "teacher"), "branch_width": 16},
                        epochs=2, lr=3e-3, output=str(root / "fastbert"))
    p["distill"].pop("student")
    p["evaluate"].update(models={"teacher": str(root / "teacher"), "fastbert": str(root / "fastbert")},
                         fastbert_speeds=[0.05, 0.3, 0.6, 1.0], fastbert_curve=str(root / "curve.csv"))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("fastbert")
    params = _params(root, tiny_data_dir, tiny_teacher_dir)
    params["distill"].update(snapshots=True, keep_best="min:kl")  # the training loop's options apply as well
    cfg = config_from_dict(params)
    train_teacher(cfg)
    result = distill(cfg)
    return root, params, result


def test_self_distillation_lowers_the_branch_kl_and_leaves_the_backbone(trained, tiny_data_dir):
    root, params, result = trained
    cfg = config_from_dict(params)
    task = get_task(cfg.data)
    dev = task.encode(load_tokenizer(str(root / "teacher")), task.load(cfg.data.dev), 32)
    torch.manual_seed(42)
    before = exit_scores(FastBert(load_classifier(str(root / "teacher"), 2), 16), dev, task, 64, torch.device("cpu"))
    model = load_fastbert(root / "fastbert", 2)
    after = exit_scores(model, dev, task, 64, torch.device("cpu"))
    assert after["kl"] < 0.5 * before["kl"], (before, after)
    assert result.fit.dev["kl"] == pytest.approx(after["kl"], rel=1e-4)
    assert set(after) >= {"exit1_accuracy", "exit4_accuracy"}
    # The backbone is the teacher, untouched; the folder also loads as a plain classifier.
    teacher = load_classifier(str(root / "teacher"), 2).state_dict()
    plain = load_classifier(str(root / "fastbert"), 2).state_dict()
    assert all(torch.equal(teacher[k], plain[k]) for k in teacher)
    assert is_fastbert(root / "fastbert") and (root / "fastbert" / BRANCHES_FILE).is_file()
    # keep_best: min:kl saved the evaluation with the lowest dev KL, the same weights as its gs{step} snapshot.
    best = result.fit.best_step
    assert best in (13, 26) and result.fit.dev["kl"] == min(e["dev"]["kl"] for e in result.fit.evaluations)
    snapshot = load_fastbert(root / "fastbert" / "snapshots" / f"gs{best}").branches.state_dict()
    assert all(torch.equal(snapshot[k], v) for k, v in model.branches.state_dict().items())
    info = json.loads((root / "fastbert" / CONFIG_FILE).read_text())
    assert info["branches"] == 3 and info["branch_width"] == 16
    metrics = json.loads((root / "m_distill.json").read_text())
    assert metrics["method"] == "fastbert" and metrics["steps"] == result.fit.steps == 26


def test_resume_gives_the_uninterrupted_branches(trained, tmp_path, tiny_data_dir, tiny_teacher_dir):
    root, params, _ = trained
    expected = load_fastbert(root / "fastbert").branches.state_dict()
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    p["distill"]["fastbert"]["backbone"] = str(root / "teacher")
    p["distill"]["checkpoint_every"] = 5

    def crash(step: int) -> None:
        if step == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(config_from_dict(p), on_step=crash)
    assert (tmp_path / "fastbert" / "checkpoint" / "state.pt").exists()
    p["distill"]["resume"] = True
    resumed = distill(config_from_dict(p))
    assert resumed.fit.steps == 26
    got = load_fastbert(tmp_path / "fastbert").branches.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)


def test_evaluate_reports_each_speed_and_writes_the_curve(trained):
    root, params, _ = trained
    results = evaluate(config_from_dict(params))
    teacher, fb = results["teacher"], results["fastbert"]
    assert fb["accuracy"] == teacher["accuracy"]  # the full FastBERT model is the backbone
    curve = fb["fastbert"]
    assert [r["speed"] for r in curve] == [0.05, 0.3, 0.6, 1.0]
    layers = [r["average_layers"] for r in curve]
    assert layers == sorted(layers, reverse=True) and layers[-1] == 1.0 and layers[0] > 1.0 and layers[0] <= 4.0
    assert all(r["examples_per_second"] > 0 and 0 <= r["accuracy"] <= 1 for r in curve)
    assert "teacher" in json.loads((root / "m_eval.json").read_text())
    with open(root / "curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["teacher"] + ["fastbert"] * 4
    assert rows[0]["speed"] == "" and float(rows[0]["average_layers"]) == 4
    assert [float(r["average_layers"]) for r in rows[1:]] == layers
    assert (root / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preds = json.loads((root / "m_preds.json").read_text())
    assert np.array_equal(preds["models"]["fastbert"], preds["models"]["teacher"])


def test_without_matplotlib_the_csv_is_written_and_the_note_says_how(tmp_path, monkeypatch, capsys):
    from stages.methods import write_curve

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    rows = [{"model": "fastbert", "speed": 0.5, "accuracy": 0.8, "macro_f1": 0.8, "average_layers": 2.5,
             "examples_per_second": 100.0}]
    assert write_curve(tmp_path / "c.csv", rows) is None
    assert (tmp_path / "c.csv").read_text().splitlines() == [
        "model,speed,accuracy,macro_f1,average_layers,examples_per_second", "fastbert,0.5,0.8,0.8,2.5,100.0"]
    assert not (tmp_path / "c.png").exists()
    assert "pip install matplotlib" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 2-3 minutes on 2 idle cores; a loaded machine takes several times that
def test_fastbert_on_the_bundled_model_and_data(tmp_path):
    """The real bundled MiniLM (6 blocks) on 400 Rotten Tomatoes sentences: fine-tune, self-distil, evaluate.

    Behaviour only (one short epoch each is too little for quality): exactness, exits, KL, the curve files."""
    from stages.prepare import prepare

    data, models = tmp_path / "data", tmp_path / "models"
    params = {
        "data": {s: str(data / f"{s}.csv") for s in ("train", "dev", "test")},
        "prepare": {"max_examples": 400, "out_dir": str(data)},
        "train_teacher": {"output": str(models / "teacher"), "epochs": 1, "metrics": str(tmp_path / "t.json")},
        "distill": {"method": "fastbert", "fastbert": {"backbone": str(models / "teacher")}, "epochs": 1,
                    "output": str(models / "fastbert"), "log_dir": str(tmp_path / "live"),
                    "metrics": str(tmp_path / "d.json")},
        "evaluate": {"models": {"teacher": str(models / "teacher"), "fastbert": str(models / "fastbert")},
                     "throughput_batches": 2, "output": str(tmp_path / "e.json"),
                     "predictions": str(tmp_path / "p.json"), "fastbert_curve": str(tmp_path / "curve.csv"),
                     "fastbert_speeds": [0.5, 0.99, 1.0]},
    }
    cfg = config_from_dict(params)
    prepare(cfg)
    train_teacher(cfg)
    task = get_task(cfg.data)
    dev = task.encode(load_tokenizer(str(models / "teacher")), task.load(cfg.data.dev), 64)
    torch.manual_seed(0)
    untrained = FastBert(load_classifier(str(models / "teacher"), 2))
    before = exit_scores(untrained, dev, task, 64, torch.device("cpu"))
    distill(cfg)
    model = load_fastbert(models / "fastbert", 2)
    after = exit_scores(model, dev, task, 64, torch.device("cpu"))
    assert after["kl"] < before["kl"], (before, after)
    assert after["exit6_accuracy"] == before["exit6_accuracy"]  # the backbone's head: untouched

    inputs = _inputs(models / "teacher")
    full = model.backbone(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, full, rtol=1e-5, atol=1e-5)  # speed None: every block
    model.speed = 1.0
    assert model(**inputs).layers.tolist() == [1] * len(TEXTS)

    results = evaluate(cfg)
    curve = results["fastbert"]["fastbert"]
    layers = [r["average_layers"] for r in curve]
    # One short epoch on 320 sentences leaves the backbone unsure (entropy near 1): only speed 1 is sure to exit.
    assert layers == sorted(layers, reverse=True) and layers[-1] == 1.0 < layers[0] <= 6.0
    assert results["fastbert"]["accuracy"] == results["teacher"]["accuracy"]
    assert (tmp_path / "curve.csv").is_file() and (tmp_path / "curve.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fastbert_on_cuda_with_autocast(tmp_path, tiny_data_dir, tiny_teacher_dir):
    """On CUDA: the exits match the backbone, rows really leave, and bf16 self-distillation lowers the KL."""
    from stages.train import fit
    from stages.config import DistillConfig
    from stages.methods import SelfDistillation, speed_curve

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = FastBert(load_classifier(str(tiny_teacher_dir), 2)).to(cuda)
    inputs = {k: v.to(cuda) for k, v in _inputs(tiny_teacher_dir).items()}
    torch.testing.assert_close(model(**inputs).logits, model.backbone(**inputs).logits, rtol=1e-4, atol=1e-4)
    model.speed = 1.0
    assert model(**inputs).layers.tolist() == [1] * len(TEXTS)
    model.speed = None

    task = get_task(config_from_dict({}).data.model_copy(update={"train": str(tiny_data_dir / "train.csv")}))
    tokenizer = load_tokenizer(str(tiny_teacher_dir))
    train = task.encode(tokenizer, task.load(tiny_data_dir / "train.csv"), 32)
    dev = task.encode(tokenizer, task.load(tiny_data_dir / "dev.csv"), 32)
    before = exit_scores(model, dev, task, 64, cuda)["kl"]
    cfg = DistillConfig(epochs=2.0, batch_size=16, lr=3e-3, max_length=32, mixed_precision="bf16")
    fit(model, SelfDistillation(), train, dev, cfg, output=tmp_path / "fb", log_dir=None, device=cuda,
        evaluate=lambda m, data: exit_scores(m, data, task, 64, cuda))
    after = exit_scores(model, dev, task, 64, cuda)["kl"]
    assert after < before, (before, after)
    curve = speed_curve(model, dev, task, [0.5, 1.0], 16, lambda m: 1.0, cuda)
    assert curve[-1]["average_layers"] == 1.0 and curve[0]["average_layers"] >= 1.0
