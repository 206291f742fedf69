"""BERT-of-Theseus (distill.method: theseus): schedule, hybrid forward, freezing, settings, saving, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from cache_format import KDError
from stages.distill import distill
from stages.evaluate import evaluate
from stages.prepare import prepare
from stages.train_teacher import train_teacher
from stages.config import ConfigError, TheseusConfig, config_from_dict
from stages.models import ModelError, student_from_teacher
from stages.methods import TheseusModel, TheseusObjective, replace_mask, replace_probability
from tests.helpers import stage_params


def _params(tmp: Path, data: Path, teacher: Path, theseus: dict | None = None, **distill_keys) -> dict:
    files = {split: str(data / f"{split}.csv") for split in ("train", "dev", "test")}
    d = {"method": "theseus", "teacher_signal": "online", "theseus": {"groups": 2, **(theseus or {})},
         **distill_keys}
    return stage_params(tmp, teacher, files, distill=d)


def _inputs(n: int = 3, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 60, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def theseus(tiny_teacher_dir) -> TheseusModel:
    """The 4-layer tiny teacher in groups of 2, with successors moved away from their initial copies."""
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    model = TheseusModel(teacher, 2)
    with torch.no_grad():
        for p in model.successors.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------------------------------------------
# The replacement schedule


def test_constant_and_linear_replacement_probability():
    assert [replace_probability(TheseusConfig(replace_prob=0.3), s) for s in (0, 7, 10_000)] == [0.3, 0.3, 0.3]
    linear = TheseusConfig(replace_prob=0.1, curriculum="linear", curriculum_k=0.01)
    got = [replace_probability(linear, s) for s in (0, 10, 45, 90, 91, 10_000)]
    assert got == pytest.approx([0.1, 0.2, 0.55, 1.0, 1.0, 1.0])


def test_replacement_draws_follow_p_and_depend_only_on_seed_and_step():
    assert replace_mask(1.0, 3, seed=1, step=4) == [True] * 3
    assert replace_mask(0.0, 3, seed=1, step=4) == [False] * 3
    state = torch.get_rng_state()
    assert replace_mask(0.5, 6, seed=2, step=9) == replace_mask(0.5, 6, seed=2, step=9)
    assert torch.equal(state, torch.get_rng_state())  # dropout's generator is left alone
    draws = np.array([replace_mask(0.3, 3, seed=0, step=s) for s in range(2000)])
    # 6,000 Bernoulli(0.3) draws: the standard deviation of their mean is 0.006; 0.025 is 4 of them.
    assert abs(draws.mean() - 0.3) < 0.025
    assert len({tuple(m) for m in draws.tolist()}) == 8  # every pattern of 3 groups occurs


def test_objective_replaces_in_phase_one_and_runs_the_successors_alone_after():
    seen = []

    class Recorder(torch.nn.Module):
        groups = 2

        def forward(self, replace=None, **inputs):
            seen.append(replace)
            return type("Out", (), {"logits": torch.zeros(2, 2, requires_grad=True)})()

    from stages.tasks import get_task
    from stages.config import DataConfig

    objective = TheseusObjective(TheseusConfig(replace_prob=1.0), get_task(DataConfig()), seed=0, replace_steps=3)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    for step in range(5):
        objective.losses(Recorder(), batch, ["a", "b"], step, 5)
    assert seen == [[True, True]] * 3 + [None, None]


def test_a_step_that_replaces_nothing_gives_the_successors_a_zero_gradient(theseus):
    from stages.config import DataConfig
    from stages.tasks import get_task

    objective = TheseusObjective(TheseusConfig(replace_prob=1e-9), get_task(DataConfig()), seed=0, replace_steps=9)
    batch = {**_inputs(), "labels": torch.tensor([0, 1, 0])}
    theseus.eval()
    loss = objective.losses(theseus, batch, ["a", "b", "c"], 0, 9)["hard"]
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in theseus.successors.parameters())
    assert all(p.grad is None for p in theseus.teacher.parameters())
    expected = torch.nn.functional.cross_entropy(theseus.teacher(**_inputs()).logits, batch["labels"])
    assert torch.allclose(loss, expected, atol=1e-6)  # the teacher's own loss: nothing was replaced


# ---------------------------------------------------------------------------------------------------------------
# The hybrid forward


def test_p1_is_the_successor_model_and_p0_the_teacher_in_train_mode(theseus):
    x = _inputs()
    theseus.train()  # dropout on: the same seed must give the same masks, so the same operations run in order
    torch.manual_seed(0)
    all_successors = theseus(replace=[True, True], **x).logits
    torch.manual_seed(0)
    alone = theseus.student(**x).logits
    torch.manual_seed(0)
    all_teacher = theseus(replace=[False, False], **x).logits
    torch.manual_seed(0)
    teacher = theseus.teacher(**x).logits
    assert torch.allclose(all_successors, alone, atol=1e-6)
    assert torch.allclose(all_teacher, teacher, atol=1e-6)
    assert not torch.allclose(alone, teacher, atol=1e-3)
    theseus.eval()
    assert torch.equal(theseus(**x).logits, theseus.student(**x).logits)  # no mask: the successors alone


def test_a_mixed_draw_runs_successor_blocks_in_place_of_their_groups(theseus):
    x = _inputs()
    theseus.eval()
    # Group 0 replaced by successor 0, group 1 kept: teacher blocks 2 and 3 after successor 0.
    expected = student_from_teacher(theseus.teacher, [0, 2, 3]).eval()
    expected.bert.encoder.layer[0].load_state_dict(theseus.successors[0].state_dict())
    got = theseus(replace=[True, False], **x).logits
    assert torch.allclose(got, expected(**x).logits, atol=1e-6)
    assert len(theseus.teacher.bert.encoder.layer) == 4  # the teacher's own blocks are back


def test_only_the_successor_blocks_are_trainable(theseus):
    trainable = {n for n, p in theseus.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("student.bert.encoder.layer.") for n in trainable)
    assert {n.split(".")[4] for n in trainable} == {"0", "1"}


def test_groups_that_do_not_divide_the_layers_are_an_error(tiny_teacher_dir):
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir)
    with pytest.raises(ModelError, match=r"groups 3 does not divide the teacher's 4 layers; use one of \[1, 2, 4\]"):
        TheseusModel(teacher, 3)


# ---------------------------------------------------------------------------------------------------------------
# Settings


def test_theseus_settings_are_checked(tmp_path, tiny_data_dir, tiny_teacher_dir):
    def problems(theseus=None, **distill_keys) -> str:
        with pytest.raises(ConfigError) as e:
            config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir, theseus, **distill_keys))
        return str(e.value)

    assert "set distill.teacher_signal: online" in problems(teacher_signal="cached")
    assert "distill.theseus.groups: method theseus needs" in problems(theseus={"groups": None})
    assert "distill.theseus.replace_prob: must be in (0, 1]" in problems(theseus={"replace_prob": 0.0})
    assert "distill.theseus.curriculum_k: the linear curriculum needs k > 0" in problems(
        theseus={"curriculum": "linear"})
    assert "curriculum_k: only applies to curriculum: linear" in problems(theseus={"curriculum_k": 0.01})
    assert "distill.matches: method theseus trains" in problems(match_preset="L3_hidden_mse")
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    p["data"]["task"], p["data"]["label_field"] = "causal_lm", None
    with pytest.raises(ConfigError, match="distill.method: theseus is not supported for data.task causal_lm"):
        config_from_dict(p)
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    p["distill"]["method"] = "kd"
    with pytest.raises(ConfigError, match="distill.theseus: only read when distill.method is theseus"):
        config_from_dict(p)
    p = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    p["precompute"]["teachers"] = [str(tiny_teacher_dir)] * 2
    with pytest.raises(ConfigError, match="precompute.teachers: method theseus replaces the blocks of one teacher"):
        config_from_dict(p)


def test_a_grouping_that_does_not_divide_is_a_one_line_error_from_distill(tmp_path, tiny_data_dir, tiny_teacher_dir):
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir, {"groups": 3}))
    with pytest.raises(KDError) as e:
        distill(cfg)
    assert "\n" not in str(e.value) and "use one of [1, 2, 4]" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# End to end: training, freezing, the saved student, resume


def _state(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForSequenceClassification.from_pretrained(path).state_dict()


def test_distill_saves_a_student_of_groups_blocks_with_the_teacher_frozen(tmp_path, tiny_data_dir, tiny_teacher_dir):
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                   {"replace_prob": 0.5, "successor_epochs": 1.0}, epochs=1,
                                   eval_every=13, snapshots=True, keep_best="accuracy"))
    res = distill(cfg)
    assert res.fit.steps == 26  # 1 epoch of replacing + 1 of the successors alone, 13 batches each
    for step in (13, 26):  # snapshots are successor models too
        snap = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student" / "snapshots" / f"gs{step}")
        assert snap.config.num_hidden_layers == 2
    assert res.fit.best_step in (13, 26)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    s, t = student.state_dict(), _state(tiny_teacher_dir)
    blocks = [k for k in s if k.startswith("bert.encoder.layer.")]
    assert blocks and all(torch.equal(s[k], t[k]) for k in s if k not in blocks)  # embeddings, pooler, head
    assert all(not torch.equal(s[k], t[k]) for k in blocks if k.endswith("dense.weight"))  # successors learned
    metrics = json.loads((tmp_path / "m_distill.json").read_text())
    assert metrics["method"] == "theseus" and 0 <= metrics["dev_accuracy"] <= 1
    results = evaluate(cfg)  # `kd evaluate` loads it as any student
    assert results["student"]["parameters"] < results["teacher"]["parameters"]


def test_resume_reaches_the_same_weights_and_phase_one_leaves_the_teacher_alone(tmp_path, tiny_data_dir,
                                                                                 tiny_teacher_dir):
    def cfg(name: str, resume: bool = False):
        return config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                        {"curriculum": "linear", "replace_prob": 0.2, "curriculum_k": 0.05},
                                        epochs=1, checkpoint_every=4, output=str(tmp_path / name), resume=resume))

    distill(cfg("full"))

    def stop(step: int) -> None:
        if step == 13:  # the last step of phase 1 (13 steps); the last checkpoint is at step 12
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(cfg("part"), on_step=stop)
    state = torch.load(tmp_path / "part" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 12
    teacher = _state(tiny_teacher_dir)
    saved = state["model"]
    assert all(torch.equal(saved[f"teacher.{k}"], v) for k, v in teacher.items())  # every teacher weight
    moved = [k for k in saved if k.startswith("student.bert.encoder.layer.")
             and not torch.equal(saved[k], teacher[k.removeprefix("student.")])]
    assert moved  # while successor blocks (copies of teacher blocks 0 and 1) learned

    distill(cfg("part", resume=True))
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# The real bundled model: 6 blocks into 3


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bundled_model_six_blocks_into_three(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    data, models = tmp_path / "data", tmp_path / "models"
    params["data"].update({s: str(data / f"{s}.csv") for s in ("train", "dev", "test")})
    params["data"]["transfer"] = None
    params["prepare"].update({"max_examples": 400, "transfer_source": None, "out_dir": str(data)})
    params["train_teacher"].update({"output": str(models / "teacher"), "epochs": 1,
                                    "metrics": str(tmp_path / "teacher.json")})
    params["precompute"]["teachers"] = [str(models / "teacher")]
    params["distill"].update({"method": "theseus", "teacher_signal": "online", "epochs": 1, "lr": 5e-5,
                              "theseus": {"groups": 3, "curriculum": "linear", "replace_prob": 0.3,
                                          "curriculum_k": 0.07, "successor_epochs": 1},
                              "output": str(models / "student"), "log_dir": str(tmp_path / "live"),
                              "metrics": str(tmp_path / "distill.json")})
    params["evaluate"].update({"models": {"teacher": str(models / "teacher"), "student": str(models / "student")},
                               "throughput_batches": 2, "output": str(tmp_path / "eval.json"),
                               "predictions": str(tmp_path / "preds.json")})
    cfg = config_from_dict(params)
    prepare(cfg)
    train_teacher(cfg)
    res = distill(cfg)
    assert res.fit.steps == 20  # 320 training examples: 10 batches of 32 per phase
    student = AutoModelForSequenceClassification.from_pretrained(models / "student")
    assert student.config.num_hidden_layers == 3
    results = evaluate(cfg)
    assert results["student"]["parameters"] < results["teacher"]["parameters"]
    assert 0 <= results["student"]["accuracy"] <= 1
