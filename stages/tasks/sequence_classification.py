"""Single-label sequence (or sentence-pair) classification: one class per example, softmax over classes.

Data: a text column (and optionally a text-pair column) and a label column of class ids or of names listed
in data.label_names. Cache: teacher logits [C] per example (and the gold label). Losses: cross-entropy on
gold labels, `kd_loss` (KL/CE/MSE at a temperature) on the teacher's logits. Metrics: accuracy, macro-F1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

import cache_format as cf
from stages.data import Encoded, Examples, encode, load_examples
from stages.losses import hard_ce_loss, kd_loss
from stages.tasks.base import LabelledTask

__all__ = ["SequenceClassification", "accuracy_and_macro_f1"]


class SequenceClassification(LabelledTask):
    name = "sequence_classification"
    class_per_example = True

    def load(self, path: str | Path, *, transfer: bool = False) -> Examples:
        d = self.data
        if transfer:
            return load_examples(path, text_field=d.text_field, text_pair_field=d.text_pair_field)
        return load_examples(path, text_field=d.text_field, text_pair_field=d.text_pair_field,
                             label_field=d.label_field, id_field=d.id_field, num_labels=d.num_labels,
                             label_names=d.label_names)

    def encode(self, tokenizer: Any, examples: Examples, max_length: int) -> Encoded:
        return encode(tokenizer, examples, max_length)

    def cache_label(self) -> cf.FieldSpec | None:
        return cf.FieldSpec("label", "int64", ())

    def cache_settings(self) -> dict[str, Any]:
        return {}  # the original kind: caches made before task kinds existed keep their folder names

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return hard_ce_loss(logits, batch["labels"])

    def kd_loss(self, student: Tensor, teacher: Tensor, batch: dict[str, Tensor], *, temperature: float | Tensor,
                kind: str, temperature_squared: bool, teacher_lengths: Tensor | None = None) -> Tensor:
        return kd_loss(student, teacher, temperature, kind=kind, temperature_squared=temperature_squared)

    def predictions(self, logits: Tensor, batch: dict[str, Tensor]) -> np.ndarray:
        return logits.argmax(-1).cpu().numpy()

    def score(self, data: Encoded, predictions: np.ndarray) -> dict[str, float]:
        accuracy, macro_f1 = accuracy_and_macro_f1(np.asarray(data.labels), predictions)
        return {"accuracy": accuracy, "macro_f1": macro_f1}


def accuracy_and_macro_f1(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro-F1 (over the classes that occur in labels or predictions) of class ids."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    acc = float((predictions == labels).mean()) if len(labels) else float("nan")
    f1s = []
    for c in np.unique(np.concatenate([labels, predictions])):
        tp = np.sum((predictions == c) & (labels == c))
        denom = np.sum(predictions == c) + np.sum(labels == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return acc, float(np.mean(f1s)) if f1s else float("nan")
