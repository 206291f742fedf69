"""Data layer shared by every stage: read a table, turn it into validated, id'd examples, tokenize once, batch.

Example ids are what the teacher cache is keyed by, so they must survive reordering and filtering of the
source file. When the data has no id column, an example's id is a content hash of its text (and text pair);
see `load_examples` for why the label is left out and how exact duplicates are numbered.

Splitting a source into train/dev/test and cutting transfer sentences live in stages/prepare.py; the
epoch sampler lives next to the training loop in stages/train/loop.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch

from cache_format import KDError
from cache_format import combine_unordered, fingerprint
from cache_format import MAX_ID_BYTES
from stages._io import progress_bar

__all__ = [
    "read_text",
    "DataError",
    "Examples",
    "Encoded",
    "IGNORE_LABEL",
    "read_table",
    "string_column",
    "load_examples",
    "with_transfer",
    "where",
    "check_ids",
    "content_ids",
    "data_fingerprint",
    "encode",
    "collate",
    "model_inputs",
    "MODEL_INPUTS",
]

IGNORE_LABEL = -100  # the label of an unlabelled example: losses on gold labels skip it
_SUPPORTED_FORMATS = ".csv, .jsonl/.json (JSON lines), .parquet/.pq, or a folder saved by datasets' save_to_disk"
_TEXT_HINT = ("text columns must hold one string per row (lists of words are for data.task: "
              "token_classification)")
_PROGRESS_MIN_EXAMPLES = 5000  # below this, tokenizing takes about a second: a bar would only add noise


class DataError(KDError, ValueError):
    """The data cannot be read or is invalid (missing file or column, bad label, empty text...)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; an unreadable or non-UTF-8 file is a one-line DataError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read {path} ({e}); fix the path") from e


def read_table(path: str | os.PathLike, *, string_columns: Sequence[str] = ()) -> pa.Table:
    """Read a CSV, JSON-lines or Parquet file, or a `datasets` save_to_disk folder, into an Arrow table.

    `string_columns` are read as text even when they look numeric (so an id "007" stays "007" in a CSV).
    CSV is read as the standard allows: quoted values may hold line breaks.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; fix the path (supported: {_SUPPORTED_FORMATS})")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pa_csv.read_csv(
                path,
                # Without newlines_in_values, Arrow cuts the file into blocks at any newline, even inside quotes.
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in string_columns}),
            )
        if suffix in (".jsonl", ".json"):
            return pa_json.read_json(path)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "JSON lines: one object per line" if suffix in (".jsonl", ".json") else suffix
        raise DataError(f"cannot parse {path} as {hint} ({first_line}); fix the file or convert it") from e
    raise DataError(f"unknown data format {suffix!r} for {path}; use {_SUPPORTED_FORMATS}")


def _read_saved_dataset(path: Path) -> pa.Table:
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise DataError(f"{path} is a folder but not a datasets save_to_disk folder; use {_SUPPORTED_FORMATS}")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path} is a Hugging Face datasets folder; run `pip install datasets` to read it") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{path} holds several splits ({', '.join(ds)}); point the data path at one split folder, "
            f"e.g. {path / next(iter(ds))}"
        )
    return ds.with_format("arrow")[:]


# ----------------------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class Examples:
    """Validated examples: parallel lists of ids and texts, optional second texts, labels and words.

    `labels` is what the task kind reads (stages/tasks): int64 class ids for sequence classification,
    a [N, C] 0/1 matrix for multi-label, float64 targets for regression, one int64 array of tag ids per
    example for token classification, answer records for extractive QA. `words` holds the word lists of
    token classification (`texts` is then the words joined by spaces, for ids and display).
    """

    ids: list[str]
    texts: list[str]
    text_pairs: list[str] | None
    labels: Any
    words: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def load_examples(
    path: str | os.PathLike,
    *,
    text_field: str,
    text_pair_field: str | None = None,
    label_field: str | None = None,
    id_field: str | None = None,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    parse_labels: Callable[[pa.ChunkedArray, list[str], Path, str], Any] | None = None,
) -> Examples:
    """Load and validate examples from a data file (see `read_table` for the formats).

    Labels must be ints in [0, num_labels), or strings listed in `label_names` (mapped to their index);
    `parse_labels(column, ids, path, label_field)` replaces that rule (task kinds with other labels).

    Ids: the `id_field` value (as a string, must be unique) when given. Otherwise a 16-hex-digit content hash
    of (text, text pair), so reordering or filtering the file keeps every id. The label is deliberately not
    hashed: teacher outputs depend only on the text, so a stage that loads the same file without labels
    (precompute) gets the same ids as one that loads it with labels (distill). Exact duplicate texts get a
    stable occurrence suffix in file order (`<hash>`, `<hash>-2`, `<hash>-3`, ...) instead of an error.
    """
    path = Path(path)
    table = read_table(path, string_columns=[f for f in (id_field, text_field, text_pair_field) if f])
    for role, name in (("id_field", id_field), ("text_field", text_field), ("text_pair_field", text_pair_field),
                       ("label_field", label_field)):
        if name is not None and name not in table.column_names:
            raise DataError(
                f"column {name!r} ({role}) not found in {path}; available columns: {', '.join(table.column_names)}"
            )
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows; give a file with at least one example")

    texts = string_column(table, text_field, path, "text_field").to_pylist()
    pairs = string_column(table, text_pair_field, path, "text_pair_field").to_pylist() if text_pair_field else None
    if id_field:
        # str(), not an Arrow cast, so ids of existing caches keep their spelling (e.g. a float id 1.0 -> "1.0").
        column = _flat_column(table, id_field, path, "id_field", "ids must be strings or numbers")
        ids = [str(v) if v is not None else None for v in column.to_pylist()]
        check_ids(ids, id_field, path)
    else:
        ids = content_ids(texts, pairs)
    for column, values in (("text", texts), ("text pair", pairs or [])):
        bad = next((i for i, t in enumerate(values) if t is None or not t.strip()), None)
        if bad is not None:
            raise DataError(f"{where(ids, bad)} in {path} has an empty {column}; remove the row or fill it in")
    labels = None
    if label_field and parse_labels is not None:
        labels = parse_labels(table.column(label_field), ids, path, label_field)
    elif label_field:
        labels = _labels(table.column(label_field), ids, path, label_field, num_labels, label_names)
    return Examples(ids=ids, texts=texts, text_pairs=pairs, labels=labels)


def with_transfer(train: Examples, transfer: Examples) -> Examples:
    """`train` followed by unlabelled `transfer` examples (label IGNORE_LABEL), for distillation.

    The teacher labels the transfer examples (precompute caches them like any other); the hard-label
    loss ignores them. Ids must not collide: the transfer ids get a `transfer-` prefix.
    """
    if (train.text_pairs is None) != (transfer.text_pairs is None):
        raise DataError("data.transfer must have a text pair column exactly when data.train has one")
    ids = ["transfer-" + i for i in transfer.ids]
    clash = set(ids) & set(train.ids)
    if clash:
        raise DataError(f"data.transfer ids {sorted(clash)[:3]} also occur in data.train; make them unique")
    labels = None
    if train.labels is not None:
        labels = np.concatenate([train.labels, np.full(len(transfer), IGNORE_LABEL, dtype=np.int64)])
    pairs = None if train.text_pairs is None else train.text_pairs + transfer.text_pairs
    return Examples(ids=train.ids + ids, texts=train.texts + transfer.texts, text_pairs=pairs, labels=labels)


def string_column(table: pa.Table, name: str, path: Path, role: str, hint: str = _TEXT_HINT) -> pa.ChunkedArray:
    """Column `name` of `table` (read from `path`) as strings, numbers cast to text.

    Lists, structs and other types with no one-string form are a DataError naming the column, its `role`
    (the setting that names it, e.g. "text_field"), its type and `hint` (what the column must hold).
    """
    column = _flat_column(table, name, path, role, hint)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    try:
        return pc.cast(column, pa.string())
    except pa.ArrowException as e:
        raise DataError(f"column {name!r} ({role}) in {path} has type {column.type}; {hint}") from e


def _flat_column(table: pa.Table, name: str, path: Path, role: str, hint: str) -> pa.ChunkedArray:
    column = table.column(name)
    if pa.types.is_nested(column.type):
        raise DataError(f"column {name!r} ({role}) in {path} has type {column.type}; {hint}")
    return column


def where(ids: Sequence[str], row: int) -> str:
    """How an error names a row: `example <id> (row <n>)`, n counted from 1."""
    return f"example {ids[row]} (row {row + 1})"


def check_ids(ids: list[str | None], id_field: str, path: Path) -> None:
    """Every id present, unique and within the cache's size limit, else a DataError naming the row."""
    for row, i in enumerate(ids, start=1):
        if i is None or not i.strip():
            raise DataError(f"row {row} of {path} has an empty {id_field!r}; every example needs an id")
        size = len(i.encode("utf-8"))
        if size > MAX_ID_BYTES:  # the cache's limit: fail here, naming the row, not inside the cache writer
            raise DataError(
                f"row {row} of {path} has an {id_field!r} of {size} UTF-8 bytes; ids must be at most "
                f"{MAX_ID_BYTES} bytes: shorten them or drop id_field to use content hashes"
            )
    if len(set(ids)) != len(ids):
        dups = sorted(i for i, count in Counter(ids).items() if count > 1)
        raise DataError(
            f"duplicate ids in column {id_field!r} of {path}: {', '.join(dups[:5])}"
            f"{' ...' if len(dups) > 5 else ''}; make the ids unique or drop id_field to use content hashes"
        )


def _labels(
    column: pa.ChunkedArray,
    ids: list[str],
    path: Path,
    field: str,
    num_labels: int | None,
    label_names: list[str] | None,
) -> np.ndarray:
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise DataError(
                f"num_labels={num_labels} but label_names has {len(label_names)} names; make them agree"
            )
        num_labels = len(label_names)
    if pa.types.is_nested(column.type):
        raise DataError(
            f"column {field!r} (label_field) in {path} has type {column.type}; labels must be integers or strings"
        )
    if column.null_count:
        row = column.is_null().to_pylist().index(True)
        raise DataError(f"{where(ids, row)} in {path} has no {field!r}; fill in every label or drop the row")
    values = column.to_pylist()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        if label_names is not None:
            index = {name: i for i, name in enumerate(label_names)}
            bad = next((i for i, v in enumerate(values) if v not in index), None)
            if bad is not None:
                unseen = sorted({v for v in values if v not in index})
                raise DataError(
                    f"{where(ids, bad)} in {path} has label {values[bad]!r}, not one of label_names "
                    f"{label_names} (labels of this file not listed: {_some(unseen)}); fix the labels or add "
                    "them to data.label_names"
                )
            return np.array([index[v] for v in values], dtype=np.int64)
        if not all(re.fullmatch(r"-?\d+", v.strip()) for v in values):
            found = sorted(set(values))
            more = f" (the first 10 of {len(found)} distinct labels; list them all)" if len(found) > 10 else ""
            raise DataError(
                f"{field!r} in {path} holds text labels; to map them to class ids, "
                f"set data.label_names: {json.dumps(found[:10], ensure_ascii=False)} in params.yaml{more}"
            )
        labels = np.array([int(v) for v in values], dtype=np.int64)
    elif pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
        labels = np.asarray(values, dtype=np.int64)
    elif pa.types.is_floating(column.type):
        floats = np.asarray(values, dtype=np.float64)
        if not np.all(floats == np.round(floats)):
            bad = int(np.flatnonzero(floats != np.round(floats))[0])
            raise DataError(
                f"{where(ids, bad)} in {path} has label {floats[bad]}, not an integer class id; "
                "use integer class ids, or set data.task: regression for numeric targets"
            )
        labels = floats.astype(np.int64)
    else:
        raise DataError(
            f"column {field!r} (label_field) in {path} has type {column.type}; labels must be integers or strings"
        )
    high = num_labels if num_labels is not None else np.iinfo(np.int64).max
    bad_rows = np.flatnonzero((labels < 0) | (labels >= high))
    if bad_rows.size:
        row = int(bad_rows[0])
        valid = f"[0, {num_labels})" if num_labels is not None else ">= 0"
        raise DataError(
            f"{where(ids, row)} in {path} has label {labels[row]}, outside the valid range {valid}; "
            "fix the label or num_labels"
        )
    return labels


def _some(values: Sequence[Any], n: int = 10) -> str:
    """`values` as a list for a message: the first `n` and how many more."""
    shown = json.dumps(list(values[:n]), ensure_ascii=False)
    return shown if len(values) <= n else f"{shown} and {len(values) - n} more"


def content_ids(texts: Sequence[str | None], pairs: Sequence[str | None] | None = None) -> list[str]:
    """Content-hash ids (16 hex digits) for texts (and pairs), numbering exact duplicates `-2`, `-3`... in order."""
    seen: dict[str, int] = {}
    ids = []
    for text, pair in zip(texts, pairs if pairs is not None else itertools.repeat(None)):
        h = fingerprint(("example", text, pair))[:16]
        seen[h] = seen.get(h, 0) + 1
        ids.append(h if seen[h] == 1 else f"{h}-{seen[h]}")
    return ids


def data_fingerprint(examples: Examples) -> str:
    """Order-independent hash of every example's (id, text, pair, label): any content change changes it."""
    pairs = examples.text_pairs if examples.text_pairs is not None else itertools.repeat(None)
    labels = [_plain(y) for y in examples.labels] if examples.labels is not None else itertools.repeat(None)
    if examples.words is None:
        return combine_unordered(
            fingerprint((i, t, p, y)) for i, t, p, y in zip(examples.ids, examples.texts, pairs, labels)
        )
    return combine_unordered(fingerprint((i, t, p, y, w)) for i, t, p, y, w
                             in zip(examples.ids, examples.texts, pairs, labels, examples.words))


def _plain(value: Any) -> Any:
    """A label as plain JSON-able Python (numpy scalars and arrays included), for hashing."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------
# Tokenize once, collate fast


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Encoded:
    """Token ids of every row, flat and token-major: row i is `input_ids[offsets[i]:offsets[i+1]]`.

    A row is one model input: an example, or one window of a long one (extractive QA), with its own id.
    `token_fields` are more per-token arrays in the same flat layout, collated to [B, T] and padded with
    the given value (e.g. token-classification labels). `extras` is whatever the task needs to score
    predictions (QA offsets and answers); collate ignores it.
    """

    ids: list[str]
    input_ids: np.ndarray  # int32, all rows concatenated
    offsets: np.ndarray  # int64, len(ids) + 1
    token_type_ids: np.ndarray | None  # int8, same layout as input_ids; only for text pairs
    labels: np.ndarray | None  # one per row: [N] or [N, ...]
    pad_token_id: int
    token_fields: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens of each example (int64)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer: Any, examples: Examples, max_length: int, batch_size: int = 1000) -> Encoded:
    """Tokenize every example once with a fast tokenizer (special tokens, truncation to `max_length`)."""
    has_pairs = examples.text_pairs is not None
    min_length = tokenizer.num_special_tokens_to_add(pair=has_pairs) + (2 if has_pairs else 1)
    if max_length < min_length:
        raise DataError(f"max_length={max_length} leaves no room for text; use max_length >= {min_length}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:  # decoder tokenizers often have none; the attention mask hides the value anyway
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    n = len(examples)
    ids_chunks: list[np.ndarray] = []
    type_chunks: list[np.ndarray] = []
    lengths = np.empty(n, dtype=np.int64)
    with progress_bar(total=n, desc="tokenize", unit="ex", hide_below=_PROGRESS_MIN_EXAMPLES) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            out = tokenizer(
                examples.texts[start:stop],
                text_pair=examples.text_pairs[start:stop] if has_pairs else None,
                truncation="longest_first",
                max_length=max_length,
                add_special_tokens=True,
                return_attention_mask=False,
                return_token_type_ids=has_pairs,
            )
            rows = out["input_ids"]
            lengths[start:stop] = [len(r) for r in rows]
            ids_chunks.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32))
            if has_pairs:
                type_chunks.append(np.fromiter(itertools.chain.from_iterable(out["token_type_ids"]), dtype=np.int8))
            bar.update(stop - start)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(
        ids=list(examples.ids),
        input_ids=np.concatenate(ids_chunks) if ids_chunks else np.zeros(0, np.int32),
        offsets=offsets,
        token_type_ids=np.concatenate(type_chunks) if has_pairs else None,
        labels=examples.labels,
        pad_token_id=int(pad_id),
    )


def collate(encoded: Encoded, rows: np.ndarray | Sequence[int]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pad the given examples to the batch's longest; returns (tensors, example ids in batch order).

    Tensors: input_ids, attention_mask, token_type_ids (zeros without pairs: BERT expects them), labels
    (when the rows have labels; int64, or float for float labels) and each of `encoded.token_fields`, of shape
    (B, T) or (B, ...). Only MODEL_INPUTS go to the model (`model_inputs`).
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = encoded.offsets[rows]
    lens = encoded.offsets[rows + 1] - starts
    width = int(lens.max()) if rows.size else 0
    positions = np.arange(width, dtype=np.int64)
    mask = positions[None, :] < lens[:, None]
    # Gather every (row, position) at once; padded slots point at index 0 and are overwritten below.
    index = np.where(mask, starts[:, None] + positions[None, :], 0)
    input_ids = np.where(mask, encoded.input_ids[index] if encoded.input_ids.size else 0, encoded.pad_token_id)
    if encoded.token_type_ids is not None:
        token_types = np.where(mask, encoded.token_type_ids[index], 0)
    else:
        token_types = np.zeros_like(input_ids)
    batch = {
        "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "token_type_ids": torch.from_numpy(token_types.astype(np.int64)),
    }
    if encoded.labels is not None:
        labels = encoded.labels[rows]
        batch["labels"] = torch.from_numpy(labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64))
    for name, (flat, pad) in encoded.token_fields.items():
        values = np.where(mask, flat[index] if flat.size else pad, pad)
        batch[name] = torch.from_numpy(values.astype(np.float32 if values.dtype.kind == "f" else np.int64))
    return batch, [encoded.ids[r] for r in rows.tolist()]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that the model takes (labels and task fields stay out)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}
