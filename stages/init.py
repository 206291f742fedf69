"""`kd init`: a params.yaml for your own data files, with nothing left over from the demo.

`init(files)` reads the file(s) (CSV, JSON lines, Parquet or a `datasets` folder, as every stage does) and works
out what the settings need:

- the columns: the text (and a sentence pair's second text) and the label, by their names (`text`, `sentence`,
  `label`, `category`, ...) or as the one column of strings left; when it cannot tell, a one-line error lists the
  columns and the options that name them (`text_field=`, `label_field=`);
- the task kind from the label column's shape: one class per row (integers or strings), a list of labels per row
  (multi_label; or strings joined by `label_delimiter`), a number (regression), or lists of words and tags
  (token_classification), as stages/tasks reads them;
- string labels: their sorted names (`data.label_names`) and `num_labels`; a dev or test label missing from the
  training data is an error naming it;
- `max_length` for every stage: the 95th percentile of the training texts' token counts under the teacher's
  tokenizer, rounded up to a multiple of 16 and capped by the model's limit;
- the splits: one file is split by `kd prepare` into train/dev/test (seeded, stratified by label for one class per
  row); two files are train (dev split off it) and test; three are train, dev and test as they are;
- `id_field` only when every file has an `id` column of unique ids;
- a transfer set (sequence_classification of single texts): sentences of your unlabelled file (`unlabelled=`),
  else Penn Treebank sentences (`bundled:ptb_sentences`, general text), with the measured reason in a comment.

The file is written atomically, never over an existing one unless `force=True`. The `kd init` command calls this
function and prints the result.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import yaml

from cache_format import KDError, atomic_write_text
from stages.config import (BUNDLED_GENERAL_TRANSFER, BUNDLED_TEACHER, DEFAULT_STUDENT, ConfigError,
                           DistillConfig, EvaluateConfig, FastBertConfig, PrecomputeConfig, TrainTeacherConfig,
                           config_from_dict)
from stages.data import DataError, check_ids, label_strings, read_table, transfer_pool
from stages.data.splits import allocate
from stages.kinds import TASK_KINDS
from stages.models import load_model_config, load_tokenizer, resolve_model
from stages.tasks import get_task

__all__ = ["init", "InitResult", "InitError"]

# Column names that say what a column holds, in order of preference (compared in lower case).
TEXT_NAMES = ("text", "sentence", "sentence1", "premise", "question", "content", "review", "document", "body",
              "comment", "tweet", "utterance", "title", "headline")
PAIR_NAMES = {"text": ("text_pair", "text_b", "text2"), "sentence": ("sentence2", "pair"),
              "sentence1": ("sentence2",), "premise": ("hypothesis",), "question": ("sentence", "answer")}
LABEL_NAMES = ("label", "labels", "class", "category", "categories", "target", "topic", "sentiment", "intent",
               "score", "y", "tag")
TOKEN_NAMES = ("tokens", "words")
TAG_NAMES = ("tags", "ner_tags", "pos_tags", "labels", "label")
ID_COLUMN = "id"
KINDS = ("sequence_classification", "multi_label", "regression", "token_classification")  # the kinds it writes

MAX_LENGTH_STEP = 16  # max_length is rounded up to a multiple of this
LENGTH_SAMPLE = 20000  # texts tokenized to measure lengths (a seeded sample of larger files)
TRANSFER_EXAMPLES = 30000  # as measured (see TRANSFER_WHY); fewer when the source has fewer sentences
SPLIT_SEED = 13
ONE_FILE = {"train": 0.8, "dev": 0.1, "test": 0.1}
TWO_FILES = {"train": 0.9, "dev": 0.1}
TRANSFER_WHY = ("Unlabelled sentences the teacher labels: the student learns from them too. Measured on an unseen "
                "topic set, a 2x192 student got 86.1% with labels only, 89.2% distilled, and 94.2% distilled with "
                "30,000 teacher-labelled off-domain sentences.")


class InitError(KDError):
    """`kd init` cannot write settings for these files (the message says what to name or fix)."""


@dataclass(frozen=True)
class InitResult:
    """What `init` wrote and found."""

    params: Path
    task: str
    train: str
    dev: str | None
    test: str | None
    text_field: str | None
    text_pair_field: str | None
    label_field: str | None
    label_names: list[str] | None
    num_labels: int | None
    max_length: int
    length_p95: int
    split: dict[str, int] | None  # examples per split that `kd prepare` will write (None: the files are the splits)
    transfer_source: str | None
    transfer_examples: int | None
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def init(files: Sequence[str | os.PathLike], *, params: str | os.PathLike = "params.yaml", force: bool = False,
         teacher: str = BUNDLED_TEACHER, text_field: str | None = None, text_pair_field: str | None = None,
         label_field: str | None = None, label_delimiter: str | None = None, task: str | None = None,
         unlabelled: str | os.PathLike | None = None, transfer: bool = True, out_dir: str = "data") -> InitResult:
    """Write `params` for `files` (1 to 3 data files; see the module docstring) and return what it holds."""
    params = Path(params)
    if not 1 <= len(files) <= 3:
        raise InitError(f"give 1 to 3 data files (got {len(files)}): one file to split, or train and test, or "
                        "train, dev and test")
    if params.exists() and not force:
        raise InitError(f"{params} exists; pass --force to replace it (or --params OTHER.yaml to write another file)")
    if task is not None and task not in KINDS:
        raise InitError(f"--task {task!r}: kd init writes params for {', '.join(KINDS)}")
    paths = [str(f) for f in files]
    if any(Path(f).suffix.lower() == ".txt" for f in paths):
        raise InitError("kd init reads tables (CSV, JSON lines, Parquet); plain text for a language model "
                        "(data.task: causal_lm) needs params written by hand, see the Language models docs")
    tables = [read_table(f) for f in paths]
    if {"context", "answers"} <= set(tables[0].column_names):
        raise InitError(f"{paths[0]} looks like extractive QA (context, answers); kd init writes params for "
                        "classification, multi-label, regression and token classification: write them by hand, "
                        "see Task kinds, extractive QA")
    notes: list[str] = []
    cols = _columns(tables[0], paths[0], text_field, text_pair_field, label_field, label_delimiter, task)
    kind = cols["task"]
    for path, table in zip(paths[1:], tables[1:]):
        missing = [c for c in cols["used"] if c not in table.column_names]
        if missing:
            raise InitError(f"{path} has no column {', '.join(map(repr, missing))} (its columns: "
                            f"{', '.join(table.column_names)}); every file needs the columns of {paths[0]}")
    files_plan = _files(paths, tables, out_dir, unlabelled)
    label_info = _labels(kind, cols, paths, tables, notes)
    fractions = files_plan["fractions"]
    split = _split_counts(tables[0], cols, fractions, TASK_KINDS[kind].sequence_kd, notes) if fractions else None
    # Ids: the `id` column only when every file has one of unique ids (a split file keeps the source's).
    id_field = ID_COLUMN if all(_good_ids(t, p) for t, p in zip(tables, paths)) else None
    if any(ID_COLUMN in t.column_names for t in tables) and id_field is None:
        notes.append(f"the {ID_COLUMN!r} column is missing or not unique in a file, so ids are hashes of the text")
    max_length, p95, cap = _max_length(teacher, kind, cols, tables[0])
    if p95 > cap:
        notes.append(f"95% of the training texts fit in {p95} tokens, more than the teacher's {cap}: longer texts "
                     f"are cut to {cap}")
    transfer_source, transfer_examples, transfer_note = _transfer(kind, cols, tables, unlabelled, transfer)

    values = dict(task=kind, cols=cols, labels=label_info, id_field=id_field, teacher=teacher,
                  max_length=max_length, p95=p95, cap=cap, transfer_source=transfer_source,
                  transfer_examples=transfer_examples, transfer_note=transfer_note, files=paths, **files_plan)
    text = _params_yaml(values)
    _check_files(text, paths)
    if params.exists() and not force:
        raise InitError(f"{params} exists; pass --force to replace it")
    params.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(params, text)
    return InitResult(params=params, task=kind, train=files_plan["train"], dev=files_plan["dev"],
                      test=files_plan["test"], text_field=cols["text_field"], text_pair_field=cols["text_pair_field"],
                      label_field=cols["label_field"], label_names=label_info["names"],
                      num_labels=label_info["num_labels"], max_length=max_length, length_p95=p95, split=split,
                      transfer_source=transfer_source, transfer_examples=transfer_examples,
                      notes=notes + ([transfer_note] if transfer_note else []), commands=_commands(params, kind))


def _files(paths: list[str], tables: list[pa.Table], out_dir: str, unlabelled: Any) -> dict[str, Any]:
    """Where the splits come from: one file (or the first of two) is split by kd prepare into `out_dir`."""
    user_files = [Path(f) for f in paths] + ([Path(unlabelled)] if unlabelled else [])
    out_dir = _out_dir(out_dir, user_files)
    nested = [c for c, t in zip(tables[0].column_names, tables[0].schema.types) if pa.types.is_nested(t)]
    if len(paths) < 3 and nested:
        suffix = Path(paths[0]).suffix
        raise InitError(f"{paths[0]} has list columns ({', '.join(nested)}), which the CSV files of kd prepare's "
                        f"split cannot hold; give the train, dev and test files: kd init train{suffix} dev{suffix} "
                        f"test{suffix}")
    fractions = ONE_FILE if len(paths) == 1 else TWO_FILES if len(paths) == 2 else None
    if fractions is None:
        train, dev, test = paths
        return {"train": train, "dev": dev, "test": test, "source": None, "fractions": None, "out_dir": out_dir}
    split = {s: f"{out_dir}/{s}.csv" for s in fractions}
    return {"train": split["train"], "dev": split["dev"], "test": split.get("test", paths[-1]), "source": paths[0],
            "fractions": fractions, "out_dir": out_dir}


def _transfer(kind: str, cols: dict[str, Any], tables: list[pa.Table], unlabelled: Any,
              transfer: bool) -> tuple[str | None, int | None, str | None]:
    """(prepare.transfer_source, prepare.transfer_examples, why there is none)."""
    if not TASK_KINDS[kind].transfer:
        if unlabelled:
            raise InitError(f"--unlabelled: data.task {kind} takes no transfer set (sequence_classification only)")
        return None, None, f"no transfer set: data.task {kind} does not take one"
    if cols["text_pair_field"]:
        if unlabelled:
            raise InitError("--unlabelled: a transfer set of sentence pairs is not made by kd prepare; set "
                            "data.transfer to a file of pairs by hand")
        return None, None, "no transfer set: sentence pairs need unlabelled pairs, which kd prepare does not make"
    if not (unlabelled or transfer):
        return None, None, "no transfer set (--no-transfer)"
    source = str(unlabelled) if unlabelled else BUNDLED_GENERAL_TRANSFER
    if unlabelled:
        columns = read_table(unlabelled).column_names
        if cols["text_field"] not in columns:
            raise InitError(f"--unlabelled {unlabelled} has no column {cols['text_field']!r} (its columns: "
                            f"{', '.join(columns)}); name its text column {cols['text_field']!r} like the "
                            "labelled files'")
    labelled = [t for table in tables for t in _texts(table, cols)]
    available = len(transfer_pool(source, text_field=cols["text_field"], exclude=labelled))
    if available == 0:
        raise InitError(f"--unlabelled {unlabelled} holds no sentence of 5 to 40 words that is not in the "
                        "labelled files; give other texts, or leave --unlabelled out")
    return source, min(TRANSFER_EXAMPLES, available), None


def _check_files(text: str, paths: list[str]) -> None:
    """The settings load, and every file reads as the stages will read it (the task kind's reader; the split files
    do not exist yet, so the source stands for them)."""
    try:
        cfg = config_from_dict(yaml.safe_load(text))
    except ConfigError as e:  # a bug here, not the user's: say so plainly
        raise InitError(f"kd init wrote settings that do not load ({e}); please report it") from None
    task = get_task(cfg.data)
    for path in paths:
        try:
            task.load(path)
        except DataError as e:
            raise InitError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Columns and the task kind


def _columns(table: pa.Table, path: str, text_field: str | None, pair_field: str | None, label_field: str | None,
             delimiter: str | None, task: str | None) -> dict[str, Any]:
    """Which columns hold the text(s) and the label, and the task kind their shapes say."""
    names = table.column_names
    types = dict(zip(names, table.schema.types))
    lower = {n.lower(): n for n in names}
    listed = ", ".join(names)

    def need(column: str | None, option: str) -> None:
        if column is not None and column not in names:
            raise InitError(f"{path} has no column {column!r} ({option}); its columns: {listed}")

    for column, option in ((text_field, "--text-field"), (pair_field, "--text-pair-field"),
                           (label_field, "--label-field")):
        need(column, option)

    def is_list(column: str, strings: bool = False) -> bool:
        t = types[column]
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return False
        return not strings or pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)

    # Token classification: a column of word lists and one of tag lists.
    tokens = text_field if text_field and is_list(text_field) else None
    if tokens is None and text_field is None and task in (None, "token_classification"):
        tokens = next((lower[n] for n in TOKEN_NAMES if n in lower and is_list(lower[n], strings=True)), None)
    if tokens is not None or task == "token_classification":
        if tokens is None:
            raise _unclear(path, "word lists", listed, "--text-field")
        tags = label_field or next((lower[n] for n in TAG_NAMES if n in lower and is_list(lower[n])), None)
        if tags is None or not is_list(tags):
            raise _unclear(path, "tag lists", listed, "--label-field")
        return {"task": "token_classification", "text_field": None, "text_pair_field": None, "label_field": None,
                "tokens_field": tokens, "tags_field": tags, "label_delimiter": None, "used": [tokens, tags]}

    def is_text(column: str) -> bool:
        return pa.types.is_string(types[column]) or pa.types.is_large_string(types[column])

    found = [lower[n] for n in LABEL_NAMES if n in lower and lower[n] != text_field]
    if label_field is None and len(found) != 1:  # none, or several (e.g. `category` and `sentiment`)
        raise _unclear(path, "label", listed, "--label-field")
    label = label_field or found[0]
    text = text_field or next((lower[n] for n in TEXT_NAMES if n in lower and is_text(lower[n])
                               and lower[n] not in (label, pair_field)), None)
    if text is None:
        rest = [n for n in names if is_text(n) and n not in (label, pair_field, ID_COLUMN)]
        if len(rest) != 1:
            raise _unclear(path, "text", listed, "--text-field")
        text = rest[0]
    if not is_text(text):
        raise InitError(f"column {text!r} of {path} holds {types[text]}, not text; name the text column with "
                        f"--text-field (columns: {listed})")
    pair = pair_field
    if pair is None and text_field is None:
        pair = next((lower[n] for n in PAIR_NAMES.get(text.lower(), ()) if n in lower and is_text(lower[n])
                     and lower[n] != label), None)
    kind = task or _label_kind(table.column(label), delimiter)
    if delimiter is not None and kind != "multi_label":
        raise InitError(f"--label-delimiter only applies to multi-label data; {path}'s {label!r} reads as {kind}")
    return {"task": kind, "text_field": text, "text_pair_field": pair, "label_field": label, "tokens_field": None,
            "tags_field": None, "label_delimiter": delimiter, "used": [c for c in (text, pair, label) if c]}


def _unclear(path: str, what: str, listed: str, option: str) -> InitError:
    return InitError(f"kd init cannot tell which column of {path} holds the {what} (columns: {listed}); name it "
                     f"with {option} COLUMN (the options: --text-field, --text-pair-field, --label-field)")


def _label_kind(column: pa.ChunkedArray, delimiter: str | None) -> str:
    """The task kind a label column's values say: lists -> multi_label, non-integer numbers -> regression, else
    one class per row."""
    t = column.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or delimiter is not None:
        return "multi_label"
    values = [v for v in column.to_pylist() if v is not None]
    if pa.types.is_floating(t):
        return "regression" if any(float(v) != round(float(v)) for v in values) else "sequence_classification"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        numbers = [_number(v) for v in values]
        if values and all(n is not None for n in numbers) and any(n != round(n) for n in numbers):
            return "regression"
    return "sequence_classification"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------------------
# Labels, splits, ids


def _labels(kind: str, cols: dict[str, Any], paths: list[str], tables: list[pa.Table], notes: list[str]) -> dict:
    """label_names and num_labels for `kind`: names from the training file's strings, else the largest id + 1."""
    if TASK_KINDS[kind].regression:
        return {"names": None, "num_labels": None}
    column = cols["tags_field"] or cols["label_field"]
    names = label_strings(paths[0], column, delimiter=cols["label_delimiter"])
    if names is not None:
        for path in paths[1:]:
            unseen = [v for v in label_strings(path, column, delimiter=cols["label_delimiter"]) or [] if v not in names]
            if unseen:
                raise InitError(f"{path} has labels {unseen[:10]} that the training file {paths[0]} does not have "
                                f"(its labels: {names[:10]}{' ...' if len(names) > 10 else ''}); fix them, or add "
                                "examples of those classes to the training file")
        if len(names) < 2:
            raise InitError(f"{paths[0]} has one label, {names[0]!r}; a classifier needs at least two classes")
        if len(names) > 0.5 * tables[0].num_rows and kind == "sequence_classification":
            notes.append(f"{len(names)} distinct labels in {tables[0].num_rows} rows: is {column!r} the label "
                         "column? (--label-field names another)")
        return {"names": names, "num_labels": len(names)}
    ids = []
    for table, path in zip(tables, paths):
        for v in _flat(table.column(column)):
            try:
                ids.append(int(str(v).strip()) if not isinstance(v, (int, float)) else int(v))
            except ValueError:
                raise InitError(f"{path} has label {v!r} in column {column!r}; labels must be class ids or names") from None
    if not ids:
        raise InitError(f"{paths[0]} has no labels in column {column!r}")
    if min(ids) < 0:
        raise InitError(f"{paths[0]} has label {min(ids)} in column {column!r}; class ids start at 0")
    if max(ids) < 1:
        raise InitError(f"{paths[0]} has only class 0 in column {column!r}; a classifier needs at least two classes")
    return {"names": None, "num_labels": max(ids) + 1}


def _flat(column: pa.ChunkedArray) -> list[Any]:
    values = column.to_pylist()
    out: list[Any] = []
    for v in values:
        if isinstance(v, list):
            out.extend(x for x in v if x is not None)
        elif v is not None:
            out.append(v)
    return out


def _split_counts(table: pa.Table, cols: dict[str, Any], fractions: dict[str, float], stratify: bool,
                  notes: list[str]) -> dict[str, int]:
    """Examples per split that `kd prepare` will write (the same arithmetic), and notes on rare classes."""
    labels = [str(v) for v in table.column(cols["label_field"]).to_pylist()] if stratify else ["all"] * table.num_rows
    groups: dict[str, int] = {}
    for v in labels:
        groups[v] = groups.get(v, 0) + 1
    counts = {s: 0 for s in fractions}
    for size in groups.values():
        for s, k in allocate(size, fractions).items():
            counts[s] += k
    rare = sorted(v for v, n in groups.items() if n < 10) if stratify else []
    if rare:
        notes.append(f"classes with fewer than 10 examples ({', '.join(rare[:10])}) may have none in dev or test")
    return counts


def _good_ids(table: pa.Table, path: str) -> bool:
    if ID_COLUMN not in table.column_names or pa.types.is_nested(table.schema.field(ID_COLUMN).type):
        return False
    ids = [str(v) if v is not None else None for v in table.column(ID_COLUMN).to_pylist()]
    try:
        check_ids(ids, ID_COLUMN, Path(path))
    except DataError:
        return False
    return True


def _texts(table: pa.Table, cols: dict[str, Any]) -> list[str]:
    if cols["text_field"] is None:
        return []
    return [t for t in table.column(cols["text_field"]).to_pylist() if isinstance(t, str)]


def _out_dir(out_dir: str, user_files: list[Path]) -> str:
    """`out_dir`, or `prepared` when a user file lies in it: `dvc repro` empties prepare's output folder."""
    for candidate in (out_dir, "prepared"):
        root = Path(candidate).resolve()
        if not any(root == f.resolve() or root in f.resolve().parents for f in user_files):
            return candidate
    raise InitError(f"your files lie in {out_dir}/ and prepared/, the folders kd prepare would write; pass "
                    "--out-dir DIR with another folder")


# ----------------------------------------------------------------------------------------------------------------
# max_length


def _max_length(teacher: str, kind: str, cols: dict[str, Any], table: pa.Table) -> tuple[int, int, int]:
    """(proposed max_length, 95th percentile of token counts, the model's limit) for the training texts."""
    src = resolve_model(teacher)
    tokenizer = load_tokenizer(src)
    cap = _limit(tokenizer, src)
    rows = np.arange(table.num_rows)
    if len(rows) > LENGTH_SAMPLE:
        rows = np.sort(np.random.default_rng(SPLIT_SEED).choice(len(rows), LENGTH_SAMPLE, replace=False))
    sample = table.take(pa.array(rows))
    if cols["tokens_field"]:
        words = [[str(w) for w in ws or []] or [""] for ws in sample.column(cols["tokens_field"]).to_pylist()]
        encoded = tokenizer(words, is_split_into_words=True, truncation=False, verbose=False)
    else:
        texts = [t or "" for t in sample.column(cols["text_field"]).to_pylist()]
        pairs = [t or "" for t in sample.column(cols["text_pair_field"]).to_pylist()] if cols["text_pair_field"] \
            else None
        encoded = tokenizer(texts, text_pair=pairs, truncation=False, verbose=False)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    p95 = int(math.ceil(np.percentile(lengths, 95))) if len(lengths) else 1
    proposed = max(MAX_LENGTH_STEP, int(math.ceil(p95 / MAX_LENGTH_STEP)) * MAX_LENGTH_STEP)
    return min(proposed, cap), p95, cap


def _limit(tokenizer: Any, src: str) -> int:
    """The longest input the model takes: its position embeddings, and the tokenizer's limit when it sets one."""
    limits = []
    if isinstance(tokenizer.model_max_length, int) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    positions = getattr(load_model_config(src), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else 512


# ----------------------------------------------------------------------------------------------------------------
# The params file


def _y(value: Any) -> str:
    """A value as one line of YAML (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1_000_000, sort_keys=False)
    return text.removesuffix("...\n").strip()


def _line(key: str, value: Any, comment: str = "", indent: int = 2) -> str:
    body = f"{' ' * indent}{key}: {_y(value)}"
    return f"{body:<40} # {comment}" if comment else body


def _params_yaml(v: dict[str, Any]) -> str:
    files = " ".join(v["files"])
    head = [f"# Settings for your data, written by `kd init {files}`.",
            "# Every key and its default: the params reference (docs/params.md); a key left out takes its default.",
            "# Next: `dvc repro` (or the stage commands kd init printed), then `kd report`."]
    return "\n".join(head + [""] + _data_lines(v) + [""] + _prepare_lines(v) + _stage_lines(v) + [""])


def _data_lines(v: dict[str, Any]) -> list[str]:
    cols, labels, kind = v["cols"], v["labels"], v["task"]
    out = ["data:", _line("task", kind, _task_comment(kind, cols))]
    if v["source"]:
        out += [_line("train", v["train"], f"written by `kd prepare` from {v['source']}"),
                _line("dev", v["dev"], "split off the same file"),
                _line("test", v["test"], "split off the same file" if "test" in v["fractions"] else "your test file")]
    else:
        out += [_line("train", v["train"]), _line("dev", v["dev"]), _line("test", v["test"])]
    if cols["tokens_field"]:
        out += [_line("tokens_field", cols["tokens_field"], "the word lists"),
                _line("tags_field", cols["tags_field"], "one tag per word"),
                _line("label_field", None, "token_classification reads tags_field")]
    else:
        out += [_line("text_field", cols["text_field"]),
                _line("text_pair_field", cols["text_pair_field"],
                      "the second text of each pair" if cols["text_pair_field"] else "single texts"),
                _line("label_field", cols["label_field"])]
    if cols["label_delimiter"]:
        out.append(_line("label_delimiter", cols["label_delimiter"], "labels joined in one string"))
    if labels["names"] is not None:
        out.append(_line("label_names", labels["names"], "the training file's labels, sorted: class id = position"))
    if labels["num_labels"] is not None:
        out.append(_line("num_labels", labels["num_labels"],
                         "one per label name" if labels["names"] else "the largest class id + 1"))
    out.append(_line("id_field", v["id_field"], "every file has unique ids in this column" if v["id_field"]
                     else "no id column in every file: each id is a hash of the text"))
    transfer_file = f"{v['out_dir']}/transfer.csv" if v["transfer_source"] else None
    out.append(_line("transfer", transfer_file, "the transfer set kd prepare builds (see prepare)" if transfer_file
                     else (v["transfer_note"] or "no transfer set")))
    return out


def _prepare_lines(v: dict[str, Any]) -> list[str]:
    out = ["prepare:"]
    if v["source"]:
        how = "stratified by label" if TASK_KINDS[v["task"]].sequence_kd else "not stratified"
        out += [_line("source", v["source"], f"the file kd prepare splits, seeded, {how}"),
                _line("fractions", v["fractions"]), _line("seed", SPLIT_SEED)]
    else:
        out.append(_line("source", None, "nothing to split: data.train/dev/test are your files"))
    out.append(_line("out_dir", v["out_dir"], "what kd prepare writes (a DVC output: do not keep your files here)"))
    if not v["transfer_source"]:
        return out + [_line("transfer_source", None, v["transfer_note"] or "no transfer set")]
    why = TRANSFER_WHY
    if v["transfer_source"] == BUNDLED_GENERAL_TRANSFER:
        why += (f" This source: {v['transfer_examples']:,} Penn Treebank (WSJ news) sentences, general text; "
                "or name a file of your own unlabelled texts (kd init --unlabelled FILE), bundled:imdb_sentences "
                "(movie reviews), or null for none.")
    else:
        why += " This source: your unlabelled texts, cut into sentences of 5 to 40 words; null for none."
    return out + [*_comment(why, 2), _line("transfer_source", v["transfer_source"]),
                  _line("transfer_examples", v["transfer_examples"], "distinct sentences drawn (seeded)")]


def _stage_lines(v: dict[str, Any]) -> list[str]:
    """augment.input and the stages' max_length, with the other keys dvc.yaml reads at their defaults."""
    train_teacher, distill, precompute = TrainTeacherConfig(), DistillConfig(), PrecomputeConfig()
    length = (f"95% of the training texts are at most {v['p95']} {Path(v['teacher']).name} tokens"
              + (f"; the model takes {v['cap']}" if v["p95"] > v["cap"] else ""))
    out = ["", "augment:", _line("input", v["train"], "kd augment (off until augment.ops names an operation)"),
           "", "train_teacher:", _line("model", v["teacher"], "a path or hub name; a new head is trained"),
           _line("max_length", v["max_length"], length),
           _line("epochs", train_teacher.epochs), _line("batch_size", train_teacher.batch_size),
           _line("lr", train_teacher.lr),
           "", "precompute:", _line("teachers", precompute.teachers, "cached once, read by every student"),
           _line("max_length", v["max_length"]),
           "", "distill:", f"{'  student:':<40} # a narrow 2-layer model in the teacher's architecture",
           *[_line(k, val, indent=4) for k, val in DEFAULT_STUDENT.model_dump(exclude_none=True).items()
             if val not in ({}, [])],
           _line("max_length", v["max_length"]), _line("epochs", distill.epochs),
           _line("batch_size", distill.batch_size), _line("lr", distill.lr),
           _line("warmup_ratio", distill.warmup_ratio), _line("seed", distill.seed),
           _line("teachers", distill.teachers, "live teachers; empty: precompute.teachers")]
    if TASK_KINDS[v["task"]].regression:
        out += ["  kd:", _line("loss", "mse", "a regression teacher outputs one number", indent=4)]
    return out + [_line("fastbert", FastBertConfig().model_dump(), "the fastbert stage of dvc.yaml"),
                  "", "evaluate:", f"{'  models:':<40} # dvc.yaml's evaluate stage adds fastbert",
                  *[_line(k, val, indent=4) for k, val in EvaluateConfig().models.items()],
                  _line("max_length", v["max_length"])]


def _comment(text: str, indent: int, width: int = 110) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width - indent - 2:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [f"{' ' * indent}# {x}" for x in lines + [line]]


def _task_comment(kind: str, cols: dict[str, Any]) -> str:
    if kind == "token_classification":
        return "lists of words and tags"
    if kind == "multi_label":
        return "several labels per row" + (f" (joined by {cols['label_delimiter']!r})" if cols["label_delimiter"]
                                           else " (a list)")
    if kind == "regression":
        return "a number per row"
    return "one class per row" if kind == "sequence_classification" else ""


def _commands(params: Path, kind: str) -> list[str]:
    default = params.resolve() == Path("params.yaml").resolve()
    opt = "" if default else f" --params {params}"
    stages = [f"kd prepare{opt}", f"kd train-teacher{opt}", f"kd precompute{opt}", f"kd distill{opt}",
              f"kd distill{opt} --set distill.teacher_signal=none --set distill.output=models/baseline "
              "--set distill.log_dir=dvclive/baseline --set distill.metrics=metrics/baseline.json",
              f"kd evaluate{opt}", f"kd report{opt}"]
    # dvc.yaml reads params.yaml next to it; its fastbert stage needs one class per example.
    if default and Path("dvc.yaml").exists() and TASK_KINDS[kind].sequence_kd:
        return ["dvc repro", "kd report", "# or, without DVC:", *stages]
    return stages
