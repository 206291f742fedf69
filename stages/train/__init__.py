"""The training loop (`loop`: `fit`) and its parts: batches (`samplers`), checkpoints and output folders
(`checkpoints`), evaluations (`evaluation`), user callbacks (`callbacks`), the finished model's folder
(`saving`), and the torchrun helpers (`dist`)."""

from __future__ import annotations

from stages.train.samplers import Sampler, EpochSampler, TaskMix, TaskSampler, rank_share, collate_fn
from stages.train.checkpoints import RUN_FILE, SNAPSHOTS, ResumeError, replace_folder
from stages.train.callbacks import CallbackError, load_callbacks
from stages.train.loop import Objective, FitResult, NonFiniteLossError, fit, pick_device, set_seed
from stages.train.saving import save_model, write_model, write_run_record
from stages.train import dist

__all__ = ["Sampler", "EpochSampler", "TaskMix", "TaskSampler", "rank_share", "collate_fn", "RUN_FILE", "SNAPSHOTS", "ResumeError", "replace_folder", "CallbackError", "load_callbacks", "Objective", "FitResult", "NonFiniteLossError", "fit", "pick_device", "set_seed", "save_model", "write_model", "write_run_record", "dist"]
