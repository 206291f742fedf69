"""Models: loading teachers, tokenizers and students (`loading`), what a model computes as a hash (`identity`),
causal-LM students and metrics (`lm`), and students that are any torch module (`module_student`)."""

from __future__ import annotations

from stages.models.loading import (
    ModelError,
    load_tokenizer,
    load_model_config,
    check_head,
    load_classifier,
    load_causal_lm,
    student_from_teacher,
    student_from_config,
    num_layers,
    hidden_size,
    num_parameters,
    missing_folder,
)
from stages.models.bundled import BUNDLED_LM, models_home, bundled_lm_folder, resolve_model
from stages.models.identity import model_fingerprint, TEACHER_MEMOS, recorded_teachers, teacher_fingerprint
from stages.models.lm import ECE_BINS, causal_lm_student, lm_metrics, lm_scores, Top1, head_logits
from stages.models.module_student import (
    MODULE_FILE,
    WEIGHTS_FILE,
    ModuleStudent,
    BiLSTMClassifier,
    as_output,
    import_module_class,
    module_student,
    is_module_folder,
    load_module_student,
)

__all__ = ["ModelError", "load_tokenizer", "load_model_config", "check_head", "load_classifier", "load_causal_lm", "student_from_teacher", "student_from_config", "num_layers", "hidden_size", "num_parameters", "missing_folder", "BUNDLED_LM", "models_home", "bundled_lm_folder", "resolve_model", "model_fingerprint", "TEACHER_MEMOS", "recorded_teachers", "teacher_fingerprint", "ECE_BINS", "causal_lm_student", "lm_metrics", "lm_scores", "Top1", "head_logits", "MODULE_FILE", "WEIGHTS_FILE", "ModuleStudent", "BiLSTMClassifier", "as_output", "import_module_class", "module_student", "is_module_folder", "load_module_student"]
