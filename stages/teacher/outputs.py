"""What a teacher contributes to distillation, computed once (precompute) or live (online mode).

`teacher_outputs` is the single definition of the teacher signal: precompute writes exactly
what it returns, and online distillation feeds exactly what it returns to the losses. That is
what makes cached and online distillation give the same student. Every task kind's online signal
goes through it, a causal LM's full logits included (`TeacherSpec.full_logits`).
"""

from __future__ import annotations

import ctypes
from typing import Iterator, Sequence

import numpy as np
import torch

import cache_format as cf
from stages.data import Encoded, collate
from stages.tasks import Task
from stages.tasks import TORCH_DTYPES
from stages.tasks import TeacherSpec

__all__ = ["teacher_outputs", "CachedTeachers", "OnlineTeachers"]


def teacher_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: TeacherSpec, task: Task,
                    ids: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run the teacher on a padded batch of rows `ids`; return the task's signal (`logits` for most kinds,
    `Task.teacher_signal`), `hidden.{i}`, `attention.{i}` (padded, on the device, in the spec's dtype) and
    `length` (per row, the positions of the ragged axis)."""
    out = task.teacher_forward(model, batch, hidden=bool(spec.hidden_layers), attentions=bool(spec.attention_layers))
    dtype = TORCH_DTYPES[spec.dtype]
    res: dict[str, torch.Tensor] = {"length": task.lengths(batch)}
    if spec.logits:
        res.update(task.teacher_signal(model, out, batch, ids, spec))
    for i in spec.hidden_layers:
        h = out.hidden_states[i]
        res[f"hidden.{i}"] = (h[:, 0] if spec.hidden_tokens == "first" else h).float().to(dtype)
    for i in spec.attention_layers:
        res[f"attention.{i}"] = out.attentions[i].float().to(dtype)
    if spec.store_input_ids:
        res["input_ids"] = batch["input_ids"].to(torch.int32)
    return res


def _pad_time(x: torch.Tensor, t: int, axes: Sequence[int]) -> torch.Tensor:
    """Pad (zeros) or cut tensor `x` to length `t` on each axis in `axes`."""
    for ax in axes:
        cur = x.shape[ax]
        if cur > t:
            x = x.narrow(ax, 0, t)
        elif cur < t:
            shape = list(x.shape)
            shape[ax] = t - cur
            x = torch.cat([x, x.new_zeros(shape)], dim=ax)
    return x


def _time_axes(name: str) -> tuple[int, ...]:
    # Axes (with the batch axis first) that run over tokens and are padded per batch.
    if name.startswith("attention."):
        return (2, 3)
    return (1,)


def _return_large_frees_to_the_os() -> None:
    """Make glibc serve allocations over 1 MiB with mmap, so freeing them returns the memory.

    Batches are allocated on the prefetch thread and freed on the training thread; with glibc's
    default adaptive threshold that fragments the heap and resident memory grows with the number
    of steps (bench/memory.py: +543 MiB over a run, vs +71 MiB with this setting).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; setting it also turns off the adaptive threshold
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        pass


class CachedTeachers:
    """Streams cached teacher outputs for batches of ids, prefetched on a background thread."""

    def __init__(self, readers: Sequence[cf.CacheReader], fields: Sequence[str], device: torch.device,
                 prefetch: int = 4):
        _return_large_frees_to_the_os()
        self.readers = list(readers)
        self.fields = list(fields)
        self.device = device
        self.prefetch = prefetch
        self._ragged = {f for f in self.fields if "T" in self.readers[0].fields[f].shape}
        self._iters: list[Iterator[dict]] = []

    def start(self, id_batches: Sequence[Sequence[str]]) -> None:
        pin = self.device.type == "cuda"  # pinned host memory makes the copy to the GPU asynchronous
        self._iters = [r.prefetch(id_batches, fields=self.fields, depth=self.prefetch, torch=True) for r in self.readers]
        self._pin = pin

    def next(self, seq_len: int) -> list[dict[str, torch.Tensor]]:
        """Outputs of each teacher for the next batch, token axes padded/cut to `seq_len`."""
        res = []
        for it in self._iters:
            got = next(it)
            outs = {}
            for f in self.fields:
                x = got[f]
                if x.dtype == torch.uint16:  # narrow LM token ids: CUDA cannot index with (or by) uint16
                    x = x.to(torch.int32)
                if self._pin:
                    x = x.pin_memory()
                x = x.to(self.device, non_blocking=True)
                if f in self._ragged:
                    x = _pad_time(x, seq_len, _time_axes(f))
                outs[f] = x
            outs["length"] = got["length"]
            res.append(outs)
        return res

    def close(self) -> None:
        for it in self._iters:
            close = getattr(it, "close", None)
            if close:
                close()
        self._iters = []


class OnlineTeachers:
    """Runs the teachers live on each batch (online mode): the same outputs a cache would hold, or with
    `spec.full_logits` a causal LM's full next-token logits (what the online LM losses read; no cache holds them)."""

    def __init__(self, models: Sequence[torch.nn.Module], encodings: Sequence[Encoded], spec: TeacherSpec,
                 device: torch.device, task: Task):
        self.task = task
        self.models = [m.to(device).eval() for m in models]
        self.encodings = list(encodings)
        self.rows = [{i: r for r, i in enumerate(e.ids)} for e in self.encodings]
        self.spec = spec
        self.device = device
        self._batches: Iterator[Sequence[str]] = iter(())

    def start(self, id_batches: Sequence[Sequence[str]]) -> None:
        self._batches = iter(id_batches)

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved for the student's backward
    def next(self, seq_len: int) -> list[dict[str, torch.Tensor]]:
        ids = next(self._batches)
        res = []
        for model, enc, rows in zip(self.models, self.encodings, self.rows):
            batch, _ = collate(enc, np.fromiter((rows[i] for i in ids), dtype=np.int64, count=len(ids)))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            outs = teacher_outputs(model, batch, self.spec, self.task, ids)
            outs = {k: _pad_time(v, seq_len, _time_axes(k)) if v.dim() > 2 else v for k, v in outs.items()}
            outs["length"] = outs["length"].cpu()
            res.append(outs)
        return res

    def close(self) -> None:
        self._batches = iter(())
