"""`kd train-teacher`: supervised fine-tuning of the teacher (TextBrewer's BasicTrainer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from cache_format import atomic_write_text
from stages.config import Config
from stages._io import check_outputs
from stages._train import FitResult, fit, pick_device, save_model, set_seed
from stages.data import encode
from stages.losses import hard_ce_loss
from stages.models import load_classifier, load_tokenizer
from stages.teacher import load_split, resolve_model

__all__ = ["TrainTeacherResult", "train_teacher"]


@dataclass(frozen=True)
class TrainTeacherResult:
    output: Path
    fit: FitResult


class _LabelObjective:
    """Cross-entropy on the gold labels: the whole objective of fine-tuning."""

    modules = nn.ModuleDict()

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        pass

    def losses(self, model: nn.Module, batch: dict[str, torch.Tensor], ids: Sequence[str], step: int,
               total_steps: int) -> dict[str, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return {"hard": hard_ce_loss(model(**inputs).logits.float(), batch["labels"])}

    def close(self) -> None:
        pass


def train_teacher(cfg: Config) -> TrainTeacherResult:
    """Fine-tune `train_teacher.model` on `data.train`; save model + tokenizer to `train_teacher.output`."""
    t = cfg.train_teacher
    output = Path(t.output)
    check_outputs({"train_teacher.output": (output, "model"), "train_teacher.metrics": (t.metrics, "file")})
    # The data first: a data error must not cost a model load.
    train_ex = load_split(cfg, "train")
    dev_ex = load_split(cfg, "dev") if cfg.data.dev else None
    src = resolve_model(t.model)
    tokenizer = load_tokenizer(src)
    train = encode(tokenizer, train_ex, t.max_length)
    dev = encode(tokenizer, dev_ex, t.max_length) if dev_ex is not None else None
    set_seed(t.seed)  # a new classification head is initialised from it
    # The one stage that may make a new head: a base model, or a head for another label count, is fine-tuned here.
    model = load_classifier(src, cfg.data.num_labels, head="new")
    result = fit(model, _LabelObjective(), train, dev, t, output=output, log_dir=None, device=pick_device(),
                 desc="train-teacher", run_settings={"model": t.model})
    save_model(model, tokenizer, nn.ModuleDict(), output, result=result, label_names=cfg.data.label_names)
    metrics = {"dev_accuracy": result.dev_accuracy, "dev_macro_f1": result.dev_macro_f1, "steps": result.steps,
               "seconds": round(result.seconds, 2)}
    atomic_write_text(Path(t.metrics), json.dumps(metrics, indent=2) + "\n")
    return TrainTeacherResult(output, result)
