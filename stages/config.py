"""Typed settings for every stage, parsed from `params.yaml` (the file dvc.yaml reads).

The pydantic models below hold every default, and those defaults are the shipped demo's values:
an empty params file and the shipped `params.yaml` mean the same (tests/test_config_rules.py
checks it). `load_config` reports every problem at once (unknown keys, wrong types, values out of
range, settings that have no effect, impossible combinations), each naming the dotted key and the
valid values or the fix. This module must stay light: no torch (the kinds come from stages/kinds.py).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, JsonValue, ValidationError, ValidatorFunctionWrapHandler,
                      WrapValidator, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from cache_format import KDError
from stages.kinds import (KD_KINDS, LM_CODECS, LM_LOSSES, MATCH_ALIASES, MATCH_KINDS, PRESETS, PROJECTIONS,
                          TASK_KINDS, TOPK_TAILS, ULD_CODEC)

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "PrepareConfig",
    "TrainingConfig",
    "TrainTeacherConfig",
    "PrecomputeConfig",
    "LMCacheConfig",
    "LMDistillConfig",
    "StudentConfig",
    "KDConfig",
    "MatchConfig",
    "TheseusConfig",
    "DistillConfig",
    "FastBertConfig",
    "EvaluateConfig",
    "AugmentConfig",
    "AugmentOps",
    "TaskConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "lm_codec_problem",
    "lm_temperature_problem",
]

BUNDLED_TEACHER = "bundled:all-MiniLM-L6-v2"
BUNDLED_DATA = "bundled:rotten_tomatoes"
BUNDLED_TRANSFER = "bundled:imdb_sentences"  # movie-review sentences: the demo's transfer set
BUNDLED_GENERAL_TRANSFER = "bundled:ptb_sentences"  # Penn Treebank news sentences: general text
TRANSFER_SOURCES = (BUNDLED_TRANSFER, BUNDLED_GENERAL_TRANSFER)

# Why precompute.lm.proposal_temperature < 1 is refused, as measured by bench/lm_proposal.py (see
# docs/language-models.md): a proposal sharper than the teacher rarely draws its tail, so the few tail draws carry
# huge importance weights p/q and the estimate's variance grows.
PROPOSAL_BELOW_1 = ("a proposal sharper than the teacher gives its rarely drawn ids importance weights p/q = "
                    "Z p^(1 - 1/tau) that grow without bound as p falls; bench/lm_proposal.py (V = 1000 Zipf-like "
                    "teacher, 12 draws, 20,000 encodings, 3 seeds) measured a largest p/q of 577 and a gradient "
                    "variance 38-177x that at tau = 1 for tau = 0.5 (13 and 2.3-4.6x for 0.7)")


class ConfigError(KDError, ValueError):
    """One or more settings are wrong; the message lists each with its key and the fix."""


# ----------------------------------------------------------------------------- field types

_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _yaml_float(value: Any) -> Any:
    # PyYAML follows YAML 1.1, which reads 5e-4 (no dot) as a string; users and `dvc exp run -S` write it.
    if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _layer_or_layers(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # One message for the union instead of one per member ("int", "list[int]").
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("layer_type", "expected a layer index or a list of them, got {got}",
                                  {"got": repr(value)}) from None


# Models are strict (an int setting refuses 2.0, "2" and true); floats also take YAML 1.1 strings.
Float = Annotated[float, BeforeValidator(_yaml_float)]
Layer = Annotated[int | list[int], WrapValidator(_layer_or_layers)]
Schedule = Literal["constant", "linear_decay", "linear_growth"]
Split = Literal["train", "dev", "test"]


Problem = tuple[str, str]  # (key relative to the section, "" for the section itself; what is wrong + fix)


class _Problems(ValueError):
    """What `_check` found; pydantic passes it on as a value_error and `_messages` adds the section's key."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems = problems


class _Section(BaseModel):
    """A frozen group of settings; unknown keys are errors and `_check` adds the value rules."""

    # validate_default: a default such as `epochs = 3` becomes 3.0 like a parsed one, so
    # config_to_dict gives the same output (and fingerprint) whether a key was given or not.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    def _check(self) -> list[Problem]:
        """Values that are out of range or wrong together, as (key, problem and fix)."""
        return []

    @model_validator(mode="after")
    def _run_check(self) -> "_Section":
        # Runs only when every field of this section parsed, so `_check` sees well-typed values.
        problems = self._check()
        if problems:
            raise _Problems(problems)
        return self


# ----------------------------------------------------------------------------- sections


class DataConfig(_Section):
    """Where the labelled splits are and which columns to read."""

    train: str = "data/train.csv"
    dev: str | None = "data/dev.csv"
    test: str | None = "data/test.csv"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str | None = "label"
    id_field: str | None = "id"
    num_labels: int = 2
    label_names: list[str] | None = None
    # None by default; the demo's params.yaml sets data/transfer.csv (the set `kd prepare` builds).
    transfer: str | None = None
    # The task kind (stages/tasks/<kind>.py) and the options only some kinds read (None: the kind's default;
    # TASK_KINDS says which kind reads which, and setting one another kind ignores is an error).
    task: Literal[tuple(TASK_KINDS)] = "sequence_classification"  # type: ignore[valid-type]
    label_delimiter: str | None = None  # multi_label: labels in one string, e.g. "sports|politics"
    threshold: Float | None = None  # multi_label: a label is predicted when its probability is >= this (0.5)
    tokens_field: str | None = None  # token_classification: the list-of-words column ("tokens")
    tags_field: str | None = None  # token_classification: the list-of-tags column ("tags")
    label_all_subwords: bool | None = None  # token_classification: train every sub-token on its word's tag
    question_field: str | None = None  # extractive_qa ("question")
    context_field: str | None = None  # extractive_qa ("context")
    answers_field: str | None = None  # extractive_qa ("answers": {"text": [...], "answer_start": [...]})
    doc_stride: int | None = None  # extractive_qa: tokens shared by consecutive windows (min(128, max_length // 3))
    max_answer_length: int | None = None  # extractive_qa: longest answer span predicted, in tokens (30)

    def _check(self) -> list[Problem]:
        errs = []
        kind = TASK_KINDS[self.task]
        for key in sorted(k for ks in (t.options for t in TASK_KINDS.values()) for k in ks):
            if getattr(self, key) is not None and key not in kind.options:
                users = [name for name, t in TASK_KINDS.items() if key in t.options]
                errs.append((key, f"only applies to data.task: {' or '.join(users)}, not {self.task}; remove it"))
        if kind.regression and self.label_names is not None:
            errs.append(("label_names", "a regression target is a number, it has no label names; remove it"))
        if kind.language_model:
            for key in ("label_names", "text_pair_field"):
                if getattr(self, key) is not None:
                    errs.append((key, f"{self.task} predicts the next token of one text, it reads no "
                                 f"{key}; remove it"))
        elif kind.windows and self.label_names is not None:
            errs.append(("label_names", f"{self.task} predicts spans, it has no label names; remove it"))
        if self.transfer is not None and not kind.transfer:
            errs.append(("transfer", f"an unlabelled transfer set is not supported for data.task: {self.task} "
                         "yet (sequence_classification only); remove it"))
        if self.threshold is not None and not 0 < self.threshold < 1:
            errs.append(("threshold", f"must be in (0, 1) (got {self.threshold})"))
        for key in ("doc_stride", "max_answer_length"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                errs.append((key, f"must be >= 1 (got {getattr(self, key)})"))
        if self.num_labels < 2 and not kind.regression:
            errs.append(("num_labels", f"must be >= 2 (got {self.num_labels})"))
        if self.label_names is not None:
            names = self.label_names
            if len(names) != self.num_labels:
                errs.append(("label_names", f"{len(names)} names for data.num_labels: {self.num_labels}; "
                             "give one name per class, in label-id order, or fix num_labels"))
            if any(not n.strip() for n in names):
                errs.append(("label_names", f"names must be non-empty (got {names})"))
            dups = sorted({n for n in names if names.count(n) > 1})
            if dups:
                errs.append(("label_names", f"{dups} listed more than once; each class needs its own name"))
        return errs


class PrepareConfig(_Section):
    """`kd prepare`: split a source file into train/dev/test with a recorded, seeded split."""

    source: str | None = BUNDLED_DATA  # None: nothing to split (the data.* files exist); prepare checks them
    filter: dict[str, str] = {}
    fractions: dict[str, Float] = {"train": 0.8, "dev": 0.1, "test": 0.1}
    max_examples: int | None = None
    seed: int = 13
    out_dir: str = "data"
    # Used whenever it is set, whatever `source` is: the demo's params.yaml sets bundled:imdb_sentences.
    transfer_source: str | None = None
    transfer_examples: int = 30000

    def _check(self) -> list[Problem]:
        errs = []
        if self.transfer_source and self.transfer_source.startswith("bundled:") \
                and self.transfer_source not in TRANSFER_SOURCES:
            errs.append(("transfer_source", f"{self.transfer_source!r} is not a bundled transfer source; use "
                         f"{' or '.join(TRANSFER_SOURCES)}, a file of texts, or null for none"))
        if self.transfer_examples < 1:
            errs.append(("transfer_examples", f"must be >= 1 (got {self.transfer_examples})"))
        if self.source is None:
            for key in ("filter", "fractions", "max_examples", "seed"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    errs.append((key, "only applies when prepare.source names something to split (it is null); "
                                 "remove it"))
        if set(self.fractions) - {"train", "dev", "test"} or "train" not in self.fractions:
            errs.append(("fractions", f"keys must be train and optionally dev, test (got {sorted(self.fractions)})"))
        if any(v <= 0 for v in self.fractions.values()) or abs(sum(self.fractions.values()) - 1) > 1e-6:
            errs.append(("fractions", f"values must be > 0 and sum to 1 (got {dict(self.fractions)})"))
        return errs


class TrainingConfig(_Section):
    """Optimisation settings shared by train-teacher and distill (one training loop for both)."""

    max_length: int = 64
    epochs: Float = 3
    batch_size: int = 32
    lr: Float = 5e-5
    weight_decay: Float = 0.01
    warmup_ratio: Float = 0.1
    grad_accum: int = 1
    max_grad_norm: Float | None = 1.0
    seed: int = 42
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_batch_size: int = 128
    group_by_length: bool = True
    checkpoint_every: int = 0
    resume: bool = False
    # Evaluation, snapshots and callbacks (README "Callbacks, evaluation steps and snapshots").
    eval_every: int = 0  # dev evaluation every N optimizer steps and at the end (0: end of each epoch)
    keep_best: str | None = None  # save the model with the best dev metric: `accuracy` (higher), `min:loss` (lower)
    snapshots: bool = False  # a save_pretrained folder <output>/snapshots/gs{step} at each evaluation
    callbacks: list[str] = []  # `package.module:function`s called as fn(step=, metrics=, model=) after each one

    def _check(self) -> list[Problem]:
        errs = []
        for name in ("max_length", "batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, name) < 1:
                errs.append((name, f"must be >= 1 (got {getattr(self, name)})"))
        if self.epochs <= 0:
            errs.append(("epochs", f"must be > 0 (got {self.epochs})"))
        if self.lr <= 0:
            errs.append(("lr", f"must be > 0 (got {self.lr})"))
        if not 0 <= self.warmup_ratio < 1:
            errs.append(("warmup_ratio", f"must be in [0, 1) (got {self.warmup_ratio})"))
        if self.checkpoint_every < 0:
            errs.append(("checkpoint_every", "must be >= 0 steps, 0 = end of each epoch only"))
        if self.eval_every < 0:
            errs.append(("eval_every", "must be >= 0 steps, 0 = end of each epoch only"))
        if self.keep_best is not None and not re.fullmatch(r"(min:)?[^:\s]+", self.keep_best):
            errs.append(("keep_best", f"{self.keep_best!r} is not a metric name; write a dev metric (higher is "
                         "better, e.g. accuracy) or min:<metric> (lower is better, e.g. min:loss)"))
        for i, path in enumerate(self.callbacks):
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", path):
                errs.append((f"callbacks[{i}]", f"{path!r} is not an import path; write package.module:function"))
        return errs


class TrainTeacherConfig(TrainingConfig):
    """`kd train-teacher`: supervised fine-tuning of the teacher (a path or hub name + a new head)."""

    epochs: Float = 2
    model: str = BUNDLED_TEACHER
    output: str = "models/teacher"
    metrics: str = "metrics/teacher_train.json"


class LMCacheConfig(_Section):
    """`precompute.lm`: what a causal_lm cache stores per token (data.task causal_lm only; stages/tasks/lm_codecs.py)."""

    codec: Literal[tuple(LM_CODECS)] = "topk"  # type: ignore[valid-type]  # the codecs come from the registry
    # The capture temperature: every codec stores the teacher's softmax of logits / temperature (part of the cache's
    # identity). A causal_lm distill.kd.temperature left unset takes this value.
    temperature: Float = 1.0
    k: int = 32  # topk: ids kept per token
    samples: int = 12  # sampled: ids drawn per token (stored as unique ids with counts)
    proposal_temperature: Float = 1.0  # sampled: draw from q ~ p^(1/proposal_temperature); >= 1 (PROPOSAL_BELOW_1)
    max_dense_vocab: int = 4096  # dense: refused for a larger vocabulary
    seed: int = 0  # sampled: with the row id, seeds each row's draws

    def _check(self) -> list[Problem]:
        errs = []
        for name in ("k", "max_dense_vocab"):
            if getattr(self, name) < 1:
                errs.append((name, f"must be >= 1 (got {getattr(self, name)})"))
        if not 1 <= self.samples <= 255:  # counts are stored as uint8
            errs.append(("samples", f"must be in [1, 255] (got {self.samples})"))
        if not 0 < self.temperature < float("inf"):
            errs.append(("temperature", f"must be a finite number > 0 (got {self.temperature})"))
        if self.proposal_temperature <= 0:
            errs.append(("proposal_temperature", f"must be > 0 (got {self.proposal_temperature})"))
        elif self.proposal_temperature < 1:
            errs.append(("proposal_temperature", f"{self.proposal_temperature} is below 1: {PROPOSAL_BELOW_1}; "
                         "use 1 (draw from the teacher itself) or more"))
        # A setting another codec reads would silently do nothing (compared with the default: a dumped
        # config that lists every key must parse again).
        users = {key: name for name, codec in LM_CODECS.items() for key in codec.options}
        for key, codec in users.items():
            if self.codec != codec and getattr(self, key) != type(self).model_fields[key].default:
                errs.append((key, f"only applies to codec: {codec}, not {self.codec}; remove it"))
        return errs


class PrecomputeConfig(_Section):
    """`kd precompute`: run each teacher once over a split and cache its outputs."""

    teachers: list[str] = ["models/teacher"]
    split: Split = "train"
    cache_root: str = "caches"
    batch_size: int = 64
    max_length: int = 64
    logits: bool = True
    hidden_layers: list[int] = []
    hidden_tokens: Literal["all", "first"] = "all"
    attention_layers: list[int] = []
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    store_input_ids: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    commit_examples: int = 20000
    commit_seconds: Float = 60.0
    format: Literal["arrow", "zarr"] = "arrow"  # shard format of new caches (README "Cache formats: Arrow or Zarr")
    lm: LMCacheConfig = LMCacheConfig()  # data.task causal_lm only

    def _check(self) -> list[Problem]:
        errs = []
        if not self.teachers:
            errs.append(("teachers", "list at least one teacher model path"))
        for name in ("batch_size", "max_length"):
            if getattr(self, name) < 1:
                errs.append((name, f"must be >= 1 (got {getattr(self, name)})"))
        for name in ("hidden_layers", "attention_layers"):
            if any(i < 0 for i in getattr(self, name)):
                errs.append((name, f"layer indices must be >= 0 (got {getattr(self, name)})"))
        if not (self.logits or self.hidden_layers or self.attention_layers):
            errs.append(("", "nothing to cache; set logits: true or list hidden_layers/attention_layers"))
        return errs


_STUDENT_MODES = ("from_teacher", "pretrained", "config", "module")
_STUDENT_SIZES = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads")


class StudentConfig(_Section):
    """How the student is built: exactly one of from_teacher (with keep_layers), pretrained,
    config (random init, resized by num_layers, hidden_size, intermediate_size, num_heads), or
    module (any torch.nn.Module class by import path, built with module_kwargs; stages/models/module_student.py).

    A key that the chosen way ignores is an error, so a leftover size never silently does nothing.
    """

    from_teacher: str | None = None
    keep_layers: list[int] | None = None
    pretrained: str | None = None
    config: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None  # causal LMs with grouped-query attention: key/value heads (divides num_heads)
    module: str | None = None  # `package.module:Class`, a torch.nn.Module (README "Students that are not ...")
    module_kwargs: dict[str, JsonValue] = {}  # the class's keyword arguments (JSON values: saved with the model)

    def _check(self) -> list[Problem]:
        chosen = [k for k in _STUDENT_MODES if getattr(self, k)]
        if len(chosen) != 1:
            return [("", "set exactly one of from_teacher (keep_layers of a teacher), pretrained (a model path), "
                     "config (a config path/name, random init) or module (package.module:Class, any "
                     f"torch.nn.Module); got {chosen or 'none'}")]
        mode, errs = chosen[0], []
        if mode == "module" and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", self.module):
            errs.append(("module", f"{self.module!r} is not an import path; write package.module:Class"))
        if mode != "module" and self.module_kwargs:
            errs.append(("module_kwargs", f"only applies to module, not to {mode}; remove it"))
        if mode == "from_teacher" and not self.keep_layers:
            errs.append(("keep_layers", "from_teacher needs the teacher blocks to keep, e.g. [0, 5]"))
        if mode != "from_teacher" and self.keep_layers is not None:
            errs.append(("keep_layers", f"only applies to from_teacher, not to {mode}; remove it"))
        if self.keep_layers and min(self.keep_layers) < 0:
            errs.append(("keep_layers", f"block indices must be >= 0 (got {self.keep_layers})"))
        for key in _STUDENT_SIZES:
            value = getattr(self, key)
            if value is None:
                continue
            if mode != "config":
                errs.append((key, f"only applies to config: (a random-init student); {mode} keeps the "
                             "model's own size, so remove it"))
            elif value < 1:
                errs.append((key, f"must be >= 1 (got {value})"))
        return errs


class KDConfig(_Section):
    """Knowledge distillation on logits plus the hard-label term."""

    loss: Literal[KD_KINDS] = "kl"  # type: ignore[valid-type]  # the kinds come from the registry
    weight: Float = 1.0
    weight_schedule: Schedule = "constant"
    temperature: Float = 4.0
    temperature_squared: bool = True
    temperature_schedule: Literal["constant", "flsw", "cwsm"] = "constant"
    flsw_beta: Float = 1.0
    flsw_gamma: Float = 1.0
    cwsm_beta: Float = 1.0
    probability_shift: bool = False
    hard_weight: Float = 1.0
    hard_weight_schedule: Schedule = "constant"
    teacher_combine: Literal["logits", "probs"] = "logits"
    teacher_weights: list[Float] | None = None

    def _check(self) -> list[Problem]:
        errs = []
        if self.temperature <= 0:
            errs.append(("temperature", f"must be > 0 (got {self.temperature})"))
        for name in ("weight", "hard_weight"):
            if getattr(self, name) < 0:
                errs.append((name, f"must be >= 0 (got {getattr(self, name)})"))
        if self.teacher_weights is not None and any(w < 0 for w in self.teacher_weights):
            errs.append(("teacher_weights", f"weights must be >= 0 (got {self.teacher_weights})"))
        return errs


class MatchConfig(_Section):
    """One intermediate match between a teacher layer and a student layer (kinds: stages/kinds.py).

    TextBrewer's aliases (`gram`, `nst`) become their kind's one name here, on load.
    """

    kind: Literal[tuple(MATCH_KINDS)]  # type: ignore[valid-type]
    teacher_layer: Layer
    student_layer: Layer
    weight: Float = 1.0
    projection: Literal[PROJECTIONS] | None = None  # type: ignore[valid-type]
    projection_lr: Float | None = None  # the projection's own learning rate (None: the student's distill.lr)

    @field_validator("kind", mode="before")
    @classmethod
    def _resolve_alias(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in MATCH_KINDS:
            if value not in MATCH_ALIASES:
                kinds = [repr(k) for k in MATCH_KINDS]
                aliases = ", ".join(f"{a!r} = {k!r}" for a, k in MATCH_ALIASES.items())
                # The literal error's wording, plus the aliases.
                raise PydanticCustomError("match_kind", "{got} is not one of {kinds} (aliases: {aliases})", {
                    "got": repr(value), "kinds": ", ".join(kinds[:-1]) + " or " + kinds[-1], "aliases": aliases})
            return MATCH_ALIASES[value]
        return value

    def _check(self) -> list[Problem]:
        kind, errs = MATCH_KINDS[self.kind], []
        for side in ("teacher_layer", "student_layer"):
            layer = getattr(self, side)
            if kind.pair and not (isinstance(layer, list) and len(layer) == 2):
                errs.append((side, f"{self.kind} takes a pair of layers [a, b], got {layer!r}"))
            elif not kind.pair and not isinstance(layer, int):
                errs.append((side, f"{self.kind} takes one layer index, got {layer!r}"))
            elif min(_layers(layer)) < 0:
                errs.append((side, f"layer indices must be >= 0, got {layer!r}"))
        if self.weight < 0:
            errs.append(("weight", f"must be >= 0 (got {self.weight})"))
        if self.projection is not None and kind.feature == "attention":
            errs.append(("projection", f"{self.kind} compares attention maps, which have no width to "
                         "project; remove projection"))
        if self.projection_lr is not None and self.projection is None:
            errs.append(("projection_lr", "only applies with a projection; set projection: linear (or relu/tanh) "
                         "or remove projection_lr"))
        if self.projection_lr is not None and self.projection_lr <= 0:
            errs.append(("projection_lr", f"must be > 0 (got {self.projection_lr}), or null for the student's lr"))
        return errs


def _layers(layer: int | list[int]) -> list[int]:
    return layer if isinstance(layer, list) else [layer]


class FastBertConfig(_Section):
    """`distill.method: fastbert`: branch classifiers on a fine-tuned backbone (FastBERT, arXiv 2004.02178)."""

    backbone: str | None = None  # the fine-tuned classifier that gets branches (None: the first teacher)
    branch_width: int = 128  # the paper's student classifier: 128 wide, 2 attention heads
    branch_heads: int = 2

    def _check(self) -> list[Problem]:
        errs = []
        for name in ("branch_width", "branch_heads"):
            if getattr(self, name) < 1:
                errs.append((name, f"must be >= 1 (got {getattr(self, name)})"))
        if not errs and self.branch_width % self.branch_heads:
            errs.append(("branch_width", f"{self.branch_width} is not divisible by branch_heads "
                         f"{self.branch_heads}; pick a multiple of the head count"))
        return errs


# The demo's student: a narrow 2-layer model in the teacher's architecture, randomly initialised.
DEFAULT_STUDENT = StudentConfig(config="models/teacher", num_layers=2, hidden_size=192,
                                intermediate_size=768, num_heads=3)


class TheseusConfig(_Section):
    """BERT-of-Theseus (`distill.method: theseus`, stages/methods/theseus.py): groups of teacher blocks replaced at random
    by one successor block each, the replacement probability constant or growing linearly, then the successors
    trained alone."""

    groups: int | None = None  # successor blocks; each stands in for teacher_layers / groups blocks
    replace_prob: Float = 0.5  # p (constant), or the base rate b of the linear curriculum
    curriculum: Literal["constant", "linear"] = "constant"
    curriculum_k: Float | None = None  # linear: p_t = min(1, k * t + b) at optimizer step t
    successor_epochs: Float = 1.0  # phase 2: epochs of the successors alone, after distill.epochs of replacing

    def _check(self) -> list[Problem]:
        errs = []
        if self.groups is not None and self.groups < 1:
            errs.append(("groups", f"must be >= 1 (got {self.groups})"))
        if not 0 < self.replace_prob <= 1:
            errs.append(("replace_prob", f"must be in (0, 1] (got {self.replace_prob})"))
        if self.curriculum == "linear" and (self.curriculum_k is None or self.curriculum_k <= 0):
            errs.append(("curriculum_k", "the linear curriculum needs k > 0, the growth of p per optimizer step "
                         "(e.g. (1 - replace_prob) / 1000 reaches p = 1 after 1000 steps)"))
        if self.curriculum == "constant" and self.curriculum_k is not None:
            errs.append(("curriculum_k", "only applies to curriculum: linear; remove it or set curriculum: linear"))
        if self.successor_epochs < 0:
            errs.append(("successor_epochs", f"must be >= 0 (got {self.successor_epochs})"))
        return errs


class LMDistillConfig(_Section):
    """`distill.lm`: the KD loss of a causal_lm student (data.task causal_lm only; kd.weight, kd.hard_weight,
    kd.temperature and kd.temperature_squared are read as for every kind, the hard term being next-token
    cross-entropy; kd.temperature, when not given, is precompute.lm.temperature: `Config._lm_distill_temperature`)."""

    loss: Literal[tuple(LM_LOSSES)] = "forward_kl"  # type: ignore[valid-type]  # the losses come from the registry
    jsd_beta: Float = 0.5
    skew_alpha: Float = 0.1  # skew_kl, skew_reverse_kl: the teacher's (student's) share of the mixture (DistiLLM)
    topk_tail: Literal[TOPK_TAILS] = "bucket"  # type: ignore[valid-type]
    chunk_tokens: int | None = None  # tokens per chunk of the loss; None: 2**23 // V (32 MiB of logits, flat in V)
    cross_tokenizer: bool = False  # Universal Logit Distillation over a cached top-k (another tokenizer)

    def _check(self) -> list[Problem]:
        errs = []
        for key in ("jsd_beta", "skew_alpha"):  # the settings only some losses read
            owners = [name for name, loss in LM_LOSSES.items() if key in loss.options]
            value = getattr(self, key)
            if not 0 < value < 1:
                errs.append((key, f"must be in (0, 1) (got {value})"))
            elif self.loss not in owners and value != type(self).model_fields[key].default:
                errs.append((key, f"only applies to loss: {' or '.join(owners)}, not {self.loss}; remove it"))
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            errs.append(("chunk_tokens", f"must be >= 1 (got {self.chunk_tokens})"))
        return errs


class DistillConfig(TrainingConfig):
    """`kd distill`: train a student from cached (or live) teacher outputs."""

    lr: Float = 5e-4
    # kd: train distill.student from the teacher signal; theseus: BERT-of-Theseus module replacing
    # (stages/methods/theseus.py); fastbert: self-distil branch classifiers onto a fine-tuned backbone (stages/methods/fastbert.py).
    method: Literal["kd", "theseus", "fastbert"] = "kd"
    theseus: TheseusConfig = TheseusConfig()
    fastbert: FastBertConfig = FastBertConfig()
    teacher_signal: Literal["cached", "online", "none"] = "cached"
    caches: list[str] = []
    teachers: list[str] = []
    student: StudentConfig = DEFAULT_STUDENT
    kd: KDConfig = KDConfig()
    matches: list[MatchConfig] = []
    match_preset: str | None = None
    match_weight_schedule: Schedule = "constant"
    prefetch: int = 4
    check_cache_teacher: bool = True
    task_tau: Float = 1.0  # multi-task: a batch's task is drawn with probability |D_task|^tau / sum (0 = uniform)
    lm: LMDistillConfig = LMDistillConfig()  # data.task causal_lm only
    output: str = "models/student"
    log_dir: str = "dvclive/distill"
    metrics: str = "metrics/distill.json"

    @field_validator("student", mode="before")
    @classmethod
    def _student_over_default(cls, value: Any) -> Any:
        # Keys given without a way to build (e.g. only num_layers: 4) adjust the default student;
        # a section that names from_teacher, pretrained or config describes the whole student, so
        # the default's sizes do not leak into a student that would ignore them.
        if isinstance(value, Mapping) and not any(k in value for k in _STUDENT_MODES):
            return {**DEFAULT_STUDENT.model_dump(exclude_none=True), **value}
        return value

    def _check(self) -> list[Problem]:
        errs = super()._check()
        if self.match_preset:
            unknown = [p.strip() for p in self.match_preset.split("+") if p.strip() not in PRESETS]
            if unknown:
                errs.append(("match_preset", f"unknown preset(s) {unknown}; valid presets (join several "
                             f"with +): {', '.join(PRESETS)}"))
        if self.teacher_signal == "none" and (self.matches or self.match_preset):
            errs.append(("matches", "intermediate matches need a teacher, but teacher_signal is 'none'; "
                         "remove matches and match_preset or set teacher_signal: cached"))
        if self.teacher_signal == "none" and self.kd.hard_weight <= 0:
            errs.append(("kd.hard_weight", "must be > 0 when teacher_signal is 'none' (nothing to learn)"))
        if self.method == "kd" and self.theseus != TheseusConfig():
            errs.append(("theseus", "only read when distill.method is theseus; set method: theseus or remove it"))
        if self.method == "theseus":
            if self.theseus.groups is None:
                errs.append(("theseus.groups", "method theseus needs the number of successor blocks, a divisor "
                             "of the teacher's layer count (e.g. 3 for a 6-layer teacher)"))
            if self.teacher_signal != "online":
                errs.append(("teacher_signal", f"is {self.teacher_signal!r}, but method theseus runs the teacher's "
                             "own blocks live (cached outputs cannot stand in for them); set "
                             "distill.teacher_signal: online"))
            if self.matches or self.match_preset:
                errs.append(("matches", "method theseus trains on the task's own loss alone; remove matches "
                             "and match_preset"))
        if self.method != "fastbert" and self.fastbert != FastBertConfig():
            errs.append(("fastbert", "is only read when distill.method is fastbert; set method: fastbert or "
                         "remove the section"))
        if self.prefetch < 1:
            errs.append(("prefetch", f"must be >= 1 batch (got {self.prefetch})"))
        if self.task_tau < 0:
            errs.append(("task_tau", f"must be >= 0 (got {self.task_tau}); 1 = proportional to size, 0 = uniform"))
        return errs


class EvaluateConfig(_Section):
    """`kd evaluate`: accuracy, macro-F1, size and throughput of saved models, side by side."""

    models: dict[str, str] = {"teacher": "models/teacher", "student": "models/student",
                              "baseline": "models/baseline"}
    split: Split = "test"
    batch_size: int = 64
    max_length: int = 64
    throughput_batches: int = 20
    output: str = "metrics/evaluate.json"
    predictions: str = "metrics/predictions.json"
    # FastBERT models (folders `kd distill` wrote with distill.method: fastbert) are also measured at each speed,
    # and the speed/accuracy curve of every model goes to fastbert_curve (CSV) and a PNG next to it.
    fastbert_speeds: list[Float] = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    fastbert_curve: str = "metrics/fastbert_curve.csv"

    def _check(self) -> list[Problem]:
        bad = [s for s in self.fastbert_speeds if not 0 < s <= 1]
        if bad:
            return [("fastbert_speeds", f"speeds must be in (0, 1] (got {bad}); 1 = every example leaves at the "
                     "first branch, near 0 = none leaves early")]
        if not self.fastbert_speeds:
            return [("fastbert_speeds", "list at least one speed in (0, 1], e.g. [0.1, 0.5, 0.9]")]
        return []


class MaskOp(_Section):
    """`augment.ops.mask`: each word, with probability p, becomes `token` (at least one word per view)."""

    p: Float = 0.15
    token: str = "[MASK]"  # or `tokenizer:<model folder>`: that tokenizer's mask token

    def _check(self) -> list[Problem]:
        errs = _probability("p", self.p)
        if not self.token.strip() or len(self.token.split()) != 1:
            errs.append(("token", f"{self.token!r} must be one word without spaces, e.g. [MASK] or <mask>"))
        elif self.token.startswith("tokenizer:") and not self.token.removeprefix("tokenizer:"):
            errs.append(("token", "tokenizer: needs a model folder, e.g. tokenizer:models/teacher"))
        return errs


class DeleteOp(_Section):
    """`augment.ops.delete`: each word, with probability p, is dropped (at least one, never all)."""

    p: Float = 0.1

    def _check(self) -> list[Problem]:
        return _probability("p", self.p)


class NgramOp(_Section):
    """`augment.ops.ngram`: the view is a random run of n consecutive words, n drawn from [min_n, max_n]."""

    min_n: int = 3
    max_n: int = 8

    def _check(self) -> list[Problem]:
        if not 1 <= self.min_n <= self.max_n:
            return [("", f"needs 1 <= min_n <= max_n (got min_n {self.min_n}, max_n {self.max_n})")]
        return []


class ShuffleOp(_Section):
    """`augment.ops.shuffle`: words are shuffled locally; each moves fewer than `window` places."""

    window: int = 3

    def _check(self) -> list[Problem]:
        if self.window < 2:
            return [("window", f"must be >= 2 (got {self.window}); with 1 no word can move")]
        return []


class PosOp(_Section):
    """`augment.ops.pos`: each word, with probability p, becomes another word the input shows with its tag."""

    p: Float = 0.15

    def _check(self) -> list[Problem]:
        return _probability("p", self.p)


def _probability(key: str, p: float) -> list[Problem]:
    return [] if 0 < p <= 1 else [(key, f"must be in (0, 1] (got {p})")]


class AugmentOps(_Section):
    """The operations `kd augment` applies, each with its settings; an operation left out (or null) is off."""

    mask: MaskOp | None = None
    delete: DeleteOp | None = None
    ngram: NgramOp | None = None
    shuffle: ShuffleOp | None = None
    pos: PosOp | None = None

    def enabled(self) -> dict[str, _Section]:
        """The operations that are on, by name, in the fixed order views are written."""
        return {name: op for name in type(self).model_fields if (op := getattr(self, name)) is not None}


class AugmentConfig(_Section):
    """`kd augment`: write augmented views of a data file (README "Augmentation (`kd augment`)")."""

    input: str = "data/train.csv"
    output: str = "augmented/views.csv"
    ops: AugmentOps = AugmentOps()  # off: `kd augment` writes no views until an operation is named here
    views: int = 1  # views per example and operation
    seed: int = 13
    include_input: bool = False  # write the input's examples too, before the views

    def _check(self) -> list[Problem]:
        errs = []
        if self.views < 1:
            errs.append(("views", f"must be >= 1 (got {self.views})"))
        if Path(self.output).suffix.lower() not in (".csv", ".jsonl"):
            errs.append(("output", f"{self.output!r}: write a .csv or .jsonl file"))
        if Path(self.output) == Path(self.input):
            errs.append(("output", "is the input file; write the views to another file"))
        return errs


class TaskConfig(_Section):
    """One task of a multi-task run (`tasks:`): its data, its teacher(s), its loss weight and matches.

    Each task gets its own cache and its own student head on the shared encoder.
    """

    name: str
    data: DataConfig
    prepare: PrepareConfig | None = None  # `kd prepare` writes this task's split files (None: they exist already)
    teachers: list[str] = []  # default: [<train_teacher.output>/<name>], what `kd train-teacher` writes
    weight: Float = 1.0
    kd: KDConfig | None = None  # this task's KD settings (default: distill.kd)
    matches: list[MatchConfig] = []
    match_preset: str | None = None

    def _check(self) -> list[Problem]:
        errs = []
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            errs.append(("name", f"{self.name!r} must be letters, digits, _ or - (it names folders and ids)"))
        if self.weight < 0:
            errs.append(("weight", f"must be >= 0 (got {self.weight})"))
        if self.match_preset and any(p.strip() not in PRESETS for p in self.match_preset.split("+")):
            errs.append(("match_preset", f"unknown preset in {self.match_preset!r}; valid: {', '.join(PRESETS)}"))
        return errs


class Config(_Section):
    """The whole params file: one section per stage (and `tasks:` for multi-task distillation)."""

    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    augment: AugmentConfig = AugmentConfig()
    train_teacher: TrainTeacherConfig = TrainTeacherConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tasks: list[TaskConfig] = []  # several tasks, one student: each task's data replaces the `data` section

    @model_validator(mode="before")
    @classmethod
    def _lm_distill_temperature(cls, data: Any) -> Any:
        # A causal_lm run's distill.kd.temperature, when not given, is the cache's capture temperature
        # (precompute.lm.temperature, default 1): the cached teacher is only exact at it. Resolved here, on the raw
        # settings, so the value is validated like a given one and a dumped config parses back to the same.
        if not isinstance(data, Mapping):
            return data
        kind = TASK_KINDS.get(_raw(data.get("data"), "task"))
        distill = data.get("distill", {})
        kd = _raw(distill, "kd", {})
        if kind is None or not kind.language_model or not isinstance(distill, Mapping) or not isinstance(kd, Mapping):
            return data
        if "temperature" in kd:
            return data
        capture = _yaml_float(_raw(_raw(data.get("precompute"), "lm"), "temperature", 1.0))
        if isinstance(capture, bool) or not isinstance(capture, (int, float)) or not capture > 0:
            return data  # precompute.lm.temperature reports its own error
        return {**data, "distill": {**distill, "kd": {**kd, "temperature": capture}}}

    def task_names(self) -> list[str]:
        """The names of the tasks of a multi-task run ([] for a single-task one)."""
        return [t.name for t in self.tasks]

    def for_task(self, name: str) -> "Config":
        """The single-task view of task `name`: its data, teachers (as precompute.teachers) and matches.

        Stages run each task through the single-task code with it; per-task outputs go into `<output>/<name>`.
        """
        t = next(t for t in self.tasks if t.name == name)
        teachers = t.teachers or [f"{self.train_teacher.output}/{name}"]
        d, p = self.distill, self.precompute
        if TASK_KINDS[t.data.task].token_axis == "words":  # the layers other tasks cache do not apply to this one
            p = p.model_copy(update={"hidden_layers": [], "attention_layers": []})
        return self.model_copy(update={
            "data": t.data,
            "tasks": [],
            "prepare": t.prepare or self.prepare,
            "train_teacher": self.train_teacher.model_copy(update={
                "output": f"{self.train_teacher.output}/{name}",
                "metrics": _suffixed(self.train_teacher.metrics, name)}),
            "precompute": p.model_copy(update={"teachers": teachers}),
            "distill": d.model_copy(update={"matches": t.matches, "match_preset": t.match_preset, "kd": t.kd or d.kd,
                                            "teachers": teachers if d.teacher_signal == "online" else [],
                                            "caches": [], "output": f"{d.output}/{name}"}),
        })

    def _check(self) -> list[Problem]:
        # Cross-section rules only (keys are full paths); pydantic runs them once every section passed its own.
        return (_task_list_rules(self) + _student_rules(self) + _each_task_rules(self) + _method_rules(self)
                + _cache_rules(self) + _task_rules(self) + _augment_rules(self))


def _raw(section: Any, key: str, default: Any = None) -> Any:
    """`section[key]` of raw settings (a mapping, or a section object: then only a key that was given)."""
    if isinstance(section, Mapping):
        return section.get(key, default)
    if isinstance(section, BaseModel) and key in section.model_fields_set:
        return getattr(section, key)
    return default


def _task_list_rules(cfg: "Config") -> list[Problem]:
    """`tasks:`: unique names, and no top-level setting that a multi-task run would ignore."""
    errs: list[Problem] = []
    names = cfg.task_names()
    for i, name in enumerate(names):
        if name in names[:i]:
            errs.append((f"tasks[{i}].name", f"task name {name!r} is used twice; give every task its own name"))
    if cfg.tasks:
        # Settings a multi-task run replaces by each task's own: set there, they would be silently ignored.
        ignored = [("data", cfg.data != DataConfig(), "tasks[i].data"),
                   ("precompute.teachers", cfg.precompute.teachers != PrecomputeConfig().teachers,
                    "tasks[i].teachers"),
                   ("distill.teachers", bool(cfg.distill.teachers), "tasks[i].teachers"),
                   ("distill.matches", bool(cfg.distill.matches or cfg.distill.match_preset),
                    "tasks[i].matches / tasks[i].match_preset")]
        for key, given, instead in ignored:
            if given:
                errs.append((key, f"is not read when tasks: is set (each task has its own); move it to "
                             f"{instead} and remove it here"))
    return errs


def _student_rules(cfg: "Config") -> list[Problem]:
    """Students and methods that cannot serve the task kind or a multi-task run."""
    errs: list[Problem] = []
    if cfg.tasks and cfg.distill.method == "fastbert":
        errs.append(("distill.method", "fastbert is single-task; remove tasks: or use method: kd"))
    elif cfg.distill.method == "fastbert" and not TASK_KINDS[cfg.data.task].sequence_kd:
        errs.append(("distill.method", f"fastbert exits on the entropy of one class distribution per example, "
                     f"and data.task is {cfg.data.task}; use it with sequence_classification"))
    if cfg.distill.student.module and TASK_KINDS[cfg.data.task].language_model:
        errs.append(("distill.student.module", f"data.task {cfg.data.task} trains a Hugging Face causal LM "
                     "(stages/methods/lm.py), not a module student; use from_teacher, pretrained or config"))
    if cfg.tasks and cfg.distill.student.module:
        errs.append(("distill.student.module", "a multi-task student is a transformer encoder with a head per "
                     "task; a module student is single-task: remove tasks: or use from_teacher, pretrained "
                     "or config"))
    if cfg.tasks and cfg.distill.caches:
        errs.append(("distill.caches", "multi-task runs find each task's cache from its data and teachers; "
                     "remove distill.caches (or list the task's teachers in tasks[].teachers)"))
    return errs


def _each_task_rules(cfg: "Config") -> list[Problem]:
    """Each task's own data and KD rules, reported under tasks[i]."""
    errs: list[Problem] = []
    names = cfg.task_names()
    for i, t in enumerate(cfg.tasks):
        if names.index(t.name) != i:
            continue  # a second task of the same name is reported above
        if TASK_KINDS[t.data.task].language_model:
            errs.append((f"tasks[{i}].data.task", f"task {t.name}: {t.data.task} cannot be part of a "
                         "multi-task run yet; distil it on its own (top-level data:)"))
            continue
        # A task's data and kd settings live in tasks[i]; report them there.
        here = {"data.": f"tasks[{i}].data.", "distill.kd.": f"tasks[{i}].kd."}
        for key, problem in _task_rules(cfg.for_task(t.name)):
            for old, new in here.items():
                key, problem = key.replace(old, new), problem.replace(old, new)
            errs.append((key, f"task {t.name}: {problem}"))
    return errs


def _method_rules(cfg: "Config") -> list[Problem]:
    """Theseus's single teacher and task; one weight per teacher."""
    errs: list[Problem] = []
    d, p = cfg.distill, cfg.precompute
    if d.method == "theseus" and cfg.tasks:
        errs.append(("distill.method", "theseus distils one task at a time; remove tasks: or set method: kd"))
    if d.method == "theseus" and TASK_KINDS[cfg.data.task].language_model:
        errs.append(("distill.method", f"theseus is not supported for data.task {cfg.data.task} yet (it is for "
                     "the classification, regression and QA kinds); set method: kd"))
    if d.method == "theseus" and len(d.teachers or p.teachers) != 1:
        key = "distill.teachers" if d.teachers else "precompute.teachers"
        errs.append((key, f"method theseus replaces the blocks of one teacher, but {len(d.teachers or p.teachers)} "
                     "are listed; list exactly one"))
    if d.teacher_signal != "none" and d.kd.teacher_weights is not None:
        names = d.caches if d.teacher_signal == "cached" else d.teachers
        n = len(names or p.teachers)
        if len(d.kd.teacher_weights) != n:
            errs.append(("distill.kd.teacher_weights", f"{len(d.kd.teacher_weights)} weights for {n} "
                         "teachers; give one weight per teacher, in the same order"))
    return errs


def _cache_rules(cfg: "Config") -> list[Problem]:
    """With the caches precompute writes, what they hold is known: matches and KD need it cached."""
    errs: list[Problem] = []
    d, p = cfg.distill, cfg.precompute
    if d.teacher_signal == "cached" and not d.caches:
        # The caches are the ones precompute writes, so what they hold is known here.
        cached = {"hidden": sorted(set(p.hidden_layers)), "attention": sorted(set(p.attention_layers))}
        first_token_kinds = [k for k, v in MATCH_KINDS.items() if v.feature == "hidden" and v.tokens == "first"]
        for i, m in enumerate(d.matches):
            kind = MATCH_KINDS[m.kind]
            missing = [x for x in _layers(m.teacher_layer) if x not in cached[kind.feature]]
            if missing:
                errs.append((f"distill.matches[{i}].teacher_layer",
                             f"layer(s) {missing} are not cached; add them to precompute.{kind.feature}_layers "
                             f"(now {cached[kind.feature]}) or use distill.teacher_signal: online"))
            if p.hidden_tokens == "first" and kind.feature == "hidden" and kind.tokens == "all":
                errs.append((f"distill.matches[{i}].kind",
                             f"{m.kind} needs every token but precompute.hidden_tokens is 'first'; "
                             f"set it to 'all' or use kind {' or '.join(first_token_kinds)}"))
        if d.kd.weight > 0 and not p.logits:
            errs.append(("distill.kd.weight", "> 0 needs teacher logits; set precompute.logits: true "
                         "or distill.kd.weight: 0"))
    return errs


def _suffixed(path: str, name: str) -> str:
    """metrics/teacher_train.json -> metrics/teacher_train.<name>.json"""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{name}{p.suffix}"))


def _task_rules(cfg: "Config") -> list[Problem]:
    """Settings that the task kind (data.task) cannot honour."""
    task, kind, d, p = cfg.data.task, TASK_KINDS[cfg.data.task], cfg.distill, cfg.precompute
    errs: list[Problem] = []
    if not kind.sequence_kd:
        why = f"applies to one class distribution per example, and data.task is {task}"
        if d.kd.temperature_schedule != "constant":
            errs.append(("distill.kd.temperature_schedule", f"{d.kd.temperature_schedule} {why}; use constant"))
        if d.kd.probability_shift:
            errs.append(("distill.kd.probability_shift", f"{why}; set it to false"))
        if d.kd.teacher_combine != "logits":
            errs.append(("distill.kd.teacher_combine", f"probs {why}; use logits"))
    if kind.regression and d.kd.loss != "mse":
        errs.append(("distill.kd.loss", f"{d.kd.loss!r} compares class distributions, but a regression teacher "
                     "outputs one number; set distill.kd.loss: mse"))
    if kind.windows and d.teacher_signal == "cached" and d.max_length != p.max_length:
        errs.append(("distill.max_length", f"{d.max_length} differs from precompute.max_length {p.max_length}; "
                     f"data.task {task} caches one teacher output per token of each window, so the student must "
                     "cut the same windows: use the same max_length (and the teacher's tokenizer)"))
    errs += _lm_rules(cfg)
    if kind.token_axis == "words":
        why = (f"data.task {task} caches one teacher output per word, and per-word hidden states and attention "
               "are not supported yet")
        if p.hidden_layers or p.attention_layers:
            errs.append(("precompute.hidden_layers", f"{why}; cache logits only (hidden_layers: [], "
                         "attention_layers: [])"))
        if d.matches or d.match_preset:
            errs.append(("distill.matches", f"{why}; remove matches and match_preset"))
    return errs


def _augment_rules(cfg: "Config") -> list[Problem]:
    """Augment settings the data (data.task) cannot honour."""
    a, task, errs = cfg.augment, cfg.data.task, []
    if not a.ops.enabled():
        return []  # off: `kd augment` writes an empty file whatever the task
    if task not in ("sequence_classification", "token_classification"):
        return [("augment.ops", f"views are made for data.task sequence_classification (a data.transfer set) or "
                 f"token_classification (tagged rows), not {task}; set augment.ops: {{}}")]
    tokens = task == "token_classification"
    if a.ops.pos is not None and not tokens:
        errs.append(("augment.ops.pos", f"replaces a word by another seen with the same tag, and data.task {task} "
                     "is plain text without tags; use it on token_classification data with tags (e.g. "
                     "examples/pos_wsj.yaml) or remove augment.ops.pos"))
    if tokens and Path(a.output).suffix.lower() != ".jsonl":
        errs.append(("augment.output", f"{a.output!r}: token_classification views are lists of words and tags, "
                     "which CSV cannot hold; write a .jsonl file"))
    return errs


def lm_codec_problem(loss: str, codec: str) -> str:
    """Why a cache of `codec` cannot serve distill.lm.loss `loss`, and the codecs (or online) that can."""
    serves = " and ".join(name for name, x in LM_LOSSES.items() if codec in x.codecs)
    return (f"{loss} is not served by a {codec} cache (it serves {serves} only); use precompute.lm.codec: "
            f"{' or '.join(LM_LOSSES[loss].codecs)}, or distill.teacher_signal: online")


def lm_temperature_problem(temperature: float, capture: float, cache: str = "the cache") -> str:
    """Why distill.kd.temperature `temperature` cannot read a causal_lm cache captured at `capture`, and the fix."""
    return (f"{temperature:g} differs from {cache}'s capture temperature {capture:g}: a cached teacher holds its "
            f"distribution at the temperature it was captured at; set precompute.lm.temperature: {temperature:g} "
            f"and rerun kd precompute (or distill.kd.temperature: {capture:g})")


def _lm_rules(cfg: "Config") -> list[Problem]:
    """precompute.lm and distill.lm: only for a language-model kind, and what each choice needs."""
    task, d, p = cfg.data.task, cfg.distill, cfg.precompute
    errs: list[Problem] = []
    if not TASK_KINDS[task].language_model:
        for key, value, default in (("precompute.lm", p.lm, LMCacheConfig()), ("distill.lm", d.lm, LMDistillConfig())):
            if value != default:
                errs.append((key, f"only applies to data.task: causal_lm, not {task}; remove it"))
        return errs
    if not p.logits:
        errs.append(("precompute.logits", f"data.task {task} caches the teacher's next-token distribution (as "
                     "precompute.lm.codec says); set logits: true"))
    if not p.store_input_ids:
        errs.append(("precompute.store_input_ids", f"a {task} cache always holds the teacher's token ids (the "
                     "student trains on them); set it to true"))
    # With the caches precompute writes, their codec and capture temperature are known here; explicit
    # distill.caches are checked against their manifests when distill opens them (stages/methods/lm.py).
    known_cache = d.teacher_signal == "cached" and not d.caches
    if known_cache and not d.lm.cross_tokenizer and p.lm.codec not in LM_LOSSES[d.lm.loss].codecs:
        errs.append(("distill.lm.loss", lm_codec_problem(d.lm.loss, p.lm.codec)))
    if known_cache and d.kd.temperature != p.lm.temperature:
        errs.append(("distill.kd.temperature", lm_temperature_problem(d.kd.temperature, p.lm.temperature)))
    cached_topk = d.teacher_signal == "cached" and p.lm.codec == "topk"
    if d.lm.cross_tokenizer and not (d.teacher_signal == "cached" and p.lm.codec == ULD_CODEC):
        errs.append(("distill.lm.cross_tokenizer", "Universal Logit Distillation reads a cached top-k: set "
                     f"distill.teacher_signal: cached and precompute.lm.codec: {ULD_CODEC}"))
    if d.lm.topk_tail != "bucket" and not cached_topk:
        errs.append(("distill.lm.topk_tail", "only applies to a cached top-k (distill.teacher_signal: cached, "
                     "precompute.lm.codec: topk); remove it"))
    if d.teacher_signal == "cached" and not d.lm.cross_tokenizer and d.max_length != p.max_length:
        errs.append(("distill.max_length", f"{d.max_length} differs from precompute.max_length {p.max_length}; "
                     f"data.task {task} caches blocks of precompute.max_length teacher tokens and a student with "
                     "the teacher's tokenizer trains on the same blocks: use the same max_length"))
    if d.kd.loss != "kl":
        errs.append(("distill.kd.loss", f"data.task {task} takes its KD loss from distill.lm.loss; leave "
                     "distill.kd.loss at kl"))
    if d.matches or d.match_preset:
        errs.append(("distill.matches", f"intermediate matches are not supported for data.task {task}; "
                     "remove matches and match_preset"))
    return errs


# ----------------------------------------------------------------------------- parsing


def _section_classes(cls: type[BaseModel], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], type[BaseModel]]:
    """Every settings class by its path of field names, e.g. ("distill", "kd") -> KDConfig."""
    out: dict[tuple[str, ...], type[BaseModel]] = {path: cls}
    for name, field in cls.model_fields.items():
        for sub in _models_in(field.annotation):
            out.update(_section_classes(sub, path + (name,)))
    return out


def _models_in(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in getattr(tp, "__args__", ()) for m in _models_in(arg)]


_SECTIONS = _section_classes(Config)

# Pydantic's error type -> what the setting expects, for "expected X, got Y" messages.
_EXPECTED = {
    "int_type": "int",
    "float_type": "float",
    "bool_type": "true or false",
    "string_type": "str",
    "list_type": "list",
    "dict_type": "mapping",
    "model_type": "a mapping of settings",
}


def _dotted(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "params"


def _messages(errors: list[Any]) -> list[str]:
    """One `dotted.key: problem and fix` line per pydantic error (`ValidationError.errors()`)."""
    out: list[str] = []
    for e in errors:
        loc, kind = e["loc"], e["type"]
        key = _dotted(loc)
        if kind == "value_error" and isinstance(e["ctx"]["error"], _Problems):  # a `_check` rule
            for sub, problem in e["ctx"]["error"].problems:
                out.append(f"{_dotted(loc + tuple(sub.split('.')) if sub else loc)}: {problem}")
        elif kind == "extra_forbidden":
            section = _SECTIONS[tuple(p for p in loc[:-1] if isinstance(p, str))]
            out.append(f"{key}: unknown key; valid keys here: {', '.join(section.model_fields)}")
        elif kind == "literal_error":
            out.append(f"{key}: {e['input']!r} is not one of {e['ctx']['expected']}")
        elif kind == "missing":
            out.append(f"{key}: required setting is missing")
        elif kind in _EXPECTED:
            out.append(f"{key}: expected {_EXPECTED[kind]}, got {e['input']!r}")
        else:
            out.append(f"{key}: {e['msg']}")
    return out


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build and validate a Config; raise ConfigError listing every problem."""
    try:
        return Config.model_validate(dict(data or {}))
    except ValidationError as e:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(_every_problem(dict(data or {}), e))) from None


def _every_problem(data: dict[str, Any], err: ValidationError) -> list[str]:
    """The messages of `err` and of every rule it hid.

    pydantic stops a section at an unknown key or a wrong type before the section's value rules run, so the
    settings are validated again without the keys already reported until nothing new turns up. A rule that
    names a dropped choice (`codec: dense`, `data.task: ...`) would judge the default in its place, so those
    messages are left out. A dropped key that is required (a match's `kind`) leaves its section invalid, so
    that section's value rules stay hidden until it is fixed.
    """
    messages = dict.fromkeys(_messages(err.errors()))
    gone: list[tuple[int | str, ...]] = []
    choices: list[str] = []
    for _ in range(4):  # each pass can only uncover the rules of sections whose bad keys it dropped
        data = copy.deepcopy(data)
        dropped = [e for e in err.errors() if e["type"] != "value_error" and _drop(data, e["loc"])]
        if not dropped:
            break
        gone += [e["loc"] for e in dropped]
        choices += [str(e["loc"][-1]) for e in dropped if e["type"] == "literal_error"]
        try:
            Config.model_validate(data)
            break
        except ValidationError as again:
            err = again
        # a dropped required key now reads as missing: it was reported as what it was
        for message in _messages([e for e in err.errors() if e["loc"] not in gone]):
            if not any(re.search(rf"\b{re.escape(c)}\b", message) for c in choices):
                messages.setdefault(message)
    return list(messages)


def _drop(data: Any, loc: tuple[int | str, ...]) -> bool:
    """Remove the setting at `loc` from nested dicts and lists; False if it is not there."""
    for part in loc[:-1]:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    if isinstance(data, dict) and loc and loc[-1] in data:
        del data[loc[-1]]
        return True
    return False


def _set_dotted(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. distill.epochs=2")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Config:
    """Read a params file (missing file = all defaults), apply `dotted.key=value` overrides, validate."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e}); fix the file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, distill, ...)")
    elif str(path) != "params.yaml":
        raise ConfigError(f"params file {path} does not exist; pass an existing file to --params")
    for a in overrides:
        _set_dotted(data, a)
    return config_from_dict(data)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain-dict form of the config or any section (JSON/YAML-safe; for logs and fingerprints)."""
    return cfg.model_dump()
