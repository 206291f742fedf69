"""What happens at each evaluation of a run: dev metrics, keep_best, the snapshot, the callbacks, the metrics log.

`fit` calls its `Evaluator` at the end of every epoch (or every `eval_every` steps and at the end) and writes the
checkpoint right after; the evaluator's `state()` goes into it, so a resumed run has the evaluations, the best
model so far and the callbacks still due.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from stages.config import ConfigError, TrainingConfig
from stages.train import dist
from stages.train.callbacks import CallbackError, Callbacks, call_callbacks
from stages.train.checkpoints import SNAPSHOTS, replace_folder

__all__: list[str] = []  # used by `fit` only


def check_evaluation(cfg: TrainingConfig, dev: Any, evaluate: Callable | None, write: Callable | None,
                     desc: str) -> None:
    """Refuse, before any work, settings an evaluation cannot honour (keep_best without dev metrics, snapshots
    without a way to write the model)."""
    if _best_rule(cfg.keep_best) and (dev is None or evaluate is None):
        raise ConfigError(f"{desc}: keep_best {cfg.keep_best!r} needs dev metrics, but there is no dev split; "
                          "set data.dev or remove keep_best")
    if cfg.snapshots and write is None:
        raise ValueError("fit: snapshots need `write`, the function that saves the model into a folder")


def open_live(log_dir: Path | None, *, resume: bool) -> Any:
    """The dvclive metrics log in `log_dir` (rank 0 only; None without one): train losses, dev metrics, callbacks."""
    if log_dir is None or not dist.is_main():
        return None
    from dvclive import Live  # imported here: it is slow to import and only needed for logging

    return Live(dir=str(log_dir), resume=resume, save_dvc_exp=False, dvcyaml=None)


class Evaluator:
    """One run's evaluations: `evaluator(step)` scores the model on dev, keeps the best, writes the snapshot and
    calls the callbacks, in this order; `state()` is what the checkpoint keeps of them (`state` a loaded one's).

    Every rank evaluates; only rank 0 writes snapshots and logs and calls the callbacks.
    """

    def __init__(self, cfg: TrainingConfig, dev: Any, evaluate: Callable[[nn.Module, Any], Mapping[str, float]] | None,
                 write: Callable[[Path], None] | None, callbacks: Callbacks, model: nn.Module, modules: nn.Module,
                 optimizer: torch.optim.Optimizer, *, output: Path, log_dir: Path | None, kept_in: Path, desc: str,
                 total_steps: int, state: Mapping[str, Any]):
        self.dev, self.evaluate, self.write, self.snapshots = dev, evaluate, write, cfg.snapshots
        self.rule, self.keep_best = _best_rule(cfg.keep_best), cfg.keep_best
        self.model, self.modules, self.optimizer = model, modules, optimizer
        self.callbacks = callbacks if dist.is_main() else ()
        self.output, self.kept_in, self.desc, self.total_steps = output, kept_in, desc, total_steps
        self.say: Callable[[str], None] = tqdm.write if dist.is_main() else (lambda _: None)
        # A run killed after its last checkpoint but before the final save resumes with nothing left to train:
        # it must still report the dev metrics of the model it saves.
        self.dev_metrics: dict[str, float] | None = state.get("dev")
        self.records: list[dict[str, Any]] = state.get("evaluations", [])
        self.best: dict[str, Any] | None = state.get("best")  # keep_best: step, value, dev, CPU copies of weights
        self.due: int | None = state.get("callbacks_due")  # the first callback of the last evaluation still to run
        # The metrics log (the loop logs its train losses there too); a resumed run appends to it.
        self.live = open_live(log_dir, resume=cfg.resume and state.get("step", 0) > 0)

    def close(self) -> None:
        """End the metrics log."""
        if self.live is not None:
            self.live.end()

    def state(self) -> dict[str, Any]:
        """What the checkpoint keeps (these keys, in this order, are part of the checkpoint format)."""
        return {"dev": self.dev_metrics, "evaluations": self.records, "best": self.best, "callbacks_due": self.due}

    def __call__(self, step: int) -> CallbackError | None:
        """Evaluate at `step`; the error of a callback that raised (to raise once the checkpoint is written)."""
        record: dict[str, Any] = {"step": step}
        if self.dev is not None and self.evaluate is not None:
            self.dev_metrics = {k: float(v) for k, v in self.evaluate(self.model, self.dev).items()}
            record["dev"] = self.dev_metrics
            shown = ", ".join(f"{k} {v:.4f}" for k, v in self.dev_metrics.items()) + self._keep_best(step)
            self.say(f"{self.desc}: step {step}/{self.total_steps} dev {shown}")
            if self.live is not None:
                for k, v in self.dev_metrics.items():
                    self.live.log_metric(f"dev/{k}", v, plot=True)
        if self.snapshots:
            record["snapshot"] = f"{SNAPSHOTS}/gs{step}"
            if dist.is_main():
                replace_folder(self.output / record["snapshot"], self.write)
        self.records.append(record)
        return self.run_callbacks(0)

    def run_callbacks(self, start: int) -> CallbackError | None:
        """Callbacks `start`.. on the last evaluation (resuming: the ones still due); the error of one that raised."""
        record = self.records[-1]
        failed = call_callbacks(self.callbacks, start, record, self.model, self.optimizer, live=self.live,
                                say=self.say, desc=self.desc, kept_in=self.kept_in)
        if failed is not None:
            self.due, error = failed
            return error
        self.due = None
        if self.live is not None and (record.get("dev") or record.get("callbacks")):
            self.live.next_step()
        return None

    def _keep_best(self, step: int) -> str:
        """With keep_best: copy the model if this evaluation is the best so far; the best, for the log line."""
        if not self.rule:
            return ""
        name, sign = self.rule
        if name not in self.dev_metrics:
            raise ConfigError(f"{self.desc}: keep_best: {name!r} is not a dev metric of this run; its metrics "
                              f"are {', '.join(self.dev_metrics)} (min:<name> for lower-is-better)")
        value = self.dev_metrics[name]
        if math.isfinite(value) and (self.best is None or sign * value > sign * self.best["value"]):
            self.best = {"step": step, "value": value, "dev": self.dev_metrics, "model": _cpu_copy(self.model),
                         "modules": _cpu_copy(self.modules)}
        return "" if self.best is None else f" (best {name} {self.best['value']:.4f} at step {self.best['step']})"

    def finish(self, step: int) -> tuple[dict[str, float] | None, int | None]:
        """The returned model's dev metrics and, with keep_best, its step: the best model is loaded back."""
        if self.best is not None:
            if self.best["step"] != step:
                self.model.load_state_dict(self.best["model"])
                self.modules.load_state_dict(self.best["modules"])
            return self.best["dev"], self.best["step"]
        if self.rule:
            print(f"note: keep_best: {self.keep_best} was never a finite number; the model is the last one",
                  file=sys.stderr)
        return self.dev_metrics, None


def _best_rule(keep_best: str | None) -> tuple[str, float] | None:
    """`accuracy` -> ("accuracy", 1.0): higher is better; `min:loss` -> ("loss", -1.0)."""
    if keep_best is None:
        return None
    return (keep_best[4:], -1.0) if keep_best.startswith("min:") else (keep_best, 1.0)


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
