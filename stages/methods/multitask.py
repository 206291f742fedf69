"""Multi-task distillation (`tasks:` in the params): one student, a shared encoder and one head per task.

TextBrewer's MultiTaskDistiller, built from the single-task pieces: each task is run through the single-task
code with its own view of the settings (`Config.for_task`: its data, teachers, cache, kd and matches), so
every task kind, cached or online teachers, several teachers and matches work per task as they do alone.
What is added here: the student (the first task's student; every other task gets a new head of its kind on that
encoder),
the objective that routes a batch to its task's losses (times the task's weight), and the saving of one
complete model per head (`<distill.output>/<task name>`, loadable with `from_pretrained`). Batches are drawn
by `stages._train.TaskSampler` (a task per batch, probability |D_task|^distill.task_tau), whose state is part
of every checkpoint, so --resume continues the exact stream.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from cache_format import KDError
from stages.train import FitResult, TaskMix, TaskSampler, fit, replace_folder, write_model, write_run_record
from stages.config import Config
from stages.models import student_from_config
from stages.methods.common import start_method
from stages.methods.kd import DistillObjective, DistillResult, distill_settings, build_student, distill_objective, load_distill_data, write_metrics
from stages.tasks import get_task, labelled

__all__ = ["MultiTaskStudent", "MultiTaskObjective", "distill_tasks", "share_encoder"]


class MultiTaskStudent(nn.Module):
    """One Hugging Face model per task, all on the same encoder (`heads[name]` is task `name`'s full model)."""

    def __init__(self, heads: dict[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict(heads)


def share_encoder(model: nn.Module, encoder_of: nn.Module) -> None:
    """Put `encoder_of`'s base model (embeddings + blocks) into `model`, replacing its own."""
    if type(model.base_model) is not type(encoder_of.base_model):
        raise KDError(f"the tasks' students have different encoders ({type(model.base_model).__name__} and "
                         f"{type(encoder_of.base_model).__name__}); build every task's student the same way")
    setattr(model, model.base_model_prefix, encoder_of.base_model)


def _split_ids(ids: Sequence[str]) -> tuple[str, list[str]]:
    """`<task>/<id>` ids of one batch -> (task, ids)."""
    name = ids[0].split("/", 1)[0]
    return name, [i.split("/", 1)[1] for i in ids]


class MultiTaskObjective:
    """Routes each batch to its task's `DistillObjective`; the task's terms are named `<task>/<term>`."""

    def __init__(self, objectives: dict[str, DistillObjective], weights: dict[str, float]):
        self.objectives = objectives
        self.weights = weights
        self.modules = nn.ModuleDict({name: o.modules for name, o in objectives.items()})

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        per_task: dict[str, list[list[str]]] = {name: [] for name in self.objectives}
        for ids in id_batches:
            name, local = _split_ids(ids)
            per_task[name].append(local)
        for name, objective in self.objectives.items():
            objective.start_epoch(per_task[name])

    def losses(self, model: MultiTaskStudent, batch: dict[str, torch.Tensor], ids: Sequence[str], step: int,
               total_steps: int) -> dict[str, torch.Tensor]:
        name, local = _split_ids(ids)
        terms = self.objectives[name].losses(model.heads[name], batch, local, step, total_steps)
        return {f"{name}/{k}": self.weights[name] * v for k, v in terms.items()}

    def close(self) -> None:
        for objective in self.objectives.values():
            objective.close()


def distill_tasks(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Distill one student for every task in `cfg.tasks`; each head is saved to `<distill.output>/<name>`."""
    d = cfg.distill
    views = {name: cfg.for_task(name) for name in cfg.task_names()}
    # Every task's data and caches first: their errors must not cost a model load.
    run, loaded = start_method(cfg, lambda: {name: load_distill_data(view) for name, view in views.items()})
    output, device = run.output, run.device
    tasks = {name: labelled(get_task(view.data)) for name, view in views.items()}
    # The first task's student (as distill.student describes it) brings the encoder; every other task gets a new
    # head of its kind in the same architecture on that encoder (from_teacher / pretrained name one model, whose
    # head fits one task only).
    first_name = cfg.tasks[0].name
    first, tokenizer = build_student(views[first_name])
    heads = {first_name: first}
    for name, task in list(tasks.items())[1:]:
        config = copy.deepcopy(first.config)
        config.problem_type = None
        heads[name] = student_from_config(config, task.num_labels, auto_model=task.auto_model)
        share_encoder(heads[name], first)
    student = MultiTaskStudent(heads)
    objectives, train, dev = {}, {}, {}
    for name, view in views.items():
        train_ex, dev_ex, readers = loaded[name]
        train[name] = tasks[name].encode(tokenizer, train_ex, d.max_length)
        if dev_ex is not None:
            dev[name] = tasks[name].encode(tokenizer, dev_ex, d.max_length)
        objectives[name] = distill_objective(view, heads[name], train_ex, train[name], readers, device)
    objective = MultiTaskObjective(objectives, {t.name: t.weight for t in cfg.tasks})

    def evaluate(model: MultiTaskStudent, data: dict) -> dict[str, float]:
        return {f"{name}/{k}": v for name, enc in data.items()
                for k, v in tasks[name].evaluate(model.heads[name], enc, d.eval_batch_size, device).items()}

    settings = {"tasks": {name: distill_settings(view, loaded[name][2]) for name, view in views.items()},
                "task_weights": objective.weights, "task_tau": d.task_tau}
    write = functools.partial(_write_heads, student, tokenizer, objective, tasks)
    mix = TaskMix(list(train), list(train.values()))
    sampler = TaskSampler(mix, d.batch_size, seed=d.seed, tau=d.task_tau, group_by_length=d.group_by_length)
    result = fit(student, objective, mix, dev or None, d, output=output, log_dir=Path(d.log_dir), device=device,
                 desc=f"distill {len(tasks)} tasks ({d.teacher_signal})", on_step=on_step, run_settings=settings,
                 evaluate=evaluate, sampler=sampler, write=write)
    replace_folder(output, functools.partial(write, result=result))  # swapped in as one folder
    write_metrics(cfg, result)
    caches = [str(r.path) for _, _, readers in loaded.values() for r in readers]
    return DistillResult(output, d.teacher_signal, caches, result)


def _write_heads(student: MultiTaskStudent, tokenizer, objective: MultiTaskObjective, tasks: dict, folder: Path,
                 result: FitResult | None = None) -> None:
    """Every head as a complete model in `<folder>/<name>` (a snapshot, or with `result` the finished run)."""
    for name, model in student.heads.items():
        write_model(model, tokenizer, objective.modules[name], folder / name, result=result,
                    label_names=tasks[name].label_names, head_config=tasks[name].head_config())
    if result is not None:
        write_run_record(folder, result)  # marks the whole run finished (--resume has nothing to do)
