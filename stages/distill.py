"""`kd distill`: train a student from cached teacher outputs (or a live teacher, or labels alone).

This module only picks the method; each lives in stages/methods/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stages.config import Config
from stages.kinds import TASK_KINDS
from stages.methods import DistillResult, distill_fastbert, distill_kd, distill_lm, distill_tasks, distill_theseus
from stages.tasks import checked
from stages.train import dist

__all__ = ["distill"]


def _fastbert(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> DistillResult:
    return DistillResult(Path(cfg.distill.output), "fastbert", [], distill_fastbert(cfg, on_step=on_step))


# Each method's entry point, by the name `_method` picks.
_METHODS: dict[str, Callable[..., DistillResult]] = {
    "kd": distill_kd,
    "lm": distill_lm,
    "theseus": distill_theseus,
    "fastbert": _fastbert,
    "multitask": distill_tasks,
}


def _method(cfg: Config) -> str:
    """`multitask` with `tasks:` in the params; else distill.method, where `kd` is the KD method that serves the
    task kind (`TASK_KINDS[data.task].method`: `lm` for causal language models)."""
    if cfg.tasks:
        return "multitask"
    if cfg.distill.method == "kd":
        return TASK_KINDS[cfg.data.task].method
    return cfg.distill.method


def distill(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Train the student described by `cfg.distill` and save it with `save_pretrained`.

    With `tasks:` in the params, one student with a head per task (methods/multitask.py); with
    `distill.method: theseus`, BERT-of-Theseus module replacing (methods/theseus.py); with `distill.method:
    fastbert`, FastBERT's self-distilled branches on a fine-tuned backbone (methods/fastbert.py); otherwise the
    task kind's KD method: methods/lm.py for a causal language model, logit and feature KD (methods/kd.py) for
    every other kind.
    `on_step(step)` is called after every optimizer step (the benchmarks time steps with it).

    Under torchrun, every process trains its share of each batch with DistributedDataParallel (train/dist.py);
    rank 0 alone writes the outputs, and every rank returns once they are written."""
    dist.init()
    cfg = checked(cfg)  # every data file before any model, string labels named from data.train
    result = _METHODS[_method(cfg)](cfg, on_step=on_step)
    dist.barrier()
    return result
