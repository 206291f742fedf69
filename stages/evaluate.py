"""`kd evaluate`: the task's metrics, parameter count and inference speed of saved models, side by side.

Also writes every model's per-example predictions (`evaluate.predictions`) for the paired statistics of `kd report`
(sequence classification; other kinds write the file with the ids only). A FastBERT folder (`kd distill` with
distill.method: fastbert) is also measured at every `evaluate.fastbert_speeds`, and then the speed/accuracy curve
of all the models goes to `evaluate.fastbert_curve` (CSV, for `dvc plots`) and a PNG next to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cache_format import atomic_write_text
from stages.config import Config
from stages.kinds import TASK_KINDS
from stages._io import check_outputs
from stages.train import pick_device
from stages.data import DataError, Examples, collate, model_inputs
from stages.methods import FastBertError, curve_rows, is_fastbert, load_fastbert, speed_curve, write_curve
from torch import nn
from stages.models.loading import _check_label_names
from stages.models.module_student import is_module_folder, load_module_student
from stages.tasks import Task, checked, get_task, labelled, load_split
from stages.models import ModelError,  load_model_config, load_tokenizer, num_parameters
from stages.report import save_predictions
from stages.models import resolve_model

__all__ = ["evaluate", "measure_throughput"]


@torch.inference_mode()
def measure_throughput(model: torch.nn.Module, data, batch_size: int, batches: int, device: torch.device) -> float:
    """Inference examples/s on the first `batches` batches of `data` (after one warm-up batch)."""
    model.eval()
    rows = np.arange(min(len(data), batch_size * (batches + 1)))
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    inputs = []
    for c in chunks:
        b, _ = collate(data, c)
        inputs.append({k: v.to(device) for k, v in model_inputs(b).items()})
    model(**inputs[0])  # warm-up: first-call allocation and kernel selection are not throughput
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for b in inputs[1:] or inputs:
        model(**b)
        n += len(b["input_ids"])
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels are asynchronous: wait before reading the clock
    return n / (time.perf_counter() - t0)


def evaluate(cfg: Config) -> dict[str, dict]:
    """Metrics for every model in `evaluate.models` on `evaluate.split`; written to `evaluate.output`.

    The predicted label of every model for every example goes to `evaluate.predictions` (see
    `stages.report.save_predictions`), written just before the metrics file. With `tasks:`, every model
    path is a folder of per-task models (`<path>/<task name>`, as train-teacher and distill write them) and
    the metrics are grouped by task: {task: {model: metrics}}; the predictions file then lists none (`kd report`
    compares single-task runs).
    """
    cfg = checked(cfg, data=False)  # string labels named from data.train, as the models were trained
    e = cfg.evaluate
    outputs = {"evaluate.output": (e.output, "file"), "evaluate.predictions": (e.predictions, "file")}
    fastbert = not cfg.tasks and any(is_fastbert(resolve_model(p)) for p in e.models.values())
    if fastbert:
        outputs["evaluate.fastbert_curve"] = (e.fastbert_curve, "file")
    check_outputs(outputs)
    device = pick_device()
    if cfg.tasks:
        results: dict[str, dict] = {}
        for name in cfg.task_names():
            view = cfg.for_task(name)
            models = {m: f"{path}/{name}" for m, path in e.models.items()}
            results[name], _, _ = _score_models(view.model_copy(update={"evaluate": e.model_copy(
                update={"models": models})}), device)
        save_predictions(e.predictions, split=e.split, data="tasks", ids=[], labels=[], models={})
    else:
        results, predictions, examples = _score_models(cfg, device)
        save_predictions(e.predictions, split=e.split, data=str(getattr(cfg.data, e.split)),
                         ids=examples.ids if predictions else [], labels=examples.labels if predictions else [],
                         models=predictions)
        if fastbert:
            layers = {m: load_model_config(resolve_model(p)).num_hidden_layers for m, p in e.models.items()}
            write_curve(e.fastbert_curve, curve_rows(results, layers))
    atomic_write_text(Path(e.output), json.dumps(results, indent=2) + "\n")
    return results


def _score_models(cfg: Config, device: torch.device) -> tuple[dict[str, dict], dict[str, np.ndarray], Examples]:
    """Each model's metrics on the split, and its class predictions (kinds with one class per example)."""
    e = cfg.evaluate
    task = get_task(cfg.data)
    examples = load_split(cfg, e.split)
    if examples.labels is None and task.needs_labels:
        raise DataError(f"data.{e.split} has no labels (data.label_field is unset); evaluation needs them")
    results: dict[str, dict] = {}
    predictions: dict[str, np.ndarray] = {}
    # The teacher is scored first: kinds that compare models with it (top-1 agreement) get what it predicted.
    reference = None
    for name, path in sorted(e.models.items(), key=lambda item: item[0] != "teacher"):
        src = resolve_model(path)
        tokenizer = load_tokenizer(src)
        fastbert = is_fastbert(src)
        if fastbert and not TASK_KINDS[cfg.data.task].sequence_kd:
            raise FastBertError(f"evaluate.models.{name} is a FastBERT model, which exits on one class distribution "
                                f"per example; data.task {cfg.data.task} has none, evaluate it with "
                                "sequence_classification")
        if fastbert:  # the full model here (no early exit); per speed below
            head = labelled(task)
            model = load_fastbert(src, head.num_labels, label_names=head.label_names).to(device)
        else:
            model = load_trained(src, task).to(device)  # a module student, or the task's load_model
        data = task.encode(tokenizer, examples, e.max_length)
        if task.class_per_example:  # what `kd report`'s paired statistics compare
            predictions[name] = task.predict(model, data, e.batch_size, device)
            metrics = task.score(data, predictions[name])
        elif name == "teacher":
            metrics, reference = task.evaluate_teacher(model, data, e.batch_size, device)
        else:
            metrics = task.evaluate(model, data, e.batch_size, device, reference=reference)
        results[name] = {
            "model": str(path),
            **{k: round(v, 4) for k, v in metrics.items()},
            "parameters": num_parameters(model),
            "examples_per_second": round(measure_throughput(model, data, e.batch_size, e.throughput_batches, device), 1),
            "device": str(device),
            "split": e.split,
            "examples": len(examples),
        }
        if fastbert:
            results[name]["fastbert"] = speed_curve(
                model, data, task, e.fastbert_speeds, e.batch_size, device=device,
                throughput=lambda m: measure_throughput(m, data, e.batch_size, e.throughput_batches, device))
    return {name: results[name] for name in e.models}, predictions, examples


def load_trained(name_or_path: str, task: Task) -> nn.Module:
    """A trained model for `task`: a module student's folder, or what the task kind loads (`Task.load_model`:
    a `save_pretrained` model with the task's head).

    Either must have been trained for the task's label count (and label names, when both name them)."""
    if not is_module_folder(name_or_path):
        return task.load_model(name_or_path)
    model = load_module_student(name_or_path)
    n, head = model.config.num_labels, labelled(task)  # a module student has a label head
    if n is not None and n != head.num_labels:
        raise ModelError(f"{name_or_path} was trained for {n} labels but data.num_labels is {head.num_labels}; "
                         "evaluate it on data of its own labels, or train one for these")
    if model.config.id2label:
        _check_label_names(model.config, name_or_path, head.label_names)
    return model
