"""Several processes under `torchrun`: join the process group from its environment, ask who we are, wait.

Without torchrun (or with one process) nothing here starts a process group: rank 0 of 1, every call a no-op,
so the single-process stages run exactly as they did.
"""

from __future__ import annotations

import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from cache_format import KDError

__all__ = ["DistError", "TIMEOUT_ENV", "launched", "init", "rank", "world_size", "is_main", "barrier", "all_same",
           "all_reduce_sum", "all_reduce_mean", "destroy"]

TIMEOUT_ENV = "KD_DIST_TIMEOUT"  # seconds a rank waits for the others in a collective before the run fails
DEFAULT_TIMEOUT_S = 1800
_nccl = False  # whether the process group has NCCL (CUDA collectives then need this process's GPU)


class DistError(KDError):
    """The processes of a torchrun job disagree (settings, data, code) or cannot work on what they found."""


def launched() -> bool:
    """Whether torchrun started this process as one of several (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds > 0; set it to e.g. {DEFAULT_TIMEOUT_S}")
    return datetime.timedelta(seconds=seconds)


def init() -> bool:
    """Join the process group torchrun describes (once per process); False when there is none to join.

    gloo carries CPU tensors and NCCL CUDA ones (each process then uses GPU LOCAL_RANK; with fewer GPUs than
    processes on a machine, gloo carries everything). A collective that
    waits longer than KD_DIST_TIMEOUT seconds (default 1800) fails, so a rank that hangs or vanished takes the
    run down instead of stalling it. Ranks other than 0 draw no progress bars.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched():
        return False
    timeout = _timeout()
    global _nccl
    local = int(os.environ.get("LOCAL_RANK", "0"))
    _nccl = torch.cuda.is_available() and local < torch.cuda.device_count()  # else gloo, for CUDA tensors too
    if _nccl:
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if _nccl else "gloo", timeout=timeout)
    if dist.get_rank() != 0:
        os.environ["KD_PROGRESS"] = "0"  # one bar per job (rank 0's), not one per process
    return True


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """The number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process writes the job's outputs (rank 0; always true without torchrun)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group)."""
    if _active():
        dist.barrier(device_ids=[torch.cuda.current_device()] if _nccl else None)


def all_same(value: str, what: str) -> None:
    """Raise DistError on every rank unless all ranks pass the same `value` (compared by hash).

    `what` names the value for the message, e.g. "the cache settings of teacher models/teacher".
    """
    if not _active():
        return
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, digest)
    odd = [r for r, d in enumerate(found) if d != found[0]]
    if odd:
        raise DistError(f"the torchrun ranks disagree on {what} (rank(s) {', '.join(map(str, odd))} differ from "
                        "rank 0); give every rank the same params, data and code")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, in place (unchanged without a process group)."""
    if _active():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """`t` averaged over the ranks, in place (unchanged without a process group)."""
    if _active():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def destroy() -> None:
    """Leave the process group (no-op without one)."""
    if _active():
        dist.destroy_process_group()
