"""Regression (STS-style): one float target per example (or sentence pair), one output of the head.

Data: a text column (and optionally a text-pair column) and a label column of numbers (int or float columns,
or strings that read as a finite number); data.num_labels is not read (the head has one output) and
data.label_names is refused by the settings. `Examples.labels` is float64 [N]; encoded rows carry float32.

Cache: teacher output [1] per example (and the gold target). Losses: MSE on the gold targets, MSE between
student and teacher outputs for KD (TextBrewer's choice for STS-B; distill.kd.loss must be mse, and the
temperature does not apply: the outputs are not logits of a distribution). Metrics: Pearson (the main one),
Spearman (average ranks for ties) and MSE.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch.nn.functional as F
from torch import Tensor

import cache_format as cf
from stages.data import DataError, Encoded, Examples, encode, load_examples, where
from stages.losses import LossInputError
from stages.tasks.base import LabelledTask

__all__ = ["Regression", "pearson", "spearman"]


class Regression(LabelledTask):
    name = "regression"

    @property
    def num_labels(self) -> int:
        return 1  # data.num_labels (default 2) is for classification kinds

    @property
    def label_names(self) -> list[str] | None:
        return None

    def head_config(self) -> dict[str, Any]:
        # transformers.pipeline returns the raw output (no softmax/sigmoid) for this problem type.
        return {"problem_type": "regression"}

    def load(self, path: str | Path, *, transfer: bool = False) -> Examples:
        d = self.data
        if transfer:
            return load_examples(path, text_field=d.text_field, text_pair_field=d.text_pair_field)
        return load_examples(path, text_field=d.text_field, text_pair_field=d.text_pair_field,
                             label_field=d.label_field, id_field=d.id_field, parse_labels=_targets)

    def encode(self, tokenizer: Any, examples: Examples, max_length: int) -> Encoded:
        enc = encode(tokenizer, examples, max_length)
        if enc.labels is not None:
            enc.labels = np.asarray(enc.labels, dtype=np.float32)
        return enc

    def logits_shape(self) -> tuple[int | str, ...]:
        return (1,)

    def cache_label(self) -> cf.FieldSpec | None:
        return cf.FieldSpec("label", "float32", ())

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(logits[:, 0], batch["labels"].to(logits.dtype))

    def kd_loss(self, student: Tensor, teacher: Tensor, batch: dict[str, Tensor], *, temperature: float | Tensor,
                kind: str, temperature_squared: bool, teacher_lengths: Tensor | None = None) -> Tensor:
        if kind != "mse":
            raise LossInputError(f"kd loss {kind!r} compares class distributions; a regression output is one "
                                 "number: set distill.kd.loss: mse")
        if student.shape != teacher.shape:
            raise LossInputError(f"student outputs {tuple(student.shape)} and teacher outputs "
                                 f"{tuple(teacher.shape)} must have the same shape [batch, 1]")
        return F.mse_loss(student, teacher)

    def predictions(self, logits: Tensor, batch: dict[str, Tensor]) -> np.ndarray:
        return logits[:, 0].cpu().numpy()

    def score(self, data: Encoded, predictions: np.ndarray) -> dict[str, float]:
        y = np.asarray(data.labels, dtype=np.float64)
        p = np.asarray(predictions, dtype=np.float64)
        mse = float(np.mean((p - y) ** 2)) if len(y) else float("nan")
        return {"pearson": pearson(y, p), "spearman": spearman(y, p), "mse": mse}


def _targets(column: pa.ChunkedArray, ids: list[str], path: Path, field: str) -> np.ndarray:
    """The float64 targets of a label column; a missing, non-numeric or non-finite one is a DataError."""
    fix = "give every example a finite number (e.g. 0.75) or drop the row"
    t = column.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_null(t)):
        raise DataError(f"column {field!r} (label_field) in {path} has type {t}; a regression target is a "
                        f"number: {fix}")
    out = np.empty(len(column), dtype=np.float64)
    for row, value in enumerate(column.to_pylist()):
        try:
            number = float(value)
        except (TypeError, ValueError):
            got = "no target (empty or NaN)" if value is None else f"target {value!r}, not a number"
            raise DataError(f"{where(ids, row)} in {path} has {got} in {field!r}; {fix}") from None
        if not math.isfinite(number):
            raise DataError(f"{where(ids, row)} in {path} has target {value!r} in {field!r}; {fix}")
        out[row] = number
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant (no linear relation to measure), NaN when empty."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) == 0:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each sorted position belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    ends = np.r_[starts[1:], len(x)]
    average = (starts + 1 + ends) / 2.0  # mean of the ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = average[run]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties given average ranks (as scipy.stats.spearmanr)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) == 0:
        return float("nan")
    return pearson(_ranks(x), _ranks(y))
