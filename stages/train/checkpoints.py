"""A run's checkpoint and output folder: exact resume, atomic writes, whole-folder swaps.

`Checkpoint` writes `<output>/checkpoint/state.pt` (rank 0 only, atomically) with everything an exact resume
needs: the weights, the optimizer, the schedule, the sampler's position, the RNG state, the run's settings and
the evaluations so far. Its keys are user data (a run killed by an older version resumes): keep them.
`replace_folder` makes a folder appear whole (finished models, snapshots).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from cache_format import KDError, atomic_file
from stages.config import TrainingConfig
from stages.train import dist

__all__ = ["RUN_FILE", "SNAPSHOTS", "ResumeError", "replace_folder"]

RUN_FILE = "kd_run.json"  # written into every finished model folder: the run's settings and final metrics
SNAPSHOTS = "snapshots"  # <output>/snapshots/gs{step}: the model at each evaluation (`snapshots: true`)
# Training settings that do not change what the run computes (so a resume may change them).
_NOT_RUN_SETTINGS = frozenset({"resume", "eval_batch_size", "checkpoint_every"})


class ResumeError(KDError, ValueError):
    """--resume cannot continue: the settings changed since the checkpoint, or the run is already finished."""


def run_settings(cfg: TrainingConfig, extra: Mapping[str, Any] | None) -> dict[str, Any]:
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


def prepare_output(output: Path, resume: bool) -> Path:
    """Clear what earlier runs left in `output` before this one starts; the path of the checkpoint to resume.

    Removes a killed save's debris, refuses --resume of a finished model, and (without a checkpoint to resume)
    removes an earlier run's snapshots. Only rank 0 touches the files.
    """
    main = dist.is_main()
    path = output / "checkpoint" / "state.pt"
    if main:
        _remove_debris(output)
    if resume and not path.exists():
        if (output / RUN_FILE).exists():
            raise ResumeError(f"nothing to resume: the model at {output} is finished; run without --resume to retrain")
        if main:
            print(f"note: --resume: no checkpoint at {path}; starting from scratch", file=sys.stderr)
    if main and not (resume and path.exists()) and (output / SNAPSHOTS).exists():
        # They belong to the model this run replaces; mixed with this run's they would mislead.
        print(f"note: removing the snapshots of an earlier run in {output / SNAPSHOTS}", file=sys.stderr)
        shutil.rmtree(output / SNAPSHOTS)
    return path


class Checkpoint:
    """`path` (`<output>/checkpoint/state.pt`): the training parts, step, RNG and run settings, plus the
    evaluations' state (`progress`: dev, evaluations, best, callbacks_due), in this order of keys."""

    def __init__(self, path: Path, settings: dict[str, Any], model: torch.nn.Module, modules: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, sampler: Any):
        self.path = path
        self.settings = settings
        self.parts = {"model": model, "modules": modules, "optimizer": optimizer, "scheduler": scheduler,
                      "sampler": sampler}
        self.saved = 0  # the step of the last checkpoint (of the one resumed from)

    def load(self, resume: bool, desc: str) -> tuple[int, dict[str, Any]]:
        """With `resume`, continue from the checkpoint if there is one (its settings must be the run's): its step
        and state; (0, {}) otherwise. Every rank reads it itself (the output folder must be shared by all)."""
        state: dict[str, Any] = {}
        if resume and self.path.exists():
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            _check_same_run(state.get("settings"), self.settings, self.path)
            for name, part in self.parts.items():
                part.load_state_dict(state[name])
            self.saved = state["step"]
            set_rng_state(state["rng"])
        dist.all_same(str(self.saved), f"the checkpoint step in {self.path} to resume {desc} from")
        return self.saved, state

    def save(self, step: int, progress: Mapping[str, Any]) -> None:
        """Write the checkpoint of `step` (rank 0; the others only note the step)."""
        if dist.is_main():
            _atomic_torch_save({**{name: part.state_dict() for name, part in self.parts.items()}, "step": step,
                                "rng": rng_state(), "settings": self.settings, **progress}, self.path)
        self.saved = step


def rng_state() -> dict[str, Any]:
    """Every generator a run draws from (Python, NumPy, torch, CUDA), as the checkpoint stores it."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng.get("cuda") is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _atomic_torch_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)


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
