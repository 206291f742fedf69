"""The stages learn: a fine-tuned teacher beats chance, and distillation makes a student agree with its teacher.

Both on the tiny sentiment set of conftest (label 1 sentences hold positive words, label 0 negative ones), which a
model can learn; a broken loss, optimizer step or KD term leaves these numbers at chance.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from stages.config import config_from_dict
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.train_teacher import train_teacher
from tests.helpers import stage_params

LABELLED = 8  # rows of train.csv the students get labels for; the rest are unlabelled transfer text


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_dir, tiny_teacher_dir):
    """A teacher fine-tuned on the 200 training rows; the students' few labelled rows and the transfer text."""
    tmp = tmp_path_factory.mktemp("learning")
    with open(tiny_data_dir / "train.csv") as f:
        rows = list(csv.DictReader(f))
    small = _write(tmp / "small.csv", rows[:LABELLED])
    transfer = _write(tmp / "transfer.csv", [{"text": r["text"]} for r in rows[LABELLED:]])
    files = {split: str(tiny_data_dir / f"{split}.csv") for split in ("train", "dev", "test")}
    p = stage_params(tmp, tiny_teacher_dir, files, train_teacher={"epochs": 3, "lr": 3e-3})
    [res] = train_teacher(config_from_dict(p))
    return tmp, res, small, transfer


def test_train_teacher_learns_well_above_chance(trained):
    _, res, _, _ = trained
    assert res.fit.dev["accuracy"] >= 0.85  # chance is 0.5 on the balanced dev split


def test_a_distilled_student_agrees_with_its_teacher_more_than_a_labels_only_one(trained, tiny_data_dir,
                                                                                tiny_teacher_dir):
    tmp, _, small, transfer = trained
    teacher = tmp / "teacher"
    files = {"train": str(small), "dev": str(tiny_data_dir / "dev.csv"), "test": str(tiny_data_dir / "test.csv"),
             "transfer": str(transfer)}
    runs = {}
    for name, signal in (("distilled", "cached"), ("labels", "none")):
        out = tmp / name
        # The student starts from layers of the untrained model, not of the fine-tuned teacher.
        student = {"from_teacher": str(tiny_teacher_dir), "keep_layers": [0, 3]}
        p = stage_params(out, teacher, files,
                         distill={"teacher_signal": signal, "epochs": 3, "lr": 3e-3, "student": student},
                         evaluate={"models": {"teacher": str(teacher), "student": str(out / "student")}})
        cfg = config_from_dict(p)
        if signal == "cached":
            precompute(cfg)
        distill(cfg)
        evaluate(cfg)
        preds = json.loads((out / "m_preds.json").read_text())["models"]
        runs[name] = float(np.mean(np.array(preds["student"]) == np.array(preds["teacher"])))
    # The distilled student saw the teacher's signal on 192 more sentences than the labels-only one. Measured:
    # 0.98 vs 0.50; with distill.kd.weight 0 (the KD term ignored) the distilled student also stays at 0.50.
    assert runs["distilled"] > runs["labels"] + 0.05, runs
