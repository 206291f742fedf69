"""The cache address of a teacher's outputs: (teacher identity, data fingerprint, settings) -> folder, and its fields.

Precompute, distill, evaluate and `kd cache` all find a teacher's cache through `cache_target`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


import cache_format as cf
from cache_format import is_remote, join_path, parent_path
from cache_format import load_manifest
from stages._io import cache_home
from stages.config import Config
from stages.data import Examples, data_fingerprint
from stages.models import (TEACHER_MEMOS, load_model_config, missing_folder, recorded_teachers,
                           teacher_fingerprint)
from stages.tasks import Task, get_task
from stages.models import resolve_model
from stages.tasks import TeacherSpec

__all__ = ["cache_fields", "cache_settings", "CacheTarget", "cache_target", "teacher_folder_gone", "teacher_memos",
           "verify_cache_teacher"]


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
    return CacheTarget(join_path(p.cache_root, name), tfp, dfp, settings, p.format)


def teacher_memos(cache_root: str | os.PathLike) -> Path:
    """The teacher fingerprint memos of a cache root: next to its caches, or for a root on an object store in the
    local cache home (a memo records local file sizes and mtimes)."""
    if is_remote(cache_root):
        return cache_home() / "teacher-memos"
    return Path(cache_root) / TEACHER_MEMOS


def teacher_folder_gone(teacher: str, cache: str | os.PathLike, fingerprint: str) -> bool:
    """True when `teacher` names a teacher folder that is gone, so the teacher of `cache` cannot be checked.

    A path (absolute, `./x`, `models/x`) that no longer exists is gone. So is a bare name ("teacher") that is
    no folder now but was where the teacher of `fingerprint` was found when the cache was made: precompute
    memoises each teacher folder's resolved path in `teacher_memos` of the cache's root. Any other bare name
    is a hub name.
    """
    src = resolve_model(teacher)
    if missing_folder(src):
        return True
    path = Path(src).expanduser()
    if path.exists():
        return False
    return str(path.resolve()) in recorded_teachers(teacher_memos(parent_path(cache)), fingerprint)


def verify_cache_teacher(cache: str | os.PathLike, teacher: str | None = None) -> list[str]:
    """Problems found by hashing the teacher of `cache` in full against its manifest (`kd cache verify --deep`).

    `teacher` (a path, hub name or `bundled:...`) defaults to the folders recorded for the cache's teacher
    fingerprint in `<cache root>/.teachers`. Refreshes those memos, so a later cheap check sees the result.
    """
    manifest = load_manifest(cache)
    memos = teacher_memos(parent_path(cache))
    teachers = [teacher] if teacher else recorded_teachers(memos, manifest.teacher_fingerprint)
    if not teachers:
        return [f"no teacher is recorded for this cache in {memos}; pass the teacher with --teacher PATH"]
    problems = []
    for t in teachers:
        if teacher_folder_gone(t, cache, manifest.teacher_fingerprint):
            problems.append(f"teacher folder {t} is gone; pass the teacher with --teacher PATH")
            continue
        found = teacher_fingerprint(resolve_model(t), memos, rehash=True)
        if found != manifest.teacher_fingerprint:
            problems.append(f"teacher {t} hashes to {found}, not to the cache's teacher fingerprint "
                            f"{manifest.teacher_fingerprint}: it changed since precompute (rerun `kd precompute`) "
                            "or is another teacher")
    return problems
