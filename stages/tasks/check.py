"""What every stage does first: read every data file the params name, as the stages will, before any model is
loaded (`check_data`), and name string labels from data.train when the params list none (`checked` returns the
settings a stage runs on). `kd prepare` runs `check_data` last, on the files it wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from stages.config import Config
from stages.data import DataError, resolve_labels, unseen_labels, with_transfer
from stages.tasks.registry import get_task

__all__ = ["check_data", "checked"]


def checked(cfg: Config, *, data: bool = True, transfer: bool = True) -> Config:
    """The settings a stage runs on: with `data`, every data file checked first (`check_data`; data.transfer too
    with `transfer`), and string labels without `data.label_names` named from data.train (sorted)."""
    resolved = resolve_labels(cfg)  # reads data.train's labels once, for the check and the stage
    if data:
        _check(cfg, resolved, transfer)
    return resolved


def check_data(cfg: Config, *, transfer: bool = True) -> dict:
    """Read every data file the params name, as the stages will, before any model is loaded; raise at the first
    problem (a one-line DataError naming the file).

    data.train, dev and test go through the task kind's own reader (columns, labels, ids, empty texts), and so
    does data.transfer (with `transfer`), whose ids and text columns must also fit data.train's; a default path
    (e.g. data/test.csv) that the params do not name is checked only when the file exists. String labels without
    `data.label_names` take their names from data.train (`stages.data.with_label_names`); a dev or test label that
    data.train does not have is an error naming every such label. No tokenizer runs. With `tasks:`, each task's
    data. Returns what was found: per file its path and example count, and the label names and where they came
    from (for the record `kd prepare` writes).
    """
    return _check(cfg, resolve_labels(cfg), transfer)


def _check(cfg: Config, resolved: Config, transfer: bool) -> dict:
    """`check_data` of `cfg`, whose string labels `resolved` (`resolve_labels(cfg)`) has named."""
    if cfg.tasks:
        return {"tasks": {name: _check(cfg.for_task(name), resolved.for_task(name), transfer)
                          for name in cfg.task_names()}}
    data = resolved.data
    names, given = data.label_names, cfg.data.label_names
    task = get_task(data)
    found: dict = {"task": data.task, "label_names": names,
                   "label_names_from": None if names is None else "data.label_names" if given else "data.train",
                   "files": {}}
    train = None
    for split in ("train", "dev", "test"):
        path = getattr(data, split)
        if path is None or (split not in cfg.data.model_fields_set and not Path(path).exists()):
            continue  # a default path (data/test.csv) the params do not name and no file holds
        if split != "train" and names is not None and given is None:
            unseen = unseen_labels(data, path, names)
            if unseen:
                raise DataError(f"data.{split} ({path}) has labels {_listed(unseen)} that data.train ({data.train}) "
                                f"does not have (its labels: {_listed(names)}); a class never seen in training "
                                "cannot be learnt: fix those labels, add examples of them to data.train, or list "
                                "every class in data.label_names")
        examples = task.load(path)
        if split == cfg.evaluate.split and task.needs_labels and examples.labels is None:
            raise DataError(f"data.{split} ({path}) has no labels (data.label_field is unset); kd evaluate "
                            "scores the models on them")
        found["files"][f"data.{split}"] = {"path": str(path), "examples": len(examples)}
        train = examples if split == "train" else train
    if transfer and data.transfer:
        extra = task.load(data.transfer, transfer=True)
        if train is not None:
            with_transfer(train, extra)  # ids and text pairs must fit the train set
        found["files"]["data.transfer"] = {"path": str(data.transfer), "examples": len(extra)}
    return found


def _listed(values: Sequence[str], n: int = 10) -> str:
    shown = json.dumps(list(values[:n]), ensure_ascii=False)
    return shown if len(values) <= n else f"{shown[:-1]}, ... ({len(values)} in all)]"
