"""The one training loop, shared by train-teacher, distill and the labels-only baseline.

What differs between them is the objective: a callable that returns named, already weighted
loss terms for a batch. The loop owns optimisation, evaluation, logging and exact resumption.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from cache_format import atomic_file, atomic_write_text
from cache_format import KDError
from stages.train import dist
from stages._io import import_object, one_line
from stages._io import progress_bar
from stages.config import ConfigError, TrainingConfig
from stages.data import DataError, Encoded, collate

__all__ = ["EpochSampler", "TaskMix", "TaskSampler", "Objective", "FitResult", "fit", "rank_share", "pick_device", "set_seed", "save_model", "write_model", "write_run_record", "replace_folder", "load_callbacks", "NonFiniteLossError", "ResumeError", "CallbackError", "RUN_FILE", "SNAPSHOTS"]

RUN_FILE = "kd_run.json"  # written into every finished model folder: the run's settings and final metrics
SNAPSHOTS = "snapshots"  # <output>/snapshots/gs{step}: the model at each evaluation (`snapshots: true`)
# Training settings that do not change what the run computes (so a resume may change them).
_NOT_RUN_SETTINGS = frozenset({"resume", "eval_batch_size", "checkpoint_every"})


# ----------------------------------------------------------------------------------------------------------------
# Sampling with exact mid-epoch resume (the loop below saves its state in every checkpoint)


class EpochSampler:
    """Yields batches of row indices; the order of epoch e is a permutation seeded by (seed, e).

    Iterating yields the rest of the current epoch, then moves to the next epoch. `state_dict()` counts the rows
    already handed out, so saving it after a training step and loading it into a new sampler continues with
    exactly the remaining batches. A consumer that prefetches must save the state as of the batch it trained on.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 lengths: np.ndarray | None = None):
        """`lengths` (one per row) turns on length grouping: batches of similar length, in random order."""
        if n < 1 or batch_size < 1:
            raise DataError(f"EpochSampler needs n >= 1 and batch_size >= 1 (got n={n}, batch_size={batch_size})")
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != n:
            raise DataError(f"EpochSampler: {len(self.lengths)} lengths for {n} rows; give one length per row")
        self.epoch = 0
        self.position = 0  # rows of the current epoch already handed out
        self._taken: tuple[tuple[int, int], np.ndarray] | None = None  # `take`'s (epoch, seed) and its order

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one full epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start; a no-op for the current epoch, so a resumed position is kept."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        if self.lengths is None:
            return order
        # Length grouping (as transformers' LengthGroupedSampler): sort random groups of 50 batches by
        # length, cut into batches, shuffle the batches. Padding drops ~2x on short-sentence data.
        group = 50 * self.batch_size
        order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                for c in np.array_split(order, range(group, self.n, group))])
        full = self.n // self.batch_size * self.batch_size
        batches = order[:full].reshape(-1, self.batch_size)[rng.permutation(self.n // self.batch_size)]
        return np.concatenate([batches.ravel(), order[full:]])

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._order()
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        while self.position < end:
            batch = order[self.position : self.position + self.batch_size]
            self.position += len(batch)
            yield batch
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        return -(-max(end - self.position, 0) // self.batch_size)

    def take(self) -> np.ndarray:
        """The next batch, moving on to the next epoch at the end of one (a stream that never ends)."""
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        if self.position >= end:
            self.epoch, self.position = self.epoch + 1, 0
        if self._taken is None or self._taken[0] != (self.epoch, self.seed):
            self._taken = ((self.epoch, self.seed), self._order())  # one permutation per epoch, not per batch
        batch = self._taken[1][self.position : self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the stream is: epoch, rows handed out in it, seed (and n, to catch a changed data set)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved `state_dict()`."""
        n = int(state.get("n", self.n))
        position = int(state["position"])
        if n != self.n or not 0 <= position <= self.n:
            raise DataError(
                f"sampler state (n={n}, position={position}) does not fit this data set of {self.n} examples; "
                "resume with the same data or start without --resume"
            )
        self.epoch = int(state["epoch"])
        self.position = position
        self.seed = int(state["seed"])


class TaskMix:
    """The training rows of several tasks as one indexable set (multi-task distillation).

    Row r of task t has the global index `starts[t] + r` and the id `<task name>/<row id>`; a batch never mixes
    tasks (`TaskSampler` draws whole batches from one task), so `collate` hands it to that task's data.
    """

    def __init__(self, names: Sequence[str], data: Sequence[Encoded]):
        self.names = list(names)
        self.data = list(data)
        self.starts = np.concatenate([[0], np.cumsum([len(d) for d in self.data])]).astype(np.int64)
        self.ids = [f"{name}/{i}" for name, d in zip(self.names, self.data) for i in d.ids]
        self.lengths = np.concatenate([d.lengths for d in self.data])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def task_of(self, rows: np.ndarray) -> int:
        """The task index of a batch's rows (all from one task)."""
        return int(np.searchsorted(self.starts, rows[0], side="right") - 1)

    def collate(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], list[str]]:
        t = self.task_of(rows)
        batch, _ = collate(self.data[t], np.asarray(rows) - self.starts[t])
        return batch, [self.ids[r] for r in rows.tolist()]


class TaskSampler:
    """Batches for multi-task training: each batch comes from one task, drawn with probability |D_t|^tau / sum.

    tau = 1 samples tasks in proportion to their size, 0 uniformly (TextBrewer's MultiTaskDistiller uses
    proportional sampling). Each task keeps its own `EpochSampler` (seed + task index), cycling through its
    epochs as often as it is drawn. An "epoch" here is as many batches as one pass over every task takes; the
    task order of epoch e is drawn from a generator seeded by (seed, e), so `state_dict()` (the epoch, the
    batches handed out in it and every task sampler's state) resumes the exact same stream.
    """

    def __init__(self, mix: TaskMix, batch_size: int, *, seed: int, tau: float, group_by_length: bool):
        self.mix = mix
        self.seed = seed
        sizes = np.array([len(d) for d in mix.data], dtype=np.float64)
        weights = sizes ** tau
        self.probs = weights / weights.sum()
        self.samplers = [EpochSampler(len(d), batch_size, shuffle=True, seed=seed + t,
                                      lengths=d.lengths if group_by_length else None)
                         for t, d in enumerate(mix.data)]
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    @property
    def batches_per_epoch(self) -> int:
        return sum(s.batches_per_epoch for s in self.samplers)

    def _tasks(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        return rng.choice(len(self.samplers), size=self.batches_per_epoch, p=self.probs)

    def __iter__(self) -> Iterator[np.ndarray]:
        tasks = self._tasks()
        while self.position < len(tasks):
            t = int(tasks[self.position])
            self.position += 1
            yield self.mix.starts[t] + self.samplers[t].take()
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position

    def __copy__(self) -> "TaskSampler":
        other = TaskSampler.__new__(TaskSampler)
        other.__dict__.update(self.__dict__)
        other.samplers = [copy.copy(s) for s in self.samplers]
        return other

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "tasks": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state.get("tasks", ())) != len(self.samplers):
            raise DataError(f"sampler state has {len(state.get('tasks', ()))} task(s), this run {len(self.samplers)}; "
                            "resume with the same tasks or start without --resume")
        for s, sub in zip(self.samplers, state["tasks"]):
            s.load_state_dict(sub)
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


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


class ResumeError(KDError, ValueError):
    """--resume cannot continue: the settings changed since the checkpoint, or the run is already finished."""


class CallbackError(KDError, RuntimeError):
    """A `callbacks` function raised; the checkpoint of that evaluation is kept, so --resume continues."""


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


def _run_settings(cfg: TrainingConfig, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings that define a run, as plain JSON values: the optimisation ones plus the stage's `extra`."""
    train = {name: getattr(cfg, name) for name in TrainingConfig.model_fields if name not in _NOT_RUN_SETTINGS}
    return json.loads(json.dumps({**train, **(extra or {})}, default=str))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_run(saved: Mapping[str, Any] | None, now: Mapping[str, Any], ckpt: Path) -> None:
    if saved is None:
        raise ResumeError(f"checkpoint {ckpt} records no run settings (an older version wrote it), so resuming "
                          "could silently change the run; run without --resume to start over")
    old, new = _flat(saved), _flat(now)
    changed = [f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
               for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if changed:
        raise ResumeError(f"cannot resume from {ckpt}: settings changed since the checkpoint ({'; '.join(changed)}); "
                          "set them back, or run without --resume to start over with the new ones")


def _remove_debris(output: Path) -> None:
    """Delete `<output>.<hex>.partial` / `.old` siblings that a run killed during `save_model` left behind."""
    pattern = re.compile(re.escape(output.name) + r"\.[0-9a-f]{32}\.(partial|old)")
    if output.parent.is_dir():
        for p in output.parent.iterdir():
            if not pattern.fullmatch(p.name):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def load_callbacks(paths: Sequence[str]) -> list[tuple[str, Callable[..., Any]]]:
    """Import each `package.module:function` (from sys.path, then the current folder), with its path.

    A path that does not import, or names something that is not callable, is a one-line ConfigError.
    """
    out = []
    for path in paths:
        fn = import_object(path, "callbacks", "a function as package.module:function")
        if not callable(fn):
            raise ConfigError(f"callbacks: {path!r} is a {type(fn).__name__}, not a function; name a function")
        out.append((path, fn))
    return out


def _best_rule(keep_best: str | None) -> tuple[str, float] | None:
    """`accuracy` -> ("accuracy", 1.0): higher is better; `min:loss` -> ("loss", -1.0)."""
    if keep_best is None:
        return None
    return (keep_best[4:], -1.0) if keep_best.startswith("min:") else (keep_best, 1.0)


def _plain(value: Any) -> Any:
    """A callback's return value as JSON (anything JSON cannot hold becomes its str)."""
    return json.loads(json.dumps(value, default=str))


def _numbers(value: Any) -> dict[str, float]:
    """The numbers in a callback's return value, for the metrics log: a number, or a mapping's number values."""
    items = value.items() if isinstance(value, Mapping) else [("", value)]
    return {str(k): float(v) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng.get("cuda") is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


@contextlib.contextmanager
def _isolated(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """User code run between steps leaves training as it found it: RNG, train mode, no gradients.

    So a run with callbacks trains the same weights as one without, and a resume that reruns a callback
    matches a run that never stopped.
    """
    rng, was_training = _rng_state(), model.training
    try:
        yield
    finally:
        _set_rng_state(rng)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)


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


def _atomic_torch_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)


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


def rank_share(rows: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """Rank `rank`'s rows of a global batch and the weight of its loss (its share of the batch x `world`).

    Ranks take every `world`-th row (length-grouped batches stay balanced). DDP averages the ranks'
    gradients, so weighting each rank's mean loss by its share gives the gradient of the global batch's
    mean even when the shares differ. A rank left without rows takes the first row at weight 0: it must
    still run forward and backward for the gradient all-reduce.
    """
    part = rows[rank::world]
    return (part, world * len(part) / len(rows)) if len(part) else (rows[:1], 0.0)


def _remaining_batches(sampler: EpochSampler, ids: np.ndarray, rank: int = 0, world: int = 1
                       ) -> tuple[list[np.ndarray], list[list[str]], list[int], list[float]]:
    """The rest of the current epoch without advancing `sampler` (a copy walks it): this rank's rows and ids
    of each global batch, the global batch sizes and this rank's loss weights (`rank_share`)."""
    full = list(copy.copy(sampler))
    shares = [rank_share(r, rank, world) for r in full]
    return [r for r, _ in shares], [ids[r].tolist() for r, _ in shares], [len(r) for r in full], [w for _, w in shares]


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


def fit(
    model: nn.Module,
    objective: Objective,
    train: Encoded | TaskMix,
    dev: Any,
    cfg: TrainingConfig,
    *,
    output: Path,
    log_dir: Path | None = None,
    device: torch.device | None = None,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    run_settings: Mapping[str, Any] | None = None,
    evaluate: Callable[[nn.Module, Any], dict[str, float]] | None = None,
    task_tau: float = 1.0,
    write: Callable[[Path], None] | None = None,
) -> FitResult:
    """Train `model` (and `objective.modules`) on `train`; checkpoint to `output/checkpoint`.

    At each evaluation (the end of every epoch, or every `cfg.eval_every` steps and at the end),
    `evaluate(model, dev)` gives the dev metrics (the task's `evaluate`); then, with `cfg.snapshots`,
    `write(folder)` saves the model as the stage's final save does into `output/snapshots/gs{step}`;
    then each of `cfg.callbacks` is called as fn(step=, metrics=, model=) and its return value logged;
    then the checkpoint is written. With `cfg.keep_best`, the model returned (weights and projections)
    is the one with the best dev metric, and `FitResult.best_step` says which step's it is.
    `train` may be a `TaskMix` (multi-task): batches then come from a `TaskSampler` with `task_tau`.

    With `cfg.resume`, continue exactly from the last checkpoint: same weights, optimizer,
    scheduler, RNG and position in the epoch, so the remaining batches are the ones an
    uninterrupted run would have seen; the evaluations so far and the best model so far come back too.
    The checkpoint records the run's settings (the optimisation ones plus the stage's `run_settings`,
    e.g. teachers and loss); resuming with any of them changed raises ResumeError. `on_step(step)` is
    called after every optimizer step (benchmarks time steps with it).

    A NaN or infinite loss term raises NonFiniteLossError, before any checkpoint of the ruined weights.
    A callback that raises gives CallbackError after the checkpoint of its evaluation is written; the
    resumed run calls it (and the callbacks after it) again for that evaluation before it trains on.

    Under torchrun (a process group from `stages.train.dist.init`), the model trains with DistributedDataParallel:
    every rank walks the same global batches (`cfg.batch_size` rows per micro-batch over all ranks, so N
    processes take the optimizer steps of 1) and computes on its share of each (`rank_share`). Every rank
    evaluates; only rank 0 writes checkpoints, snapshots and logs and runs the callbacks.
    """
    callbacks = load_callbacks(cfg.callbacks)  # a bad path fails before any work
    rule = _best_rule(cfg.keep_best)
    if rule and (dev is None or evaluate is None):
        raise ConfigError(f"{desc}: keep_best {cfg.keep_best!r} needs dev metrics, but there is no dev split; "
                          "set data.dev or remove keep_best")
    if cfg.snapshots and write is None:
        raise ValueError("fit: snapshots need `write`, the function that saves the model into a folder")
    settings = _run_settings(cfg, run_settings)
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    dist.all_same(json.dumps(settings, sort_keys=True), f"the settings of {desc}")
    ckpt_path = output / "checkpoint" / "state.pt"
    if main:
        _remove_debris(output)
    if cfg.resume and not ckpt_path.exists():
        if (output / RUN_FILE).exists():
            raise ResumeError(f"nothing to resume: the model at {output} is finished; run without --resume to retrain")
        if main:
            print(f"note: --resume: no checkpoint at {ckpt_path}; starting from scratch", file=sys.stderr)
    if main and not (cfg.resume and ckpt_path.exists()) and (output / SNAPSHOTS).exists():
        # They belong to the model this run replaces; mixed with this run's they would mislead.
        print(f"note: removing the snapshots of an earlier run in {output / SNAPSHOTS}", file=sys.stderr)
        shutil.rmtree(output / SNAPSHOTS)
    device = device or pick_device()
    set_seed(cfg.seed)
    model.to(device).train()
    objective.modules.to(device).train()
    named = list(model.named_parameters()) + [("proj." + n, p) for n, p in objective.modules.named_parameters()]
    # Modules with their own `lr` (a match's projection_lr) train at it, in groups of their own.
    lrs = {id(p): m.lr for m in objective.modules.modules() if getattr(m, "lr", None) for p in m.parameters()}
    groups = _decay_groups(named, cfg.weight_decay, lrs)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # fused: ~30% faster step
    if isinstance(train, TaskMix):
        sampler: EpochSampler | TaskSampler = TaskSampler(train, cfg.batch_size, seed=cfg.seed, tau=task_tau,
                                                          group_by_length=cfg.group_by_length)
        collate_rows = train.collate
    else:
        sampler = EpochSampler(len(train), cfg.batch_size, shuffle=True, seed=cfg.seed,
                               lengths=train.lengths if cfg.group_by_length else None)
        collate_rows = functools.partial(collate, train)
    steps_per_epoch = math.ceil(sampler.batches_per_epoch / cfg.grad_accum)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    autocast, scaler = _autocast(device, cfg.mixed_precision)
    ids = np.asarray(train.ids, dtype=object)
    # DDP over the model and the objective's modules; `ddp` is None in a single process.
    ddp = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            _Together(model, objective.modules), find_unused_parameters=True)
    say = tqdm.write if main else (lambda _: None)

    step = 0
    dev_metrics: dict[str, float] | None = None
    evaluations: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # keep_best: step, value, dev metrics and CPU copies of the weights
    due: int | None = None  # the first callback of the last evaluation still to run (one raised)
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_same_run(state.get("settings"), settings, ckpt_path)
        model.load_state_dict(state["model"])
        objective.modules.load_state_dict(state["modules"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        # A run killed after its last checkpoint but before the final save resumes with nothing left to train:
        # it must still report the dev metrics of the model it saves.
        dev_metrics = state.get("dev")
        evaluations, best, due = state.get("evaluations", []), state.get("best"), state.get("callbacks_due")
        _set_rng_state(state["rng"])
    # Every rank reads the checkpoint itself (the output folder must be shared by all of them).
    dist.all_same(str(step), f"the checkpoint step in {ckpt_path} to resume {desc} from")
    # The next evaluation is a function of the step (eval_every, epochs and data are run settings, checked
    # above), so a resumed run evaluates at the steps an uninterrupted one does.

    # A NaN/inf loss term makes its running sum (`sums`, kept on the device for logging) NaN/inf too, so the
    # sums are the check: read at each log interval, before every checkpoint and at the end, never per step
    # (that would sync the GPU every step). Weights ruined after step `checked` are thus never checkpointed
    # nor returned for saving.
    sums: dict[str, torch.Tensor] = {}
    n_sums = 0
    checked = step  # the last step whose loss sums were found finite
    saved = step  # the step of the last checkpoint (of the one resumed from)

    def check_finite() -> None:
        nonlocal checked, sums
        if sums:
            stacked = torch.stack([torch.as_tensor(v) for v in sums.values()])
            if world > 1:  # the global batches' sums on every rank (so a NaN on any rank stops all of them);
                sums = dict(zip(sums, dist.all_reduce_mean(stacked)))  # reducing them again changes nothing
            finite = torch.isfinite(stacked).tolist()  # one sync
            bad = sorted(k for k, ok in zip(sums, finite) if not ok)
            if bad:
                where = f"step {step}" if step <= checked + 1 else f"steps {checked + 1}-{step}"
                raise NonFiniteLossError(
                    f"{desc}: non-finite loss at {where}/{total_steps} (term(s) {', '.join(bad)} NaN or infinite); "
                    f"nothing was saved and the last checkpoint (if any) is kept in {ckpt_path.parent}; check the "
                    f"teacher cache with `kd cache verify <cache folder>` (cached runs) or lower lr (now {cfg.lr})"
                )
        checked = step

    def save_checkpoint() -> None:
        nonlocal saved
        check_finite()
        if main:
            _atomic_torch_save({"model": model.state_dict(), "modules": objective.modules.state_dict(),
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "sampler": sampler.state_dict(), "step": step, "rng": _rng_state(),
                                "settings": settings, "dev": dev_metrics, "evaluations": evaluations, "best": best,
                                "callbacks_due": due}, ckpt_path)
        saved = step

    def evaluation() -> None:
        """Dev metrics, best model, snapshot, callbacks, checkpoint: in this order."""
        nonlocal dev_metrics, best
        check_finite()
        record: dict[str, Any] = {"step": step}
        if dev is not None and evaluate is not None:
            dev_metrics = {k: float(v) for k, v in evaluate(model, dev).items()}
            record["dev"] = dev_metrics
            shown = ", ".join(f"{k} {v:.4f}" for k, v in dev_metrics.items())
            if rule:
                name, sign = rule
                if name not in dev_metrics:
                    raise ConfigError(f"{desc}: keep_best: {name!r} is not a dev metric of this run; its metrics "
                                      f"are {', '.join(dev_metrics)} (min:<name> for lower-is-better)")
                value = dev_metrics[name]
                if math.isfinite(value) and (best is None or sign * value > sign * best["value"]):
                    best = {"step": step, "value": value, "dev": dev_metrics, "model": _cpu_copy(model),
                            "modules": _cpu_copy(objective.modules)}
                if best is not None:
                    shown += f" (best {name} {best['value']:.4f} at step {best['step']})"
            say(f"{desc}: step {step}/{total_steps} dev {shown}")
            if live is not None:
                for k, v in dev_metrics.items():
                    live.log_metric(f"dev/{k}", v, plot=True)
        if cfg.snapshots:
            record["snapshot"] = f"{SNAPSHOTS}/gs{step}"
            if main:
                replace_folder(output / record["snapshot"], write)
        evaluations.append(record)
        run_callbacks(0)

    def run_callbacks(start: int) -> None:
        """Callbacks `start`.. on the last evaluation, then its checkpoint (also when one raises)."""
        nonlocal due
        record = evaluations[-1]
        for i, (path, fn) in enumerate(callbacks[start:] if main else (), start):
            try:
                with _isolated(model, optimizer):
                    value = fn(step=record["step"], metrics=dict(record.get("dev", {})), model=model)
            except Exception as e:
                due = i
                save_checkpoint()
                raise CallbackError(
                    f"{desc}: callback {path} raised at step {record['step']} ({one_line(e)}); the checkpoint of "
                    f"that step is kept in {ckpt_path.parent}: fix the callback and rerun with --resume"
                ) from e
            record.setdefault("callbacks", {})[path] = _plain(value)
            say(f"{desc}: step {record['step']} callback {path} -> {value!r}")
            if live is not None:
                for k, v in _numbers(value).items():
                    live.log_metric("/".join(filter(None, ("callbacks", path.replace(":", "."), k))), v, plot=True)
        due = None
        if live is not None and (record.get("dev") or record.get("callbacks")):
            live.next_step()
        save_checkpoint()

    live = None
    if log_dir is not None and main:
        from dvclive import Live  # imported here: it is slow to import and only needed for logging

        live = Live(dir=str(log_dir), resume=cfg.resume and step > 0, save_dvc_exp=False, dvcyaml=None)
    log_every = max(1, total_steps // 200)  # ~200 points per curve: enough to plot, cheap to write
    seen = 0
    t0 = time.perf_counter()
    bar = progress_bar(total=total_steps, initial=step, desc=desc, unit="step")
    try:
        if due is not None:  # a callback raised at the checkpoint's evaluation: run it (and the rest) again
            run_callbacks(due)
        while step < total_steps:
            rows_list, id_batches, sizes, weights = _remaining_batches(sampler, ids, rank, world)
            objective.start_epoch(id_batches)
            micro = 0
            stream = iter(sampler)  # advanced in lockstep with the batches; its state goes in checkpoints
            for rows, batch_ids, size, weight in zip(rows_list, id_batches, sizes, weights):
                next(stream)
                batch, _ = collate_rows(rows)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                stepping = (micro + 1) % cfg.grad_accum == 0 or micro + 1 == len(rows_list)
                # DDP averages the gradients at the backward of the last micro-batch of each optimizer step.
                with contextlib.nullcontext() if ddp is None or stepping else ddp.no_sync():
                    with autocast:
                        if ddp is None:
                            terms = objective.losses(model, batch, batch_ids, step, total_steps)
                        else:
                            terms = ddp(functools.partial(objective.losses, model, batch, batch_ids, step,
                                                          total_steps))
                    loss = sum(terms.values()) / cfg.grad_accum
                    if ddp is not None:
                        loss = loss * weight
                    (scaler.scale(loss) if scaler else loss).backward()
                for k, v in terms.items():  # kept on the device: reading a value would sync the GPU every step
                    sums[k] = sums.get(k, 0.0) + (v.detach() if ddp is None else v.detach() * weight)
                n_sums += 1
                seen += size
                micro += 1
                if not stepping:
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if on_step is not None:
                    on_step(step)
                if step % log_every == 0 or step == total_steps:
                    check_finite()
                    means = {k: float(v) / n_sums for k, v in sums.items()}  # the one sync per log interval
                    bar.set_postfix(loss=f"{sum(means.values()):.4f}")
                    if live is not None:
                        for k, v in means.items():
                            live.log_metric(f"train/loss/{k}", v)
                        live.log_metric("train/loss/total", sum(means.values()))
                        live.log_metric("train/lr", scheduler.get_last_lr()[0])
                        live.next_step()
                    sums, n_sums = {}, 0
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
                    evaluation()
                elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save_checkpoint()
                if step >= total_steps:
                    break
            else:
                next(stream, None)  # exhausting the generator moves the sampler to the next epoch
            if sampler.position == 0 or step >= total_steps:  # epoch boundary (or the end)
                if not cfg.eval_every:
                    evaluation()
                elif saved != step:
                    save_checkpoint()
        check_finite()
    finally:
        bar.close()
        objective.close()
        if live is not None:
            live.end()
    seconds = time.perf_counter() - t0
    if best is not None:
        if best["step"] != step:
            model.load_state_dict(best["model"])
            objective.modules.load_state_dict(best["modules"])
        dev_metrics = best["dev"]
    elif rule:
        print(f"note: keep_best: {cfg.keep_best} was never a finite number; the model is the last one", file=sys.stderr)
    return FitResult(step, step / steps_per_epoch, dev_metrics, seconds, seen / max(seconds, 1e-9), settings,
                     best["step"] if best else None, evaluations)


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


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def replace_folder(output: Path, fill: Callable[[Path], None]) -> None:
    """Make `output` what `fill(folder)` writes into a new sibling folder, swapped in whole once it is done.

    The run's snapshots (`output/snapshots`) are carried into the new folder as hard links (no copy).
    Under torchrun only rank 0 writes: on the other ranks this does nothing.
    """
    if not dist.is_main():
        return
    tmp = output.with_name(f"{output.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if (output / SNAPSHOTS).is_dir() and not (tmp / SNAPSHOTS).exists():
            shutil.copytree(output / SNAPSHOTS, tmp / SNAPSHOTS, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("*.partial", "*.old"))  # a killed snapshot's debris
        old = output.with_name(f"{output.name}.{uuid.uuid4().hex}.old")
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
