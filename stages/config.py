"""Typed settings for every stage, parsed from `params.yaml` (the file dvc.yaml reads).

All defaults live in the dataclasses below and nowhere else. `load_config` reports every
problem at once (unknown keys, wrong types, values out of range, impossible combinations),
each naming the dotted key and the valid values, in the style of torchtune's config.validate.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from cache_format._errors import KDError

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "PrepareConfig",
    "TrainingConfig",
    "TrainTeacherConfig",
    "PrecomputeConfig",
    "StudentConfig",
    "KDConfig",
    "MatchConfig",
    "DistillConfig",
    "EvaluateConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
]

BUNDLED_TEACHER = "bundled:all-MiniLM-L6-v2"
BUNDLED_DATA = "bundled:rotten_tomatoes"
BUNDLED_TRANSFER = "bundled:imdb_sentences"


class ConfigError(KDError, ValueError):
    """One or more settings are wrong; the message lists each with its key and the fix."""


@dataclass(frozen=True)
class DataConfig:
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
    transfer: str | None = None

    def _check(self) -> list[str]:
        return ["data.num_labels: must be >= 2 (got %d)" % self.num_labels] if self.num_labels < 2 else []


@dataclass(frozen=True)
class PrepareConfig:
    """`kd prepare`: split a source file into train/dev/test with a recorded, seeded split."""

    source: str = BUNDLED_DATA
    filter: dict[str, str] = field(default_factory=dict)
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "dev": 0.1, "test": 0.1})
    max_examples: int | None = None
    seed: int = 13
    out_dir: str = "data"
    transfer_source: str | None = None
    transfer_examples: int = 10000

    def _check(self) -> list[str]:
        errs = []
        if set(self.fractions) - {"train", "dev", "test"} or "train" not in self.fractions:
            errs.append("prepare.fractions: keys must be train and optionally dev, test (got %s)" % sorted(self.fractions))
        if any(v <= 0 for v in self.fractions.values()) or abs(sum(self.fractions.values()) - 1) > 1e-6:
            errs.append("prepare.fractions: values must be > 0 and sum to 1 (got %s)" % dict(self.fractions))
        return errs


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings shared by train-teacher and distill (one training loop for both)."""

    max_length: int = 64
    epochs: float = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 42
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    eval_batch_size: int = 128
    group_by_length: bool = True
    checkpoint_every: int = 0
    resume: bool = False

    def _check_training(self, section: str) -> list[str]:
        errs = []
        for name in ("max_length", "batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, name) < 1:
                errs.append(f"{section}.{name}: must be >= 1 (got {getattr(self, name)})")
        if self.epochs <= 0:
            errs.append(f"{section}.epochs: must be > 0 (got {self.epochs})")
        if self.lr <= 0:
            errs.append(f"{section}.lr: must be > 0 (got {self.lr})")
        if not 0 <= self.warmup_ratio < 1:
            errs.append(f"{section}.warmup_ratio: must be in [0, 1) (got {self.warmup_ratio})")
        if self.checkpoint_every < 0:
            errs.append(f"{section}.checkpoint_every: must be >= 0 steps, 0 = end of each epoch only")
        return errs


@dataclass(frozen=True)
class TrainTeacherConfig(TrainingConfig):
    """`kd train-teacher`: supervised fine-tuning of the teacher (a path or hub name + a new head)."""

    model: str = BUNDLED_TEACHER
    output: str = "models/teacher"
    metrics: str = "metrics/teacher_train.json"

    def _check(self) -> list[str]:
        return self._check_training("train_teacher")


@dataclass(frozen=True)
class PrecomputeConfig:
    """`kd precompute`: run each teacher once over a split and cache its outputs."""

    teachers: list[str] = field(default_factory=lambda: ["models/teacher"])
    split: Literal["train", "dev", "test"] = "train"
    cache_root: str = "caches"
    batch_size: int = 64
    max_length: int = 64
    logits: bool = True
    hidden_layers: list[int] = field(default_factory=list)
    hidden_tokens: Literal["all", "first"] = "all"
    attention_layers: list[int] = field(default_factory=list)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    store_input_ids: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    commit_examples: int = 20000
    commit_seconds: float = 60.0

    def _check(self) -> list[str]:
        errs = []
        if not self.teachers:
            errs.append("precompute.teachers: list at least one teacher model path")
        if self.batch_size < 1 or self.max_length < 1:
            errs.append("precompute.batch_size and precompute.max_length: must be >= 1")
        if any(i < 0 for i in self.hidden_layers + self.attention_layers):
            errs.append("precompute.hidden_layers/attention_layers: layer indices must be >= 0")
        if not (self.logits or self.hidden_layers or self.attention_layers):
            errs.append("precompute: nothing to cache; set logits: true or list hidden_layers/attention_layers")
        return errs


@dataclass(frozen=True)
class StudentConfig:
    """How the student is built: exactly one of from_teacher, pretrained, config."""

    from_teacher: str | None = "models/teacher"
    keep_layers: list[int] = field(default_factory=lambda: [0, 5])
    pretrained: str | None = None
    config: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None

    def _check(self) -> list[str]:
        chosen = [k for k in ("from_teacher", "pretrained", "config") if getattr(self, k)]
        if len(chosen) != 1:
            return [
                "distill.student: set exactly one of from_teacher (keep_layers of a teacher), pretrained "
                f"(a model path) or config (a config path/name, random init); got {chosen or 'none'}"
            ]
        if self.from_teacher and not self.keep_layers:
            return ["distill.student.keep_layers: list the teacher layers to keep, e.g. [0, 5]"]
        return []


@dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation on logits plus the hard-label term."""

    loss: Literal["kl", "ce", "mse"] = "kl"
    weight: float = 1.0
    weight_schedule: Literal["constant", "linear_decay", "linear_growth"] = "constant"
    temperature: float = 4.0
    temperature_squared: bool = True
    temperature_schedule: Literal["constant", "flsw", "cwsm"] = "constant"
    flsw_beta: float = 1.0
    flsw_gamma: float = 1.0
    cwsm_beta: float = 1.0
    probability_shift: bool = False
    hard_weight: float = 0.0
    hard_weight_schedule: Literal["constant", "linear_decay", "linear_growth"] = "constant"
    teacher_combine: Literal["logits", "probs"] = "logits"
    teacher_weights: list[float] | None = None

    def _check(self) -> list[str]:
        errs = []
        if self.temperature <= 0:
            errs.append(f"distill.kd.temperature: must be > 0 (got {self.temperature})")
        if self.weight < 0 or self.hard_weight < 0:
            errs.append("distill.kd.weight / hard_weight: must be >= 0")
        return errs


@dataclass(frozen=True)
class MatchConfig:
    """One intermediate match between a teacher layer and a student layer."""

    kind: Literal["hidden_mse", "hidden_cosine", "pkd", "mmd", "fsp", "attention_mse", "attention_ce"]
    teacher_layer: int | list[int]
    student_layer: int | list[int]
    weight: float = 1.0
    projection: Literal["linear", "relu", "tanh"] | None = None


@dataclass(frozen=True)
class DistillConfig(TrainingConfig):
    """`kd distill`: train a student from cached (or live) teacher outputs."""

    lr: float = 1e-4
    teacher_signal: Literal["cached", "online", "none"] = "cached"
    caches: list[str] = field(default_factory=list)
    teachers: list[str] = field(default_factory=list)
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    matches: list[MatchConfig] = field(default_factory=list)
    match_preset: str | None = None
    match_weight_schedule: Literal["constant", "linear_decay", "linear_growth"] = "constant"
    prefetch: int = 4
    check_cache_teacher: bool = True
    output: str = "models/student"
    log_dir: str = "dvclive/distill"
    metrics: str = "metrics/distill.json"

    def _check(self) -> list[str]:
        errs = self._check_training("distill")
        if self.teacher_signal == "none" and (self.matches or self.match_preset):
            errs.append("distill.matches: intermediate matches need a teacher; teacher_signal is 'none'")
        if self.teacher_signal == "none" and self.kd.hard_weight <= 0:
            errs.append("distill.kd.hard_weight: must be > 0 when teacher_signal is 'none' (nothing to learn)")
        if self.kd.teacher_weights is not None:
            n = len(self.caches or self.teachers) or None
            if n is not None and len(self.kd.teacher_weights) != n:
                errs.append(
                    f"distill.kd.teacher_weights: {len(self.kd.teacher_weights)} weights for {n} teachers; give one per teacher"
                )
        if self.prefetch < 1:
            errs.append("distill.prefetch: must be >= 1 batch")
        return errs


@dataclass(frozen=True)
class EvaluateConfig:
    """`kd evaluate`: accuracy, macro-F1, size and throughput of saved models, side by side."""

    models: dict[str, str] = field(
        default_factory=lambda: {"teacher": "models/teacher", "student": "models/student"}
    )
    split: Literal["train", "dev", "test"] = "test"
    batch_size: int = 64
    max_length: int = 64
    throughput_batches: int = 20
    output: str = "metrics/evaluate.json"
    predictions: str = "metrics/predictions.json"


@dataclass(frozen=True)
class Config:
    """The whole params file: one section per stage."""

    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train_teacher: TrainTeacherConfig = field(default_factory=TrainTeacherConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def _check(self) -> list[str]:
        # Cross-section rules only; each section checks itself while it is built.
        errs = []
        d, p = self.distill, self.precompute
        if d.teacher_signal == "cached" and not d.caches:
            kept_hidden = set(p.hidden_layers)
            kept_attn = set(p.attention_layers)
            for i, m in enumerate(d.matches):
                layers = m.teacher_layer if isinstance(m.teacher_layer, list) else [m.teacher_layer]
                if m.kind.startswith("attention"):
                    missing = [x for x in layers if x not in kept_attn]
                    what = "attention_layers"
                else:
                    missing = [x for x in layers if x not in kept_hidden]
                    what = "hidden_layers"
                if missing:
                    errs.append(
                        f"distill.matches[{i}].teacher_layer: layer(s) {missing} are not cached; add them to "
                        f"precompute.{what} (now {sorted(kept_attn if what.startswith('att') else kept_hidden)}) "
                        "or use distill.teacher_signal: online"
                    )
                if p.hidden_tokens == "first" and m.kind in ("hidden_mse", "hidden_cosine", "mmd", "fsp"):
                    errs.append(
                        f"distill.matches[{i}].kind: {m.kind} needs every token but precompute.hidden_tokens is "
                        "'first'; set it to 'all' or use kind pkd"
                    )
            if d.kd.weight > 0 and not p.logits:
                errs.append("distill.kd.weight: > 0 needs teacher logits; set precompute.logits: true")
        return errs


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against type hint `tp`; return the converted value or record an error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = f"{key}: expected {_type_name(tp)}, got {value!r}"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _convert(a, value, key, trial)
            if not trial:
                return out
        errors.append(bad)
        return None
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            errors.append(bad)
            return []
        return [_convert(args[0], v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            errors.append(bad)
            return {}
        return {str(k): _convert(args[1], v, f"{key}.{k}", errors) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{key}: expected a mapping of settings, got {value!r}")
            return tp() if _all_defaulted(tp) else None
        return _build(tp, value, key + ".", errors)
    if tp is float:
        # PyYAML follows YAML 1.1, which reads 5e-4 (no dot) as a string; users and `dvc exp run -S` write it.
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(bad)
            return 0.0
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(bad)
            return 0
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(bad)
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(bad)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this file, not user input


def _all_defaulted(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _build(cls: type, data: Mapping[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    n_before = len(errors)
    for k in data:
        if k not in names:
            errors.append(f"{prefix}{k}: unknown key; valid keys here: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], prefix + f.name, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{f.name}: required setting is missing")
            return None
    obj = cls(**kwargs)
    check = getattr(obj, "_check", None)
    if check is not None and len(errors) == n_before:
        errors.extend(check())
    return obj


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build and validate a Config; raise ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _build(Config, data or {}, "", errors)
    if not errors:
        errors.extend(cfg._check())
    if errors:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return cfg


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


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of any config object (for logging the resolved config and fingerprints)."""
    return dataclasses.asdict(cfg)
