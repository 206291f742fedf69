"""Model building shared by every stage: load teachers and tokenizers, build students, fingerprint weights."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from cache_format import KDError

__all__ = ["ModelError", "load_tokenizer", "load_model_config", "check_head", "load_classifier", "load_causal_lm", "student_from_teacher", "student_from_config", "num_layers", "hidden_size", "num_parameters", "missing_folder"]


# Config keys that change with where/how a model was loaded, not with what it computes.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "output_attentions", "output_hidden_states",
    "return_dict", "use_cache",
})
# Where encoder blocks live in the base model of common architectures (BERT/RoBERTa/ELECTRA, DistilBERT, Llama).
_LAYER_LIST_PATHS = ("encoder.layer", "transformer.layer", "layers", "h")


class ModelError(KDError, ValueError):
    """A model or tokenizer cannot be loaded or built as asked (missing path, bad layer index, bad sizes)."""


# ----------------------------------------------------------------------------------------------------------------
# Loading


def missing_folder(name_or_path: str) -> bool:
    """True when `name_or_path` names a local folder (not a hub name like "org/name") and nothing is there."""
    path = Path(name_or_path).expanduser()
    looks_local = (
        path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
        or ("/" in name_or_path and path.parent.is_dir())  # "models/teacher" next to an existing models/
    )
    return looks_local and not path.exists()


def _check_source(name_or_path: str, what: str) -> None:
    """Raise for a missing local folder; hub names ("bert-base-uncased", "org/name") pass through."""
    if missing_folder(name_or_path):
        raise ModelError(f"{what} folder {name_or_path} does not exist; fix the path or train/save the model first")


def _load_error(name_or_path: str, what: str, error: Exception) -> ModelError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelError(
        f"cannot load {what} {name_or_path!r}: not a local folder nor a loadable hub name ({first_line}); "
        "give a folder saved with save_pretrained, or a hub name that is cached locally or reachable"
    )


def load_tokenizer(name_or_path: str) -> Any:
    """Load a fast (Rust-backed) tokenizer from a folder or hub name."""
    _check_source(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "tokenizer", e) from e
    if not tokenizer.is_fast:
        raise ModelError(
            f"the tokenizer of {name_or_path!r} has no fast (tokenizers) version; save one with tokenizer.json"
        )
    return tokenizer


def load_model_config(name_or_path: str) -> PretrainedConfig:
    """The model's config only (config.json): cheap, no weights are read."""
    _check_source(name_or_path, "model")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "model", e) from e


Head = Literal["require", "if_missing", "new"]
_HEAD_NAMES = {"ForSequenceClassification": "classification", "ForTokenClassification": "token-classification",
               "ForQuestionAnswering": "question-answering"}


def check_head(config: PretrainedConfig, name_or_path: str, num_labels: int, head: Head = "require",
               auto_model: type = AutoModelForSequenceClassification,
               label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Check a model's task head against `num_labels`; return the loading options that follow.

    A head that is kept must also have been trained on `label_names` (when both the model and the data
    name their labels): the same count in another order would silently swap classes.

    The head is the one `auto_model` builds (AutoModelForTokenClassification -> `...ForTokenClassification`).

    head="require" (teachers, evaluation): the model must have a `num_labels`-label head.
    head="if_missing" (a pretrained student): a base model gets a new head; a head of another size is an error.
    head="new" (train-teacher only): a base model or a head of another size gets a new, re-initialised head.
    """
    suffix = auto_model.__name__.removeprefix("AutoModel")
    what = _HEAD_NAMES.get(suffix, suffix[3:])
    archs = config.architectures or []
    has_head = any(a.endswith(suffix) for a in archs)
    if has_head and config.num_labels == num_labels:
        if head != "new":
            _check_label_names(config, name_or_path, label_names)
        return {}
    if head == "new" or (head == "if_missing" and not has_head):
        # A head of another size or task (a sentence head for a token task: same key names) is replaced.
        return {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if has_head:
        raise ModelError(
            f"{name_or_path} has a {config.num_labels}-label {what} head but data.num_labels is {num_labels}; "
            f"set data.num_labels: {config.num_labels} if that is the data's label count, else use a model "
            f"fine-tuned for {num_labels} labels (`kd train-teacher` makes one)"
        )
    other = next((a for a in archs if "For" in a and not a.endswith(("ForMaskedLM", "ForPreTraining"))), None)
    if other:
        raise ModelError(
            f"{name_or_path} is a {other}, not the {what} model data.task needs; use a model fine-tuned "
            f"for this task (`kd train-teacher` makes one) or fix data.task"
        )
    raise ModelError(
        f"{name_or_path} has no {what} head (a base model), so its predictions would be random; "
        f"fine-tune it first with `kd train-teacher` (which adds a {num_labels}-label head) and use that model"
    )


def _check_label_names(config: PretrainedConfig, name_or_path: str, label_names: Sequence[str] | None) -> None:
    saved = [str((config.id2label or {}).get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    if label_names is None or all(re.fullmatch(r"LABEL_\d+", n) for n in saved):
        return  # the data or the model does not name its labels: nothing to compare
    if list(label_names) != saved:
        raise ModelError(
            f"{name_or_path} was trained on labels {saved} but data.label_names is {list(label_names)}; list the "
            "same names in the same order (a class id must mean the same class), or use a model trained on yours"
        )


def load_classifier(name_or_path: str, num_labels: int, *, eager_attention: bool = False,
                    head: Head = "require", auto_model: type = AutoModelForSequenceClassification,
                    label_names: Sequence[str] | None = None) -> PreTrainedModel:
    """Load a model with an `auto_model` head of `num_labels` outputs from a folder or hub name.

    `head` says whether a new classification head may be made (see `check_head`); the default refuses, so a
    model whose head has another number of labels is never silently re-initialised. `eager_attention=True`
    is needed to get attention maps (transformers 5 returns them only with attn_implementation="eager").
    """
    options = check_head(load_model_config(name_or_path), name_or_path, num_labels, head, auto_model, label_names)
    if eager_attention:
        options["attn_implementation"] = "eager"
    try:
        return auto_model.from_pretrained(name_or_path, **options)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "model", e) from e


def load_causal_lm(name_or_path: str, *, eager_attention: bool = False) -> PreTrainedModel:
    """Load an `AutoModelForCausalLM` (a language-model teacher or student) from a folder or hub name."""
    from transformers import AutoModelForCausalLM

    _check_source(name_or_path, "model")
    options = {"attn_implementation": "eager"} if eager_attention else {}
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **options)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "model", e) from e

# ----------------------------------------------------------------------------------------------------------------
# Building students


def _layer_list(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks and its state_dict prefix."""
    base = model.base_model
    for path in _LAYER_LIST_PATHS:
        module: Any = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            prefix = next(name for name, m in model.named_modules() if m is module)
            return prefix, module
    raise ModelError(
        f"{type(model).__name__} is not supported for layer selection (no encoder layer list found); "
        "build the student with student_from_config or a pretrained student instead"
    )


def student_from_teacher(teacher: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A smaller model of the teacher's class keeping `keep_layers` (0-based blocks), TextBrewer's "T3" init.

    Embeddings, the kept blocks (in the given order), pooler and classifier are copied from the teacher.
    """
    prefix, layers = _layer_list(teacher)
    if not keep_layers:
        raise ModelError("keep_layers is empty; list the teacher layers to keep, e.g. [0, 5]")
    for index in keep_layers:
        if not isinstance(index, int) or not 0 <= index < len(layers):
            raise ModelError(
                f"keep_layers index {index!r} is out of range; the teacher has {len(layers)} layers "
                f"(valid 0..{len(layers) - 1})"
            )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep_layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer settings must follow the kept layers
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    student = type(teacher)(config)

    # Everything outside the block list is copied as is; student block j is a copy of teacher block keep_layers[j].
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(prefix + ".")}
    for new, old in enumerate(keep_layers):
        for key, tensor in layers[old].state_dict().items():
            state[f"{prefix}.{new}.{key}"] = tensor
    student.load_state_dict(state, strict=True)
    param = next(teacher.parameters())
    return student.to(device=param.device, dtype=param.dtype)


def student_from_config(
    base: str | PretrainedConfig,
    num_labels: int,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    auto_model: type = AutoModelForSequenceClassification,
) -> PreTrainedModel:
    """A randomly initialised `auto_model` from a config (object, folder or hub name) with optional smaller sizes."""
    if isinstance(base, str):
        _check_source(base, "config")
        try:
            config = AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as e:
            raise _load_error(base, "config", e) from e
    else:
        config = copy.deepcopy(base)
    sizes = {"num_hidden_layers": num_layers, "hidden_size": hidden_size,
             "intermediate_size": intermediate_size, "num_attention_heads": num_heads}
    for key, value in sizes.items():
        if value is not None:
            if value < 1:
                raise ModelError(f"student {key} must be >= 1 (got {value})")
            setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise ModelError(
            f"student hidden_size={config.hidden_size} is not divisible by num_heads={config.num_attention_heads}; "
            "pick a hidden size that is a multiple of the head count"
        )
    if hasattr(config, "head_dim") and (hidden_size is not None or num_heads is not None):
        config.head_dim = config.hidden_size // config.num_attention_heads
    config.num_labels = num_labels
    return auto_model.from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# Inspecting


def num_layers(model: PreTrainedModel) -> int:
    """Number of transformer blocks."""
    return int(model.config.num_hidden_layers)


def hidden_size(model: PreTrainedModel) -> int:
    """Width of the hidden states."""
    return int(model.config.hidden_size)


def num_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


"""Folder, next to the caches it serves, of teacher identity memos (`<cache root>/.teachers/<key>.json`)."""


# ----------------------------------------------------------------------------------------------------------------
# Tiny offline models for tests and benchmarks


