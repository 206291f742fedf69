"""Multi-label sequence (or sentence-pair) classification: any number of the C labels per example, one
sigmoid per label.

Data: a text column (and optionally a text-pair column) and a label column holding, per example, a list of
labels (JSON lines / Parquet list column) or one string of labels joined by data.label_delimiter (CSV, e.g.
"sports|politics"). Labels are names listed in data.label_names or int ids in [0, data.num_labels); an empty
list / empty string is an example with no labels. `Examples.labels` is a float32 [N, C] 0/1 matrix.

Cache: teacher logits [C] per example (and the gold 0/1 row). Losses: binary cross-entropy with logits on the
gold rows (mean over examples and labels); KD on each label's probability at a temperature (`multi_label_kd_loss`).
Metrics: micro-F1 (the main one), macro-F1 and subset accuracy of sigmoid(logits) >= data.threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

import cache_format as cf
from stages.data import DataError, Encoded, Examples, encode, load_examples, where
from stages.losses import LossInputError
from stages.tasks.base import LabelledTask

__all__ = ["MultiLabel", "multi_label_kd_loss", "multi_label_scores"]

DEFAULT_THRESHOLD = 0.5


class MultiLabel(LabelledTask):
    name = "multi_label"

    @property
    def threshold(self) -> float:
        """A label is predicted when its probability is >= this (data.threshold, default 0.5)."""
        return DEFAULT_THRESHOLD if self.data.threshold is None else float(self.data.threshold)

    def head_config(self) -> dict[str, Any]:
        # transformers.pipeline applies a sigmoid per label (not a softmax) for this problem type.
        return {"problem_type": "multi_label_classification"}

    def load(self, path: str | Path, *, transfer: bool = False) -> Examples:
        d = self.data
        if transfer:
            return load_examples(path, text_field=d.text_field, text_pair_field=d.text_pair_field)
        return load_examples(path, text_field=d.text_field, text_pair_field=d.text_pair_field,
                             label_field=d.label_field, id_field=d.id_field, parse_labels=self._parse_labels)

    def _parse_labels(self, column: pa.ChunkedArray, ids: list[str], path: Path, field: str) -> np.ndarray:
        """The [N, C] 0/1 float32 matrix of a label column (see the module docstring for its forms)."""
        rows = _label_lists(column, ids, path, field, self.data.label_delimiter)
        names = self.data.label_names
        n = self.num_labels
        index = {name: i for i, name in enumerate(names or [])}
        out = np.zeros((len(rows), n), dtype=np.float32)
        texts = sorted({v for row in rows for v in row if isinstance(v, str) and v not in index
                        and not (names is None and v.lstrip("-").isdigit())})
        if texts and names is None:
            more = f" (the first 10 of {len(texts)} distinct labels; list them all)" if len(texts) > 10 else ""
            raise DataError(
                f"{field!r} in {path} holds text labels; to map them to label ids, set data.label_names: "
                f"{json.dumps(texts[:10], ensure_ascii=False)} (and data.num_labels: {len(texts)}) in params.yaml{more}"
            )
        for r, row in enumerate(rows):
            for v in row:
                if isinstance(v, str) and names is not None:
                    if v not in index:
                        raise DataError(
                            f"{where(ids, r)} in {path} has label {v!r}, not one of data.label_names {names}; "
                            "fix the label or add it to data.label_names (and data.num_labels)"
                        )
                    out[r, index[v]] = 1.0
                    continue
                label = int(v)
                if not 0 <= label < n:
                    raise DataError(
                        f"{where(ids, r)} in {path} has label {label}, outside the valid range [0, {n}); "
                        "fix the label or data.num_labels"
                    )
                out[r, label] = 1.0
        return out

    def encode(self, tokenizer: Any, examples: Examples, max_length: int) -> Encoded:
        return encode(tokenizer, examples, max_length)

    def cache_label(self) -> cf.FieldSpec | None:
        return cf.FieldSpec("label", "float32", (self.num_labels,))

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        labels = batch["labels"]
        if labels.shape != logits.shape:
            raise LossInputError(f"logits {tuple(logits.shape)} and multi-label targets {tuple(labels.shape)} "
                                 "must have the same shape [batch, labels]")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def kd_loss(self, student: Tensor, teacher: Tensor, batch: dict[str, Tensor], *, temperature: float | Tensor,
                kind: str, temperature_squared: bool, teacher_lengths: Tensor | None = None) -> Tensor:
        return multi_label_kd_loss(student, teacher, temperature, kind=kind, temperature_squared=temperature_squared)

    def predictions(self, logits: Tensor, batch: dict[str, Tensor]) -> np.ndarray:
        return (torch.sigmoid(logits) >= self.threshold).to(torch.int8).cpu().numpy()

    def score(self, data: Encoded, predictions: np.ndarray) -> dict[str, float]:
        return multi_label_scores(np.asarray(data.labels), predictions)


def _label_lists(column: pa.ChunkedArray, ids: list[str], path: Path, field: str,
                 delimiter: str | None) -> list[list[Any]]:
    """Per example, its labels as given (names as str, ids as int), from a list, string or int column."""
    t = column.type
    if column.null_count:
        row = column.is_null().to_pylist().index(True)
        raise DataError(f"{where(ids, row)} in {path} has no {field!r} value; write an empty list (or an empty "
                        "string with data.label_delimiter) for an example with no labels, or drop the row")
    values = column.to_pylist()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        item = t.value_type
        if not (pa.types.is_string(item) or pa.types.is_large_string(item) or pa.types.is_integer(item)
                or pa.types.is_null(item)):
            raise DataError(f"column {field!r} (label_field) in {path} has type {t}; a multi-label column holds "
                            "lists of label names or int ids")
        for r, row in enumerate(values):
            if any(v is None for v in row):
                raise DataError(f"{where(ids, r)} in {path} has an empty (null) label in {field!r}; remove it")
        return [[v.strip() if isinstance(v, str) else v for v in row] for row in values]
    if pa.types.is_integer(t):  # one id per example (a CSV whose rows all hold one label reads as ints)
        return [[v] for v in values]
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if delimiter is None:
            raise DataError(
                f"{field!r} in {path} holds strings, not lists of labels; set data.label_delimiter to the "
                f"character that separates an example's labels (e.g. \"|\" for {values[0]!r}) or give a list column"
            )
        return [[v.strip() for v in value.split(delimiter) if v.strip()] for value in values]
    raise DataError(f"column {field!r} (label_field) in {path} has type {t}; a multi-label column holds lists of "
                    "label names or ids, or strings of them joined by data.label_delimiter")


def multi_label_kd_loss(student: Tensor, teacher: Tensor, temperature: float | Tensor, *, kind: str = "kl",
                        temperature_squared: bool = True) -> Tensor:
    """Distillation loss on each label's probability p = sigmoid(z / T), logits [B, C].

    kind "kl": binary KL(Bernoulli(p_T) || Bernoulli(p_S)); "ce": binary cross-entropy of p_S against the soft
    target p_T; "mse": (p_S - p_T)^2. Each is the mean over labels and examples (the scale of the BCE hard
    loss, whatever C is), times T^2 with `temperature_squared`. "kl" is exactly 0 when the logits agree.
    """
    if student.shape != teacher.shape or student.dim() != 2:
        raise LossInputError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
                             "must have the same shape [batch, labels]; check both models have the same labels")
    s, t = student / temperature, teacher / temperature
    if kind == "mse":
        per_label = (torch.sigmoid(s) - torch.sigmoid(t)).pow(2)
    elif kind in ("kl", "ce"):
        p_t = torch.sigmoid(t)
        # log p and log(1 - p) as logsigmoid(z) and logsigmoid(-z): finite for any logit.
        per_label = -(p_t * F.logsigmoid(s) + (1 - p_t) * F.logsigmoid(-s))
        if kind == "kl":
            per_label = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    else:
        raise LossInputError(f"unknown kd loss kind {kind!r}; valid kinds: kl, ce, mse")
    loss = per_label.mean()
    if temperature_squared:
        loss = loss * (torch.as_tensor(temperature, dtype=loss.dtype) ** 2).mean()
    return loss


def multi_label_scores(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """micro-F1, macro-F1 and subset accuracy of 0/1 predictions [N, C] against 0/1 gold labels [N, C].

    micro-F1 pools every (example, label) cell: 2 TP / (2 TP + FP + FN). macro-F1 averages the per-label F1
    over the labels that have a gold or a predicted positive; a label with neither has no F1 and is left out.
    When nothing is positive in gold or predictions, both are 1.0 (every prediction is right). Subset accuracy:
    the share of examples whose whole predicted label set equals the gold one.
    """
    gold = np.asarray(labels) > 0.5
    pred = np.asarray(predictions).astype(bool)
    if gold.shape != pred.shape:
        raise ValueError(f"labels {gold.shape} and predictions {pred.shape} differ in shape")
    tp = (gold & pred).sum(0)
    fp = (~gold & pred).sum(0)
    fn = (gold & ~pred).sum(0)
    denom = 2 * tp + fp + fn
    micro = float(2 * tp.sum() / denom.sum()) if denom.sum() else 1.0
    present = denom > 0
    macro = float(np.mean(2 * tp[present] / denom[present])) if present.any() else 1.0
    subset = float((gold == pred).all(1).mean()) if len(gold) else float("nan")
    return {"micro_f1": micro, "macro_f1": macro, "subset_accuracy": subset}
