"""`kd distill`: train a student from cached teacher outputs (or a live teacher, or labels alone).

This module only picks the method; each lives in stages/methods/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stages.config import Config
from stages.kinds import TASK_KINDS
from stages.methods import DistillResult, distill_fastbert, distill_kd, distill_lm, distill_tasks, distill_theseus
from stages.train import dist

__all__ = ["distill"]


def distill(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Train the student described by `cfg.distill` and save it with `save_pretrained`.

    With `tasks:` in the params, one student with a head per task (methods/multitask.py); with
    `distill.method: theseus`, BERT-of-Theseus module replacing (methods/theseus.py); with `distill.method:
    fastbert`, FastBERT's self-distilled branches on a fine-tuned backbone (methods/fastbert.py); for a causal
    language model, methods/lm.py; otherwise logit and feature KD (methods/kd.py).
    `on_step(step)` is called after every optimizer step (the benchmarks time steps with it).

    Under torchrun, every process trains its share of each batch with DistributedDataParallel (train/dist.py);
    rank 0 alone writes the outputs, and every rank returns once they are written."""
    dist.init()
    if cfg.tasks:
        result = distill_tasks(cfg, on_step=on_step)
    elif cfg.distill.method == "theseus":
        result = distill_theseus(cfg, on_step=on_step)
    elif cfg.distill.method == "fastbert":
        result = DistillResult(Path(cfg.distill.output), "fastbert", [], distill_fastbert(cfg, on_step=on_step))
    elif TASK_KINDS[cfg.data.task].language_model:
        result = distill_lm(cfg, on_step=on_step)
    else:
        result = distill_kd(cfg, on_step=on_step)
    dist.barrier()
    return result
