"""The one training loop, shared by train-teacher, distill (every method) and the labels-only baseline.

What differs between them is the objective: a callable that returns named, already weighted loss terms for a
batch. `fit` is the loop: batches from a sampler (`samplers`), forward and backward, optimizer steps. Around it,
at fixed points, it calls the parts that live next door:

- the loss sums (`_LossSums`, below): kept on the device, read (one GPU sync) at each log interval, before
  every checkpoint and at the end; a NaN/inf term there raises NonFiniteLossError, so weights it ruined are
  never checkpointed nor returned for saving;
- the evaluations (`evaluation.Evaluator`): at the end of every epoch, or every `eval_every` steps and at the
  end: dev metrics, keep_best (the returned model is then the best one), a snapshot into
  `<output>/snapshots/gs{step}`, the callbacks (`callbacks`); the checkpoint follows each evaluation, also when a
  callback raised (CallbackError then; --resume calls it and the ones after it again before training on);
- the checkpoint (`checkpoints.Checkpoint`): with `resume`, the run continues exactly: same weights, optimizer,
  schedule, RNG and position in the epoch, so the remaining batches are the ones an uninterrupted run would have
  seen; the evaluations and the best model so far come back too. It records the run's settings (the
  optimisation ones plus the stage's `run_settings`); resuming with any of them changed raises ResumeError.

`fit`'s other arguments: `sampler` yields the batches of `train`'s row indices (default: an `EpochSampler` seeded
by `seed`, length-grouped with `group_by_length`; multi-task distillation hands a `TaskSampler` over a `TaskMix`);
`evaluate(model, dev)` gives the dev metrics (the task's `evaluate`); `write(folder)` saves the model as the
stage's final save does (for snapshots); `log_dir` takes the dvclive log; `on_step(step)` is called after every
optimizer step (benchmarks time steps with it).

Under torchrun (a process group from `stages.train.dist.init`) the model trains with DistributedDataParallel:
every rank walks the same global batches (`batch_size` rows per micro-batch over all ranks, so N processes take
the optimizer steps of 1) and computes on its share of each (`rank_share`). Every rank evaluates; only rank 0
writes checkpoints, snapshots and logs and runs the callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from cache_format import KDError
from stages._io import progress_bar
from stages.config import TrainingConfig
from stages.data import Encoded
from stages.train import dist
from stages.train.callbacks import Callbacks, load_callbacks
from stages.train.checkpoints import Checkpoint, prepare_output, run_settings as settings_of
from stages.train.checkpoints import _flat  # noqa: F401  (tests/test_config_rules.py imports it from here)
from stages.train.evaluation import Evaluator, check_evaluation
from stages.train.samplers import EpochSampler, Sampler, TaskMix, _remaining_batches, collate_fn

__all__ = ["Objective", "FitResult", "NonFiniteLossError", "fit", "pick_device", "set_seed"]


class Objective(Protocol):
    """What a training run optimises. `modules` are extra trainable parts (projections); a submodule
    with a non-None `lr` attribute trains at that learning rate instead of the run's."""

    modules: nn.ModuleDict

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        """Called with the ids of every batch left in the epoch, in order (to prefetch them)."""

    def losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], ids: Sequence[str], step: int, total_steps: int
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms for one batch at optimizer step `step` of `total_steps`."""

    def close(self) -> None:
        """Release background resources (prefetch threads)."""


class NonFiniteLossError(KDError, ArithmeticError):
    """A loss term became NaN or infinite: the weights are ruined, so nothing is saved."""


@dataclass(frozen=True)
class FitResult:
    steps: int
    epochs_done: float
    dev: dict[str, float] | None  # the returned model's dev metrics (the last or the keep_best evaluation's)
    seconds: float
    examples_per_second: float
    settings: dict = field(default_factory=dict)  # what defines the run (checked on resume, saved in RUN_FILE)
    best_step: int | None = None  # with keep_best: the step of the returned model (`dev` is its metrics)
    # One record per evaluation: step, dev metrics, snapshot folder (relative to the output), callbacks' returns.
    evaluations: list[dict] = field(default_factory=list)

    def dev_summary(self) -> str:
        """`accuracy 0.8123, macro_f1 0.8011` (or `no dev split`), for one-line reports."""
        return ", ".join(f"{k} {v:.4f}" for k, v in self.dev.items()) if self.dev else "no dev split"


def fit(model: nn.Module, objective: Objective, train: Encoded | TaskMix, dev: Any, cfg: TrainingConfig, *,
        output: Path, log_dir: Path | None = None, device: torch.device | None = None, desc: str = "train",
        on_step: Callable[[int], None] | None = None, run_settings: Mapping[str, Any] | None = None,
        evaluate: Callable[[nn.Module, Any], dict[str, float]] | None = None, sampler: Sampler | None = None,
        write: Callable[[Path], None] | None = None) -> FitResult:
    """Train `model` (and `objective.modules`) on the batches `sampler` draws from `train`, evaluating on `dev`;
    checkpoint to `output/checkpoint`. The module docstring says what each part does and when."""
    callbacks, settings, ckpt_path = _preflight(cfg, dev, evaluate, write, output, run_settings, desc)
    device = device or pick_device()
    set_seed(cfg.seed)
    model.to(device).train()
    objective.modules.to(device).train()
    sampler = sampler or EpochSampler(len(train), cfg.batch_size, seed=cfg.seed, lengths=_lengths(train, cfg))
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / cfg.grad_accum)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer, scheduler, params = _optimizer(model, objective.modules, cfg, total_steps)
    autocast, scaler = _autocast(device, cfg.mixed_precision)
    ddp = _ddp(model, objective.modules)  # None in a single process
    ckpt = Checkpoint(ckpt_path, settings, model, objective.modules, optimizer, scheduler, sampler)
    step, state = ckpt.load(cfg.resume, desc)  # weights, optimizer, schedule, sampler position, RNG: as saved
    evals = Evaluator(cfg, dev, evaluate, write, callbacks, model, objective.modules, optimizer, output=output,
                      log_dir=log_dir, kept_in=ckpt.path.parent, desc=desc, total_steps=total_steps, state=state)
    sums = _LossSums(step, desc, total_steps, ckpt.path.parent, cfg.lr)
    collate_rows, ids = collate_fn(train), np.asarray(train.ids, dtype=object)
    log_every = max(1, total_steps // 200)  # ~200 points per curve: enough to plot, cheap to write
    seen, t0 = 0, time.perf_counter()
    bar = progress_bar(total=total_steps, initial=step, desc=desc, unit="step")
    try:
        if evals.due is not None:  # a callback raised at the checkpoint's evaluation: run it (and the rest) again
            _checkpoint(ckpt, sums, evals, step, raising=evals.run_callbacks(evals.due))
        while step < total_steps:
            # The rest of the epoch, this rank's share of each batch: the objective prefetches their teacher rows.
            rows, id_batches, sizes, weights = _remaining_batches(sampler, ids, dist.rank(), dist.world_size())
            objective.start_epoch(id_batches)
            stream = iter(sampler)  # moved on with each batch (zip below): a checkpoint's state resumes after it
            for micro, (part, batch_ids, size, weight, _) in enumerate(zip(rows, id_batches, sizes, weights, stream)):
                batch = {k: v.to(device, non_blocking=True) for k, v in collate_rows(part)[0].items()}
                stepping = (micro + 1) % cfg.grad_accum == 0 or micro + 1 == len(rows)
                # DDP averages the gradients at the backward of the last micro-batch of each optimizer step.
                with contextlib.nullcontext() if ddp is None or stepping else ddp.no_sync():
                    with autocast:
                        losses = functools.partial(objective.losses, model, batch, batch_ids, step, total_steps)
                        terms = losses() if ddp is None else ddp(losses)  # DDP's forward runs the objective
                    loss = sum(terms.values()) / cfg.grad_accum
                    if ddp is not None:
                        loss = loss * weight  # this rank's share of the global batch (`rank_share`)
                    (scaler.scale(loss) if scaler else loss).backward()
                sums.add(terms, None if ddp is None else weight)  # no sync: the sums stay on the device
                seen += size
                if not stepping:
                    continue
                _optimizer_step(optimizer, scheduler, scaler, params, cfg.max_grad_norm)
                step += 1
                bar.update(1)
                if on_step is not None:
                    on_step(step)
                if step % log_every == 0 or step == total_steps:
                    sums.log(step, bar, evals.live, scheduler)  # GPU sync, once per interval: means and NaN check
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
                    _evaluate(ckpt, sums, evals, step)  # sync: NaN check first, no ruined weight is scored or saved
                elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    _checkpoint(ckpt, sums, evals, step)  # sync: NaN check first, no ruined weight is saved
                if step >= total_steps:
                    break
            else:
                next(stream, None)  # exhausting the generator moves the sampler to the next epoch
            if sampler.position == 0 or step >= total_steps:  # an epoch's end (or the run's)
                if not cfg.eval_every:
                    _evaluate(ckpt, sums, evals, step)
                elif ckpt.saved != step:
                    _checkpoint(ckpt, sums, evals, step)
        sums.check(step)  # sync: nor are ruined weights returned for saving
    finally:
        bar.close()
        objective.close()
        evals.close()  # the metrics log
    seconds = time.perf_counter() - t0
    dev_metrics, best_step = evals.finish(step)  # with keep_best, the best model's weights come back
    return FitResult(step, step / steps_per_epoch, dev_metrics, seconds, seen / max(seconds, 1e-9), settings,
                     best_step, evals.records)


def _preflight(cfg: TrainingConfig, dev: Any, evaluate: Callable | None, write: Callable | None, output: Path,
               extra: Mapping[str, Any] | None, desc: str) -> tuple[Callbacks, dict[str, Any], Path]:
    """What can fail before any work, then the output folder cleared: the callbacks, the run's settings (the
    same on every rank) and the checkpoint path."""
    callbacks = load_callbacks(cfg.callbacks)  # a bad path fails before any work
    check_evaluation(cfg, dev, evaluate, write, desc)
    settings = settings_of(cfg, extra)
    dist.all_same(json.dumps(settings, sort_keys=True), f"the settings of {desc}")
    return callbacks, settings, prepare_output(output, cfg.resume)


class _LossSums:
    """The loss terms summed on the device since the last log, and the finite check that reads them.

    A NaN/inf term makes its running sum NaN/inf too, so the sums are the check; reading them syncs the GPU,
    so the loop does it at each log interval, before every checkpoint and at the end, never per step.
    """

    def __init__(self, step: int, desc: str, total_steps: int, kept_in: Path, lr: float):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.checked = step  # the last step whose loss sums were found finite
        self.desc, self.total_steps, self.kept_in, self.lr = desc, total_steps, kept_in, lr  # for the message

    def add(self, terms: Mapping[str, torch.Tensor], weight: float | None) -> None:
        """One micro-batch's terms (times this rank's `weight` under DDP)."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach() if weight is None else v.detach() * weight)
        self.n += 1

    def check(self, step: int) -> None:
        """Raise NonFiniteLossError if a term went NaN/inf since the last check (under torchrun: on any rank)."""
        if self.sums:
            stacked = torch.stack([torch.as_tensor(v) for v in self.sums.values()])
            if dist.world_size() > 1:  # the global batches' sums on every rank (a NaN on any rank stops them all);
                self.sums = dict(zip(self.sums, dist.all_reduce_mean(stacked)))  # reducing again changes nothing
            finite = torch.isfinite(stacked).tolist()  # one sync
            bad = sorted(k for k, ok in zip(self.sums, finite) if not ok)
            if bad:
                where = f"step {step}" if step <= self.checked + 1 else f"steps {self.checked + 1}-{step}"
                raise NonFiniteLossError(
                    f"{self.desc}: non-finite loss at {where}/{self.total_steps} (term(s) {', '.join(bad)} NaN or "
                    f"infinite); nothing was saved and the last checkpoint (if any) is kept in {self.kept_in}; check "
                    f"the teacher cache with `kd cache verify <cache folder>` (cached runs) or lower lr (now {self.lr})"
                )
        self.checked = step

    def log(self, step: int, bar: Any, live: Any, scheduler: Any) -> None:
        """Check, then show the mean of each term since the last log (progress bar, dvclive) and start over."""
        self.check(step)
        means = {k: float(v) / self.n for k, v in self.sums.items()}  # the one sync per log interval
        bar.set_postfix(loss=f"{sum(means.values()):.4f}")
        if live is not None:
            for k, v in means.items():
                live.log_metric(f"train/loss/{k}", v)
            live.log_metric("train/loss/total", sum(means.values()))
            live.log_metric("train/lr", scheduler.get_last_lr()[0])
            live.next_step()
        self.sums, self.n = {}, 0


def _checkpoint(ckpt: Checkpoint, sums: _LossSums, evals: Evaluator, step: int,
                raising: Exception | None = None) -> None:
    """Write the checkpoint of `step` once its losses are found finite; then raise `raising` (a callback's error:
    the checkpoint keeps that evaluation, so --resume calls the callback again)."""
    sums.check(step)
    ckpt.save(step, evals.state())
    if raising is not None:
        raise raising


def _evaluate(ckpt: Checkpoint, sums: _LossSums, evals: Evaluator, step: int) -> None:
    """An evaluation at `step` (of weights found finite), then its checkpoint."""
    sums.check(step)
    _checkpoint(ckpt, sums, evals, step, raising=evals(step))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast(device: torch.device, mode: str):
    """bf16/fp16 autocast on CUDA only: CPU autocast slows these small models down."""
    if device.type != "cuda" or mode == "no":
        return torch.autocast("cpu", enabled=False), None
    dtype = torch.float16 if mode == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _lengths(train: Encoded | TaskMix, cfg: TrainingConfig) -> np.ndarray | None:
    """Each row's length, for length-grouped batches (`group_by_length`), else None."""
    return train.lengths if cfg.group_by_length else None


def _optimizer(model: nn.Module, modules: nn.Module, cfg: TrainingConfig, total_steps: int
               ) -> tuple[torch.optim.Optimizer, Any, list[nn.Parameter]]:
    """AdamW over the model and the objective's modules, its linear warmup-decay schedule, and the parameters
    whose gradients are clipped together."""
    named = list(model.named_parameters()) + [("proj." + n, p) for n, p in modules.named_parameters()]
    # Modules with their own `lr` (a match's projection_lr) train at it, in groups of their own.
    lrs = {id(p): m.lr for m in modules.modules() if getattr(m, "lr", None) for p in m.parameters()}
    optimizer = torch.optim.AdamW(_decay_groups(named, cfg.weight_decay, lrs), lr=cfg.lr, fused=True)  # ~30% faster
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler, [p for _, p in named]


def _optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler | None,
                    params: list[nn.Parameter], max_grad_norm: float | None) -> None:
    """Clip, step (through the fp16 gradient scaler, if any), advance the schedule, clear the gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _decay_groups(params: Sequence[tuple[str, nn.Parameter]], weight_decay: float,
                  lrs: Mapping[int, float] | None = None) -> list[dict]:
    """AdamW param groups; a parameter whose id is in `lrs` goes to a group of its own lr, after the default ones."""
    # Biases and LayerNorm weights are not decayed (the BERT recipe every toolkit follows).
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    lrs = lrs or {}
    groups = []
    for lr in [None, *sorted(set(lrs.values()))]:
        own = [(n, p) for n, p in params if p.requires_grad and lrs.get(id(p)) == lr]
        extra = {} if lr is None else {"lr": lr}
        groups += [{"params": [p for n, p in own if not n.endswith(no_decay)], "weight_decay": weight_decay, **extra},
                   {"params": [p for n, p in own if n.endswith(no_decay)], "weight_decay": 0.0, **extra}]
    return groups


class _Together(nn.Module):
    """The model and the objective's modules as one module for DDP; its forward runs the objective.

    Running the whole loss inside DDP's forward lets objectives use the model as they like (call submodules,
    read its head) and lets `find_unused_parameters` see which parameters a batch really used (multi-task
    heads, Theseus modules), projections included.
    """

    def __init__(self, model: nn.Module, extra: nn.Module):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, losses: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return losses()


def _ddp(model: nn.Module, modules: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """Under torchrun, DDP over the model and the objective's modules (`_Together`); None in a single process."""
    if dist.world_size() == 1:
        return None
    return nn.parallel.DistributedDataParallel(_Together(model, modules), find_unused_parameters=True)
