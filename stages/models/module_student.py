"""Students that are not Hugging Face transformers: any `torch.nn.Module` named by an import path.

The contract (README "Students that are not transformers"):

- **Built** as `Class(**module_kwargs)` from `distill.student.module: package.module:Class`. Constructor
  parameters named `num_labels`, `vocab_size` or `pad_token_id` that module_kwargs leaves out are filled from
  the task and the tokenizer (the first teacher's: the student reads the same token ids as the cache's rows).
- **Called** with keyword tensors: `input_ids` [B, T] (int64) and `attention_mask` [B, T] (1 = token,
  0 = padding, always on the right), plus `token_type_ids`, `output_hidden_states` and `output_attentions`
  only if `forward` names them (or takes **kwargs). Through `stages.methods.kd.distill_batches` (your own data,
  e.g. images) it gets whatever your batches hold: `model(x)` for a tensor, `model(**x)` for a dict, `model(*x)`
  for a tuple.
- **Returns** the logits (a tensor shaped as the task's head: [B, num_labels] for classification,
  [B, T, num_labels] per token), or a dict or object holding `logits` (`start_logits` and `end_logits` for
  extractive QA) and optionally `hidden_states` (a sequence of [B, T, H] tensors, 0 = the embeddings'
  output, as Hugging Face's) and `attentions` ([B, heads, T, T]) for `distill.matches`. To use matches the
  module also sets the int attributes `num_hidden_layers` and `hidden_size` (Hugging Face's config meaning).
- **Saved** as a folder: `model.safetensors` (the module's state_dict), `kd_module.json` (the import path, the
  keyword arguments as built, the label names and task head settings), the tokenizer's files and `kd_run.json`.
  `load_module_student` rebuilds it (the class must still import, with the same parameters);
  `load_trained` loads a folder of either kind, which is how `kd evaluate` loads every model.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import cache_format as cf
from stages._io import one_line, import_object
from stages.config import ConfigError
from stages.models.loading import ModelError

__all__ = ["MODULE_FILE", "WEIGHTS_FILE", "ModuleStudent", "BiLSTMClassifier", "as_output", "import_module_class", "module_student", "is_module_folder", "load_module_student"]

MODULE_FILE = "kd_module.json"  # marks a module student's folder (a transformer's has config.json)
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "kd-module v1"
_FILLED = ("num_labels", "vocab_size", "pad_token_id")  # constructor parameters the stage fills when left out


def as_output(out: Any) -> SimpleNamespace:
    """A model's return value as an object with `logits` (or the task's other outputs), `hidden_states`
    and `attentions` (None when absent): what the stages read from a Hugging Face model's output."""
    if isinstance(out, torch.Tensor):
        fields = {"logits": out}
    elif isinstance(out, Mapping):  # Hugging Face's ModelOutput is one
        fields = {k: v for k, v in out.items()}
    elif hasattr(out, "_asdict"):  # a namedtuple
        fields = out._asdict()
    elif isinstance(out, (tuple, list)) or not hasattr(out, "__dict__"):
        raise ModelError(f"the student returned a {type(out).__name__}; return the logits tensor, or a dict or "
                         "object with `logits` (and optionally `hidden_states`, `attentions`)")
    else:
        fields = dict(vars(out))
    if not any(k == "logits" or k.endswith("_logits") for k in fields):
        raise ModelError(f"the student's output has no logits (it holds {sorted(fields) or 'nothing'}); return "
                         "the logits tensor, or a dict or object with `logits`")
    return SimpleNamespace(**{"hidden_states": None, "attentions": None, **fields})


def _keywords(forward: Any) -> frozenset[str] | None:
    """The keyword parameters `forward` names, or None when it takes **kwargs (then it gets every input)."""
    params = inspect.signature(forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY)


class ModuleStudent(nn.Module):
    """A module under the student contract, with what the stages use of a Hugging Face model: an output
    with `.logits`, a `config` (layer count, width, label names) and `save_pretrained`.

    `module` is the wrapped model (its state_dict is what is saved); `path` and `kwargs` rebuild it.
    """

    def __init__(self, module: nn.Module, path: str, kwargs: Mapping[str, Any]):
        super().__init__()
        self.module = module
        self.path = path
        self.kwargs = dict(kwargs)
        self._takes = _keywords(module.forward)
        # What the stages read (num_hidden_layers, hidden_size: matches) and write (id2label, label2id and the
        # task's head settings: saved in kd_module.json). num_labels None: no check of the logits' width.
        self.config = SimpleNamespace(num_hidden_layers=int(getattr(module, "num_hidden_layers", 0)),
                                      hidden_size=int(getattr(module, "hidden_size", 0)), num_labels=None)

    def forward(self, *args: Any, output_hidden_states: bool = False, output_attentions: bool = False,
                **inputs: Any) -> SimpleNamespace:
        # Only the inputs the module names: a text student without token_type_ids never sees them.
        flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
        given = {k: v for k, v in {**inputs, **flags}.items()
                 if self._takes is None or k in self._takes}
        out = as_output(self.module(*args, **given))
        for flag, name in (("output_hidden_states", "hidden_states"), ("output_attentions", "attentions")):
            if flags[flag] and getattr(out, name) is None:
                raise ModelError(f"student {self.path} returned no {name}, which distill.matches need; return them "
                                 f"(a dict or object with `{name}`) or remove the matches")
        n = self.config.num_labels
        logits = getattr(out, "logits", None)
        if n is not None and logits is not None and logits.shape[-1] != n:
            raise ModelError(f"student {self.path} returns {logits.shape[-1]} logits per row but the task has "
                             f"{n} labels; make its head num_labels wide (take a num_labels parameter, or set "
                             "it in distill.student.module_kwargs)")
        return out

    def set_attn_implementation(self, name: str) -> None:
        """A no-op: Hugging Face models need eager attention to return maps; a module returns what it computes."""

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `model.safetensors` and `kd_module.json` into `folder` (the tokenizer is saved by the caller)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.module, str(folder / WEIGHTS_FILE))  # shared (tied) tensors are stored once
        record = {"format": _FORMAT, "module": self.path, "module_kwargs": self.kwargs, "config": vars(self.config)}
        cf.atomic_write_text(folder / MODULE_FILE, json.dumps(record, indent=2, default=str) + "\n")


def import_module_class(path: str, setting: str = "distill.student.module") -> type[nn.Module]:
    """The `torch.nn.Module` subclass named by `package.module:Class`; a one-line ConfigError otherwise."""
    cls = import_object(path, setting, "a torch.nn.Module class as package.module:Class")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        what = f"the class {cls.__name__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise ConfigError(f"{setting}: {path!r} is {what}, not a torch.nn.Module subclass; name the model class")
    return cls


def module_student(path: str, kwargs: Mapping[str, Any] | None = None, *, num_labels: int | None = None,
                   vocab_size: int | None = None, pad_token_id: int | None = None,
                   setting: str = "distill.student.module") -> ModuleStudent:
    """Build `Class(**kwargs)` from its import path; `num_labels`, `vocab_size` and `pad_token_id` go to the
    constructor parameters of those names that `kwargs` leaves out. `num_labels` also makes the student check
    the width of its logits."""
    cls = import_module_class(path, setting)
    params = inspect.signature(cls).parameters
    built = dict(kwargs or {})
    for name, value in zip(_FILLED, (num_labels, vocab_size, pad_token_id)):
        if value is not None and name in params and name not in built:
            built[name] = value
    try:
        module = cls(**built)
    except Exception as e:
        raise ConfigError(f"{setting}: {path}(**{built}) failed ({one_line(e)}); fix the keyword arguments "
                          "(distill.student.module_kwargs)") from None
    student = ModuleStudent(module, path, built)
    student.config.num_labels = num_labels
    return student


def is_module_folder(name_or_path: str | Path) -> bool:
    """Whether a folder holds a module student (`kd_module.json`) rather than a `save_pretrained` model."""
    return (Path(name_or_path) / MODULE_FILE).is_file()


def load_module_student(folder: str | Path) -> ModuleStudent:
    """Rebuild a saved module student: its class from the import path, its keyword arguments, its weights."""
    folder = Path(folder)
    where = folder / MODULE_FILE
    try:
        record = json.loads(where.read_text(encoding="utf-8"))
        path, kwargs, config = record["module"], record["module_kwargs"], record["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{where} is not a module student record ({one_line(e)}); save the student again") from None
    if record.get("format") != _FORMAT:
        raise ModelError(f"{where} has format {record.get('format')!r}, this version reads {_FORMAT!r}; "
                         "save the student again with this version")
    student = module_student(path, kwargs, setting=str(where))
    config["id2label"] = {int(k): v for k, v in (config.get("id2label") or {}).items()} or None
    vars(student.config).update(config)
    try:
        load_model(student.module, str(folder / WEIGHTS_FILE), strict=True)
    except (OSError, RuntimeError) as e:
        raise ModelError(f"{folder / WEIGHTS_FILE} does not load into {path}(**{kwargs}) ({one_line(e)}); the "
                         "class or its parameters changed since the student was saved") from None
    return student


# ----------------------------------------------------------------------------------------------------------------
# The shipped BiLSTM student


class BiLSTMClassifier(nn.Module):
    """Tang et al. (2019, arXiv 1903.12136)'s student: embedding -> BiLSTM -> pooling -> ReLU MLP -> logits.

    `pooling`: "last" (the last state of each direction, concatenated: the paper's) or "max" (max over the
    tokens). The embedding is `vocab_size` x `embedding_dim`, randomly initialised, on the teacher's token ids.
    """

    def __init__(self, vocab_size: int, num_labels: int, *, pad_token_id: int = 0, embedding_dim: int = 300,
                 lstm_size: int = 150, lstm_layers: int = 1, mlp_size: int = 200, dropout: float = 0.1,
                 pooling: str = "last"):
        super().__init__()
        if pooling not in ("last", "max"):
            raise ValueError(f"pooling must be 'last' or 'max' (got {pooling!r})")
        self.pooling = pooling
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_token_id)
        self.lstm = nn.LSTM(embedding_dim, lstm_size, num_layers=lstm_layers, batch_first=True, bidirectional=True,
                            dropout=dropout if lstm_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(2 * lstm_size, mlp_size), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_size, num_labels))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1])
        else:
            lengths = attention_mask.sum(1).clamp(min=1).cpu()
        # Packed: the backward direction starts at each row's last token, not at its padding.
        packed = pack_padded_sequence(self.dropout(self.embedding(input_ids)), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        if self.pooling == "last":
            pooled = torch.cat([h[-2], h[-1]], dim=-1)  # the top layer's forward and backward final states
        else:
            seq, _ = pad_packed_sequence(out, batch_first=True, padding_value=float("-inf"))
            pooled = seq.max(1).values
        return self.mlp(self.dropout(pooled))
