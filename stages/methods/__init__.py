"""Distillation methods, one module each, all built on the training loop: logit/feature KD (`kd`), language models
(`lm`), BERT-of-Theseus (`theseus`), FastBERT (`fastbert`), multi-task (`multitask`); each starts with
`common.start_method` (outputs checked, data read, device picked, run seeded)."""

from __future__ import annotations

from stages.methods.common import MethodStart, configured_teachers, start_method
from stages.methods.kd import (
    DistillResult,
    DistillObjective,
    build_student,
    distill_kd,
    distill_batches,
    distill_objective,
    distill_settings,
    load_distill_data,
    logit_terms,
    write_metrics,
)
from stages.methods.lm import distill_lm, LMObjective
from stages.methods.theseus import TheseusModel, TheseusObjective, replace_probability, replace_mask, distill_theseus
from stages.methods.fastbert import (
    FastBertError,
    BranchClassifier,
    FastBert,
    FastBertOutput,
    normalized_entropy,
    check_speed,
    SelfDistillation,
    exit_scores,
    predict_exits,
    speed_curve,
    write_fastbert,
    save_fastbert,
    load_fastbert,
    is_fastbert,
    distill_fastbert,
    curve_rows,
    write_curve,
    CONFIG_FILE,
    BRANCHES_FILE,
)
from stages.methods.multitask import MultiTaskStudent, MultiTaskObjective, distill_tasks, share_encoder

__all__ = ["MethodStart", "configured_teachers", "start_method", "DistillResult", "DistillObjective", "build_student", "distill_kd", "distill_batches", "distill_objective", "distill_settings", "load_distill_data", "logit_terms", "write_metrics", "distill_lm", "LMObjective", "TheseusModel", "TheseusObjective", "replace_probability", "replace_mask", "distill_theseus", "FastBertError", "BranchClassifier", "FastBert", "FastBertOutput", "normalized_entropy", "check_speed", "SelfDistillation", "exit_scores", "predict_exits", "speed_curve", "write_fastbert", "save_fastbert", "load_fastbert", "is_fastbert", "distill_fastbert", "curve_rows", "write_curve", "CONFIG_FILE", "BRANCHES_FILE", "MultiTaskStudent", "MultiTaskObjective", "distill_tasks", "share_encoder"]
