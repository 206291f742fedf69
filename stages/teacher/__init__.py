"""The teacher's side of a run: running it for its outputs, online or from the cache (`outputs`), the cache
address of those outputs (`address`), and what a causal-LM cache codec keeps of the teacher (`probe`)."""

from __future__ import annotations

from stages.teacher.outputs import teacher_outputs, CachedTeachers, OnlineTeachers
from stages.teacher.address import (
    cache_fields,
    cache_settings,
    CacheTarget,
    cache_target,
    teacher_folder_gone,
    teacher_memos,
    verify_cache_teacher,
)
from stages.teacher.probe import PROBE_KS, PROBE_SAMPLES, lm_cache_info, probe_codecs, recommend

__all__ = ["teacher_outputs", "CachedTeachers", "OnlineTeachers", "cache_fields", "cache_settings", "CacheTarget", "cache_target", "teacher_folder_gone", "teacher_memos", "verify_cache_teacher", "PROBE_KS", "PROBE_SAMPLES", "lm_cache_info", "probe_codecs", "recommend"]
