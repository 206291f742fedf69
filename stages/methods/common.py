"""The start every `kd distill` method shares: outputs checked, the data read, then the device and the seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from stages._io import check_outputs
from stages.config import Config
from stages.train import pick_device, set_seed

__all__ = ["MethodStart", "start_method", "configured_teachers"]

T = TypeVar("T")


@dataclass(frozen=True)
class MethodStart:
    """What a method starts from: `distill.output`, the configured teachers (`configured_teachers`) and the
    device; the global random generators are seeded with `distill.seed`."""

    output: Path
    teachers: list[str]
    device: torch.device


def configured_teachers(cfg: Config) -> list[str]:
    """The teachers of a run: distill.teachers, else precompute.teachers (those whose caches precompute wrote)."""
    return cfg.distill.teachers or cfg.precompute.teachers


def start_method(cfg: Config, load: Callable[[], T]) -> tuple[MethodStart, T]:
    """Check that every output is writable, run `load` (the method's data and caches: their errors must not cost
    a model load), then pick the device and seed the run (the student's random parts depend on it).

    Returns the start and what `load` returned."""
    d = cfg.distill
    output = Path(d.output)
    check_outputs({"distill.output": (output, "model"), "distill.metrics": (d.metrics, "file"),
                   "distill.log_dir": (d.log_dir, "folder")})
    loaded = load()
    device = pick_device()
    set_seed(d.seed)
    return MethodStart(output, configured_teachers(cfg), device), loaded
