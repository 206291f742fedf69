"""The finished model's folder: the weights, tokenizer and projections (`write_model`), and the run record
(`RUN_FILE`: the run's settings and final metrics, which marks the model finished), swapped in whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from cache_format import atomic_write_text
from stages.train.checkpoints import RUN_FILE, replace_folder
from stages.train.loop import FitResult

__all__ = ["save_model", "write_model", "write_run_record"]


def save_model(model: nn.Module, tokenizer, projections: nn.Module, output: Path, *, result: FitResult | None = None,
               label_names: Sequence[str] | None = None, head_config: Mapping[str, Any] | None = None) -> None:
    """Save the final model with `save_pretrained` (+ tokenizer, + projections if any).

    `label_names` go into the config (id2label/label2id, so `transformers.pipeline` prints names), and so do
    the task's `head_config` keys (e.g. problem_type). With
    `result`, `RUN_FILE` records the run's settings and final metrics: it marks the model as finished
    (`--resume` then has nothing to do) and says which step's model this is.

    Written into a sibling folder, then swapped in, so a crash never leaves half a model. The
    swap also drops `output/checkpoint`: a finished run has nothing to resume, and optimizer
    state would triple the size of every DVC experiment's output. `output/snapshots` stays.
    """
    replace_folder(output, lambda folder: write_model(model, tokenizer, projections, folder, result=result,
                                                      label_names=label_names, head_config=head_config))


def write_model(model: nn.Module, tokenizer, projections: nn.Module, folder: Path, *,
                result: FitResult | None = None, label_names: Sequence[str] | None = None,
                head_config: Mapping[str, Any] | None = None) -> None:
    """What `save_model` saves, written straight into `folder` (which `replace_folder` then swaps in)."""
    if label_names:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    for key, value in (head_config or {}).items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if len(projections):
        torch.save(projections.state_dict(), folder / "projections.pt")
    if result is not None:
        write_run_record(folder, result)


def write_run_record(folder: Path, result: FitResult) -> None:
    """`RUN_FILE` in `folder`: the run's steps, dev metrics (`dev_<name>`), best step, evaluations and settings."""
    run = {"steps": result.steps, "epochs_done": result.epochs_done,
           **{f"dev_{k}": v for k, v in (result.dev or {}).items()},
           **({"best_step": result.best_step} if result.best_step is not None else {}),
           "evaluations": result.evaluations, "settings": result.settings}
    atomic_write_text(folder / RUN_FILE, json.dumps(run, indent=2) + "\n")

