"""BERT-of-Theseus (Xu et al. 2020, arXiv 2002.02925): compress a teacher by progressive module replacing.

The teacher's L blocks are cut into `groups` consecutive groups of L / groups blocks; successor block i stands in
for group i. Phase 1 (`distill.epochs`): at every optimizer step each group is replaced by its successor with
probability p (Bernoulli, drawn once per group per step), and the hybrid is trained on the task's own loss. Only
the successor blocks learn: the teacher's blocks, embeddings, pooler and head are frozen, and the successor
model reuses the embeddings and head (as the paper's section 3.1 and its reference code, which gives the
optimizer the successor layers only). Phase 2 (`theseus.successor_epochs`): the successors alone (p = 1).
Successor i starts as a copy of teacher block i (the bottom `groups` blocks, as the reference code and the
paper's section 4.3 do). Dev evaluation, in both phases, runs the successor model, as the reference does.

The run is one `fit` (one optimizer and learning-rate schedule over both phases, as the reference's), so
checkpoints and --resume work as for any distillation; the replacement draws depend only on (seed, step), so a
resumed run draws the same ones. The saved student (and every snapshot) is the successor model: the teacher's
class with `groups` blocks, a normal `save_pretrained` folder. Callbacks receive the `TheseusModel`
(`model.student` is the successor model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from stages.train import EpochSampler, fit, save_model, write_model
from stages.config import Config, DistillConfig, TheseusConfig, config_to_dict
from stages.data import model_inputs
from stages.methods.common import start_method
from stages.methods.kd import DistillResult, write_metrics
from stages.models import ModelError, load_classifier, load_tokenizer, student_from_teacher
from stages.models.loading import _layer_list
from stages.tasks import LabelledTask, get_task, labelled
from stages.tasks import load_split
from stages.models import resolve_model

__all__ = ["TheseusModel", "TheseusObjective", "replace_probability", "replace_mask", "distill_theseus"]


class TheseusModel(nn.Module):
    """A frozen teacher and its successor model (`student`: the teacher's class with `groups` blocks).

    `model(replace=mask, **inputs)` runs the teacher with group i's blocks swapped for successor block i where
    `mask[i]` is true; `model(**inputs)` runs the successor model alone (what is saved, and what evaluation runs).
    Only the successor blocks are trainable.
    """

    def __init__(self, teacher: nn.Module, groups: int):
        super().__init__()
        prefix, blocks = _layer_list(teacher)
        n = len(blocks)
        if groups < 1 or n % groups:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ModelError(f"distill.theseus.groups {groups} does not divide the teacher's {n} layers; "
                             f"use one of {divisors}")
        types = getattr(teacher.config, "layer_types", None)
        if isinstance(types, list) and len(set(types)) > 1:
            raise ModelError(f"{type(teacher).__name__} mixes block types ({sorted(set(types))}), so a successor "
                             "block cannot stand in for any group; method theseus needs uniform blocks")
        self.groups = groups
        self.size = n // groups
        self._parent, _, self._attr = prefix.rpartition(".")
        self.teacher = teacher
        self.student = student_from_teacher(teacher, list(range(groups)))
        self.requires_grad_(False)
        self.successors.requires_grad_(True)

    @property
    def successors(self) -> nn.ModuleList:
        """The successor blocks (the student's block list)."""
        return _layer_list(self.student)[1]

    def forward(self, replace: Sequence[bool] | None = None, **inputs: Any) -> Any:
        if replace is None:
            return self.student(**inputs)
        if len(replace) != self.groups:
            raise ValueError(f"replace has {len(replace)} entries for {self.groups} groups")
        parent = self.teacher.get_submodule(self._parent)
        original = getattr(parent, self._attr)
        mixed: list[nn.Module] = []
        for i, swap in enumerate(replace):
            mixed += [self.successors[i]] if swap else list(original[i * self.size:(i + 1) * self.size])
        # The teacher's forward loops over its block list, so the hybrid is that list, swapped in for one call.
        setattr(parent, self._attr, nn.ModuleList(mixed))
        try:
            return self.teacher(**inputs)
        finally:
            setattr(parent, self._attr, original)


def replace_probability(cfg: TheseusConfig, step: int) -> float:
    """p at optimizer step `step` (0-based) of phase 1: constant, or min(1, k * step + b) (the paper's eq. 6)."""
    if cfg.curriculum == "linear":
        return min(1.0, cfg.curriculum_k * step + cfg.replace_prob)
    return cfg.replace_prob


def replace_mask(p: float, groups: int, seed: int, step: int) -> list[bool]:
    """Which groups are replaced at `step`: one Bernoulli(p) draw per group, from a generator seeded by
    (seed, step) alone, so a resumed run draws the same and the global RNG (dropout) is left untouched."""
    return (np.random.default_rng([seed % 2**32, step]).random(groups) < p).tolist()


class TheseusObjective:
    """The task's loss on the hybrid (phase 1, steps < `replace_steps`) or on the successors alone (phase 2)."""

    def __init__(self, cfg: TheseusConfig, task: LabelledTask, seed: int, replace_steps: int):
        self.cfg = cfg
        self.task = task
        self.seed = seed
        self.replace_steps = replace_steps
        self.modules = nn.ModuleList()  # nothing trainable besides the model's successor blocks

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        pass

    def losses(self, model: TheseusModel, batch: dict[str, torch.Tensor], ids: Sequence[str], step: int,
               total_steps: int) -> dict[str, torch.Tensor]:
        replace = None
        if step < self.replace_steps:
            replace = replace_mask(replace_probability(self.cfg, step), model.groups, self.seed, step)
        out = model(replace=replace, **model_inputs(batch))
        loss = self.task.hard_loss(self.task.logits(out, batch).float(), batch)
        if replace is not None and not any(replace):
            # A draw that keeps every teacher group leaves the successors out of the graph: their gradient is
            # zero (the optimizer still steps, as in the reference code, whose optimizer holds them throughout).
            loss = loss + sum(p.sum() for p in model.successors.parameters()) * 0.0
        return {"hard": loss}

    def close(self) -> None:
        pass


def _steps(d: DistillConfig, rows: int, epochs: float) -> int:
    """Optimizer steps in `epochs` epochs of `rows` rows (fit's count)."""
    per_epoch = math.ceil(EpochSampler(rows, d.batch_size).batches_per_epoch / d.grad_accum)
    return math.ceil(epochs * per_epoch)


def distill_theseus(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Compress the (one) teacher into `distill.theseus.groups` blocks and save the successor model."""
    d, t = cfg.distill, cfg.distill.theseus
    # The loss is on gold labels, so the unlabelled transfer set has nothing to teach (as for labels only).
    run, (train_ex, dev_ex) = start_method(
        cfg, lambda: (load_split(cfg, "train"), load_split(cfg, "dev") if cfg.data.dev else None))
    output, device, task = run.output, run.device, labelled(get_task(cfg.data))
    name = run.teachers[0]
    src = resolve_model(name)
    teacher = load_classifier(src, task.num_labels, auto_model=task.auto_model, label_names=task.label_names)
    tokenizer = load_tokenizer(src)
    model = TheseusModel(teacher, t.groups)
    train = task.encode(tokenizer, train_ex, d.max_length)
    dev = task.encode(tokenizer, dev_ex, d.max_length) if dev_ex is not None else None
    objective = TheseusObjective(t, task, d.seed, _steps(d, len(train), d.epochs))
    settings = {"method": "theseus", "teacher": name, "theseus": config_to_dict(t), **task.cache_settings()}
    # One run over both phases: distill.epochs of replacing, then successor_epochs of the successors alone.
    both = d.model_copy(update={"epochs": d.epochs + t.successor_epochs})
    saved = {"label_names": task.label_names, "head_config": task.head_config()}
    result = fit(model, objective, train, dev, both, output=output, log_dir=Path(d.log_dir), device=device,
                 desc="distill (theseus)", on_step=on_step, run_settings=settings,
                 evaluate=lambda m, data: task.evaluate(m, data, d.eval_batch_size, device),
                 write=lambda folder: write_model(model.student, tokenizer, objective.modules, folder, **saved))
    save_model(model.student, tokenizer, objective.modules, output, result=result, **saved)
    write_metrics(cfg, result)
    return DistillResult(output, d.teacher_signal, [], result)
