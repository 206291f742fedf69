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
from stages.train import FitResult, fit, pick_device, save_model, set_seed, write_model
from stages.data import model_inputs
from stages.models import load_classifier, load_tokenizer
from stages.tasks import LabelledTask, checked, get_task, labelled, load_split
from stages.models import resolve_model

__all__ = ["TrainTeacherResult", "train_teacher"]


@dataclass(frozen=True)
class TrainTeacherResult:
    output: Path
    fit: FitResult


class _LabelObjective:
    """The task's supervised loss on the gold labels: the whole objective of fine-tuning."""

    modules = nn.ModuleDict()

    def __init__(self, task: LabelledTask):
        self.task = task

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        pass

    def losses(self, model: nn.Module, batch: dict[str, torch.Tensor], ids: Sequence[str], step: int,
               total_steps: int) -> dict[str, torch.Tensor]:
        return {"hard": self.task.hard_loss(self.task.logits(model(**model_inputs(batch)), batch).float(), batch)}

    def close(self) -> None:
        pass


def train_teacher(cfg: Config) -> list[TrainTeacherResult]:
    """Fine-tune `train_teacher.model` on `data.train`; save model + tokenizer to `train_teacher.output`.

    With `tasks:`, one teacher per task, each on its task's data, into `<train_teacher.output>/<task name>`.
    """
    if cfg.tasks:
        return [r for name in cfg.task_names() for r in train_teacher(cfg.for_task(name))]
    # Every data file first (no transfer set: it may be augment's views, not written yet); string labels named.
    cfg = checked(cfg, transfer=False)
    t = cfg.train_teacher
    output = Path(t.output)
    check_outputs({"train_teacher.output": (output, "model"), "train_teacher.metrics": (t.metrics, "file")})
    # The data first: a data error must not cost a model load.
    task = labelled(get_task(cfg.data))  # a kind without a label head (causal_lm) has no head to fine-tune
    train_ex = load_split(cfg, "train")
    dev_ex = load_split(cfg, "dev") if cfg.data.dev else None
    src = resolve_model(t.model)
    tokenizer = load_tokenizer(src)
    train = task.encode(tokenizer, train_ex, t.max_length)
    dev = task.encode(tokenizer, dev_ex, t.max_length) if dev_ex is not None else None
    set_seed(t.seed)  # a new task head is initialised from it
    # The one stage that may make a new head: a base model, or a head for another label count, is fine-tuned here.
    model = load_classifier(src, task.num_labels, head="new", auto_model=task.auto_model)
    device = pick_device()
    saved = {"label_names": task.label_names, "head_config": task.head_config()}
    result = fit(model, _LabelObjective(task), train, dev, t, output=output, log_dir=None, device=device,
                 desc="train-teacher", run_settings={"model": t.model, **task.cache_settings()},
                 evaluate=lambda m, data: task.evaluate(m, data, t.eval_batch_size, device),
                 write=lambda folder: write_model(model, tokenizer, nn.ModuleDict(), folder, **saved))
    save_model(model, tokenizer, nn.ModuleDict(), output, result=result, **saved)
    metrics = {**{f"dev_{k}": v for k, v in (result.dev or {}).items()}, "steps": result.steps,
               **({"best_step": result.best_step} if result.best_step is not None else {}),
               "seconds": round(result.seconds, 2)}
    atomic_write_text(Path(t.metrics), json.dumps(metrics, indent=2) + "\n")
    return [TrainTeacherResult(output, result)]
