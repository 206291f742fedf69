"""What every task kind defines: the one interface the stages call (see stages/tasks/__init__.py).

`Task` is what every kind has (data, teacher signal, metrics); `LabelledTask` adds a label head (its logits,
losses and predictions) for the kinds that have one, and `labelled(task)` is how a stage that needs a head asks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModelForSequenceClassification, PretrainedConfig

import cache_format as cf
from cache_format import KDError
from stages.config import DataConfig
from stages.data import Encoded, Examples, collate, model_inputs
from stages.config import PrecomputeConfig
from stages.models import ModelError, check_head, load_classifier

__all__ = ["Task", "LabelledTask", "labelled", "TeacherSpec", "TORCH_DTYPES"]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Task(ABC):
    """One task kind: what every kind has. Subclasses set `name` and define the methods marked "kind-specific".

    The stages call only these methods, never `if kind == ...`: reading and validating the data (`load`),
    tokenizing it (`encode`), the teacher and the signal that is cached and compared (`check_teacher`,
    `check_rows`, `load_teacher`, `teacher_forward`, `teacher_signal`, `teacher_fields`, `signal_settings`,
    `lengths`, `cache_label`, `cache_settings`) and the metrics (`load_model`, `evaluate`, `evaluate_teacher`).
    Kinds with a label head (a classifier, regressor, tagger or span head: everything but causal_lm) are
    `LabelledTask`s, which add the head, its logits, its losses and its predictions; a stage that needs those
    asks for one with `labelled(task)`.
    """

    name: ClassVar[str]
    class_per_example: ClassVar[bool] = False  # predictions are one class id per example (`kd report` pairs them)
    needs_labels: ClassVar[bool] = True  # evaluation compares predictions with gold labels in the data
    # Why a kind without a label head cannot serve a stage that needs one (`labelled`); None: the generic reason.
    no_head: ClassVar[str | None] = None

    def __init__(self, data: DataConfig):
        self.data = data

    # -- data (kind-specific) ---------------------------------------------------------------------------------

    @abstractmethod
    def load(self, path: str | Path, *, transfer: bool = False) -> Examples:
        """Read and validate the examples of a data file.

        `transfer=True`: an unlabelled transfer set (data.transfer): no labels, content-hash ids."""

    @abstractmethod
    def encode(self, tokenizer: Any, examples: Examples, max_length: int) -> Encoded:
        """Tokenize examples once into rows (one per example, or per window) with the labels the losses read."""

    # -- the teacher (kind-specific, but for the defaults) ----------------------------------------------------

    @abstractmethod
    def check_teacher(self, config: PretrainedConfig, teacher: str, spec: "TeacherSpec") -> None:
        """Raise if `teacher` (its config only: no weights are read) cannot give this task's signal."""

    def check_rows(self, config: PretrainedConfig, teacher: str, spec: "TeacherSpec", rows: Encoded) -> None:
        """Raise if caching the teacher's signal on `rows` is refused (e.g. too large); default: nothing."""

    @abstractmethod
    def load_teacher(self, path_or_name: str, *, eager_attention: bool = False) -> nn.Module:
        """The teacher model (checked as `check_teacher` says), ready for `teacher_forward`."""

    def teacher_forward(self, model: nn.Module, batch: dict[str, Tensor], *, hidden: bool, attentions: bool) -> Any:
        """Run the teacher on a padded batch; the output has `hidden_states`/`attentions` when asked."""
        return model(**model_inputs(batch), output_hidden_states=hidden, output_attentions=attentions)

    @abstractmethod
    def teacher_signal(self, model: nn.Module, out: Any, batch: dict[str, Tensor], ids: Sequence[str],
                       spec: "TeacherSpec") -> dict[str, Tensor]:
        """The cached (and online) teacher signal of a batch: name -> [B, ...] or padded [B, T, ...] tensor, one
        per `teacher_fields` entry."""

    @abstractmethod
    def teacher_fields(self, spec: "TeacherSpec", config: PretrainedConfig) -> list[cf.FieldSpec]:
        """The cache fields `teacher_signal` fills ("T" for the ragged axis), for a teacher with `config`."""

    def signal_settings(self, spec: "TeacherSpec") -> dict[str, Any]:
        """Settings of the signal beyond the spec's own (hashed into the cache's folder name); default: none."""
        return {}

    def lengths(self, batch: dict[str, Tensor]) -> Tensor:
        """Per row, how many positions the ragged cache axis "T" holds (tokens by default)."""
        return batch["attention_mask"].sum(1)

    def cache_label(self) -> cf.FieldSpec | None:
        """A gold-label field stored in the cache next to the teacher outputs, or None."""
        return None

    def cache_settings(self) -> dict[str, Any]:
        """Task settings that change what the teacher outputs (hashed into the cache's folder name)."""
        return {"task": self.name}

    # -- metrics (kind-specific) ------------------------------------------------------------------------------

    @abstractmethod
    def load_model(self, path_or_name: str) -> nn.Module:
        """A saved model of this kind (a teacher or student) for evaluation."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: Encoded, batch_size: int, device: torch.device,
                 reference: Any = None) -> dict[str, float]:
        """The metrics of a model on an encoded split (labelled, for kinds that `needs_labels`). `reference` (the
        teacher, when `kd evaluate` has one) is what `evaluate_teacher` returned, for kinds that compare against
        it."""

    def evaluate_teacher(self, model: nn.Module, data: Encoded, batch_size: int, device: torch.device
                         ) -> tuple[dict[str, float], Any]:
        """The teacher's own metrics and the `reference` that `evaluate` compares the other models against,
        computed once per evaluation (default: its metrics and no reference)."""
        return self.evaluate(model, data, batch_size, device), None


class LabelledTask(Task):
    """A kind with a label head on the encoder (`auto_model`): its logits are what is cached, distilled and
    predicted. Subclasses define the data methods and the ones marked "kind-specific" below; the teacher, cache
    and metric methods of `Task` are defined here from the head.

    The head (`auto_model`, `num_labels`, `label_names`, `head_config`), its logits (`logits`, `logits_shape`),
    the losses (`hard_loss`, `kd_loss`) and the predictions (`predict`, `predictions`, `gather`, `score`).
    """

    auto_model: ClassVar[type] = AutoModelForSequenceClassification

    # -- the head ---------------------------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        """Outputs of the head per position (config.num_labels)."""
        return self.data.num_labels

    @property
    def label_names(self) -> list[str] | None:
        """Class names in id order (saved as id2label/label2id), or None."""
        return self.data.label_names

    def head_config(self) -> dict[str, Any]:
        """Extra model-config keys saved with every model of this kind (e.g. problem_type)."""
        return {}

    # -- the teacher: a model with this head ------------------------------------------------------------------

    def check_teacher(self, config: PretrainedConfig, teacher: str, spec: "TeacherSpec") -> None:
        check_head(config, teacher, self.num_labels, auto_model=self.auto_model, label_names=self.label_names)

    def load_teacher(self, path_or_name: str, *, eager_attention: bool = False) -> nn.Module:
        return load_classifier(path_or_name, self.num_labels, eager_attention=eager_attention,
                               auto_model=self.auto_model, label_names=self.label_names)

    def teacher_signal(self, model: nn.Module, out: Any, batch: dict[str, Tensor], ids: Sequence[str],
                       spec: "TeacherSpec") -> dict[str, Tensor]:
        """`logits` in the spec's dtype."""
        return {"logits": self.logits(out, batch).float().to(TORCH_DTYPES[spec.dtype])}

    def teacher_fields(self, spec: "TeacherSpec", config: PretrainedConfig) -> list[cf.FieldSpec]:
        return [cf.FieldSpec("logits", spec.dtype, self.logits_shape())]

    # -- the head's logits ------------------------------------------------------------------------------------

    def logits(self, out: Any, batch: dict[str, Tensor]) -> Tensor:
        """The model output that is cached and distilled: [B, C], or [B, T, C] over `lengths` positions."""
        return out.logits

    def logits_shape(self) -> tuple[int | str, ...]:
        """Shape of one row's cached logits ("T" for the ragged axis)."""
        return (self.num_labels,)

    # -- losses (kind-specific) -------------------------------------------------------------------------------

    @abstractmethod
    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Supervised loss on the gold labels of the batch (0 when none is labelled)."""

    @abstractmethod
    def kd_loss(self, student: Tensor, teacher: Tensor, batch: dict[str, Tensor], *, temperature: float | Tensor,
                kind: str, temperature_squared: bool, teacher_lengths: Tensor | None = None) -> Tensor:
        """Soft-target loss between student and teacher `logits` of the same batch."""

    # -- metrics ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, model: nn.Module, data: Encoded, batch_size: int, device: torch.device) -> Any:
        """Predictions for every row of `data` (in row order), from `predictions` of each batch's logits."""
        was_training = model.training
        model.eval()
        order = np.argsort(data.lengths, kind="stable")  # similar lengths together: less padding
        parts: list[tuple[np.ndarray, Any]] = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch, _ = collate(data, rows)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**model_inputs(batch))
            parts.append((rows, self.predictions(self.logits(out, batch).float(), batch)))
        model.train(was_training)
        return self.gather(parts, len(data))

    @abstractmethod
    def predictions(self, logits: Tensor, batch: dict[str, Tensor]) -> Any:
        """One batch's predictions (kind-specific)."""

    def gather(self, parts: list[tuple[np.ndarray, Any]], n: int) -> Any:
        """Put per-batch predictions back in row order; default: arrays indexed by row."""
        first = np.asarray(parts[0][1]) if parts else np.zeros(0)
        out = np.empty((n,) + first.shape[1:], dtype=first.dtype)
        for rows, values in parts:
            out[rows] = values
        return out

    @abstractmethod
    def score(self, data: Encoded, predictions: Any) -> dict[str, float]:
        """Metrics of `predictions` against the labels in `data` (kind-specific)."""

    def load_model(self, path_or_name: str) -> nn.Module:
        return load_classifier(path_or_name, self.num_labels, auto_model=self.auto_model, label_names=self.label_names)

    def evaluate(self, model: nn.Module, data: Encoded, batch_size: int, device: torch.device,
                 reference: Any = None) -> dict[str, float]:
        """`score(predict(...))`; `reference` is not used (no labelled kind compares against the teacher)."""
        return self.score(data, self.predict(model, data, batch_size, device))


def labelled(task: Task) -> LabelledTask:
    """`task` as a kind with a label head, for a stage or method that needs one (a new head, class logits, a
    label loss); a kind without one is a one-line error saying why (`Task.no_head`)."""
    if isinstance(task, LabelledTask):
        return task
    raise KDError(task.no_head or f"data.task {task.name} has no label head; this needs a kind that has one")


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher outputs to keep, and how."""

    logits: bool = True
    hidden_layers: tuple[int, ...] = ()
    hidden_tokens: str = "all"  # "all" or "first"
    attention_layers: tuple[int, ...] = ()
    dtype: str = "float32"
    store_input_ids: bool = False
    lm: Any = None  # precompute.lm (LMCacheConfig): what a causal_lm teacher's signal holds
    # causal_lm, online only: the signal is the teacher's full next-token logits [T, V] instead of precompute.lm's
    # codec fields (the online losses need every whole distribution; no cache holds them)
    full_logits: bool = False

    @classmethod
    def from_config(cls, p: PrecomputeConfig) -> "TeacherSpec":
        return cls(p.logits, tuple(sorted(set(p.hidden_layers))), p.hidden_tokens,
                   tuple(sorted(set(p.attention_layers))), p.dtype, p.store_input_ids, p.lm)

    def check_layers(self, n: int, teacher: str) -> None:
        """Raise if a cached layer index does not exist in a teacher with `n` layers."""
        for i in self.hidden_layers:
            if not 0 <= i <= n:
                raise ModelError(
                    f"hidden layer {i} does not exist in teacher {teacher}: it has {n} layers, so hidden "
                    f"layers are 0 (embeddings) to {n}; fix precompute.hidden_layers"
                )
        for i in self.attention_layers:
            if not 0 <= i < n:
                raise ModelError(
                    f"attention layer {i} does not exist in teacher {teacher}: it has {n} layers, so attention "
                    f"layers are 0 to {n - 1}; fix precompute.attention_layers"
                )
