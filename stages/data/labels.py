"""Class names of string labels: taken from the training split when `data.label_names` is unset.

A params file may leave `data.label_names` out when the labels are strings: every stage then takes the sorted
distinct labels of `data.train` (`resolve_labels`, which every stage function applies first through
`stages.tasks.checked`),
so a class id means the same class in every stage and every run on the same training file. A dev or test label
that the training split does not have is reported by `unseen_labels` (the up-front data check names them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from stages.config import Config, DataConfig
from stages.data.examples import DataError, read_table
from stages.kinds import TASK_KINDS

__all__ = ["label_column", "label_strings", "train_label_names", "with_label_names", "resolve_labels", "unseen_labels"]

_CLASS_ID = re.compile(r"\s*-?\d+\s*")
_MEMO: dict[tuple[Any, ...], list[str] | None] = {}


def label_column(data: DataConfig) -> str | None:
    """The column that holds the class names of `data.task` (the tag lists of token classification, else
    `data.label_field`); None for kinds without class names (regression, spans, language models)."""
    kind = TASK_KINDS[data.task]
    if kind.regression or kind.windows or kind.language_model:
        return None
    if "tags_field" in kind.options:
        return data.tags_field or "tags"
    return data.label_field


def label_strings(path: str | Path, field: str, *, delimiter: str | None = None) -> list[str] | None:
    """The distinct labels of column `field` of a data file, sorted, when they are strings.

    A column of strings, of lists of strings, or (with `delimiter`) of strings of labels joined by it. None when
    the labels are class ids (numbers, or strings that all read as integers), and when the file or column cannot
    be read here (a CoNLL file, a missing column): the task kind's own reader reports those.
    """
    try:
        table = read_table(path)
    except DataError:
        return None
    if field not in table.column_names:
        return None
    column = table.column(field)
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.list_flatten(column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    values = [v for v in column.to_pylist() if v is not None]
    if delimiter:
        values = [part.strip() for v in values for part in v.split(delimiter) if part.strip()]
    if not values or all(_CLASS_ID.fullmatch(v) for v in values):
        return None
    return sorted(set(values))


def train_label_names(data: DataConfig) -> list[str] | None:
    """`data.label_names`, else the sorted distinct string labels of `data.train` (None: class ids, or no names).

    Read once per file version (path, size and modification time) in a process."""
    field = label_column(data)
    if data.label_names is not None or field is None:
        return data.label_names
    path = Path(data.train)
    try:
        stat = path.stat()
    except OSError:
        return None  # the kind's reader says that the file is missing
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, field, data.label_delimiter)
    if key not in _MEMO:
        _MEMO[key] = label_strings(path, field, delimiter=data.label_delimiter)
    return _MEMO[key]


def with_label_names(data: DataConfig) -> DataConfig:
    """`data` with `label_names` (and `num_labels`) from the training split when its labels are strings and
    `data.label_names` is unset; unchanged otherwise.

    A `data.num_labels` given in the params that differs from the number of training labels is a DataError."""
    if data.label_names is not None:
        return data
    names = train_label_names(data)
    if names is None:
        return data
    shown = names if len(names) <= 10 else names[:10] + [f"... {len(names) - 10} more"]
    if len(names) < 2:
        raise DataError(f"data.train ({data.train}) has one label, {names[0]!r}; a classifier needs examples of at "
                        "least two classes")
    if "num_labels" in data.model_fields_set and data.num_labels != len(names):
        raise DataError(f"data.train ({data.train}) has {len(names)} labels {shown} but data.num_labels is "
                        f"{data.num_labels}; set num_labels: {len(names)} (or remove it), or list the classes in "
                        "data.label_names")
    return data.model_copy(update={"label_names": names, "num_labels": len(names)})


def resolve_labels(cfg: Config) -> Config:
    """`cfg` with `with_label_names` applied to its data (each task's data with `tasks:`).

    Every stage function runs on the settings this returns (`stages.tasks.checked`)."""
    if cfg.tasks:
        return cfg.model_copy(update={"tasks": [t.model_copy(update={"data": with_label_names(t.data)})
                                                for t in cfg.tasks]})
    data = with_label_names(cfg.data)
    return cfg if data is cfg.data else cfg.model_copy(update={"data": data})


def unseen_labels(data: DataConfig, path: str | Path, names: list[str]) -> list[str]:
    """The string labels of data file `path` (read as `data` says) that are not in `names`, sorted."""
    field = label_column(data)
    found = label_strings(path, field, delimiter=data.label_delimiter) if field else None
    known = set(names)
    return [v for v in found or [] if v not in known]
