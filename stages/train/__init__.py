"""The training loop (`loop`) and the torchrun helpers it uses (`dist`)."""

from __future__ import annotations

from stages.train.loop import (
    EpochSampler,
    TaskMix,
    TaskSampler,
    Objective,
    FitResult,
    fit,
    rank_share,
    pick_device,
    set_seed,
    save_model,
    write_model,
    write_run_record,
    replace_folder,
    load_callbacks,
    NonFiniteLossError,
    ResumeError,
    CallbackError,
    RUN_FILE,
    SNAPSHOTS,
)
from stages.train import dist

__all__ = ["EpochSampler", "TaskMix", "TaskSampler", "Objective", "FitResult", "fit", "rank_share", "pick_device", "set_seed", "save_model", "write_model", "write_run_record", "replace_folder", "load_callbacks", "NonFiniteLossError", "ResumeError", "CallbackError", "RUN_FILE", "SNAPSHOTS", "dist"]
