"""`kd augment`: write augmented views of a data file, as new examples the teacher labels once.

The operations of Tang et al. 2019 (arXiv 1903.12136) and TextBrewer's data utilities, one per view, on the
words of an example (whitespace-separated; token-classification data keeps its word lists):

- `mask`: each word, with probability p, becomes a mask token;
- `delete`: each word, with probability p, is dropped;
- `ngram`: the view is a random run of n consecutive words, n drawn from [min_n, max_n];
- `shuffle`: a local shuffle: word i goes to the rank of i + uniform(0, window), so it moves fewer than
  `window` places;
- `pos`: each word, with probability p, becomes another word seen in the input with the same tag, drawn by
  how often it was seen (token-classification data only: plain text has no tags).

mask, delete and pos always change at least one word. A view whose words equal its example's, another
example's or an earlier view's is dropped (counted in the result). Each view's randomness comes from a
seed derived from (augment.seed, the operation, its settings, the view number, the parent id) and its id
is `<parent id>~<op>-<recipe>` (recipe: 8 hex digits of the first four), so a rerun writes the same file
and a changed setting changes only the views it touches.

Text data gives a CSV/JSON-lines file with columns id, parent, op and the text column(s): a `data.transfer`
set. Token-classification data gives JSON lines with the word and tag lists (tags move with their words; a
masked or replaced word keeps its tag), read with the same data settings as the input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from cache_format import atomic_file
from cache_format import fingerprint
from cache_format import MAX_ID_BYTES
from stages._io import check_outputs, progress_bar
from stages.config import AugmentConfig, Config, ConfigError
from stages.data import DataError, Examples, load_examples, read_table
from stages.tasks import checked

__all__ = ["AugmentResult", "augment", "augment_examples", "View", "OPS", "TagVocabulary"]

_PROGRESS_MIN_EXAMPLES = 5000


@dataclass(frozen=True)
class View:
    """One augmented example: its id, the example it came from, the operation, its words (and tags)."""

    id: str
    parent: str
    op: str
    words: list[str]
    pair_words: list[str] | None = None
    tags: list[Any] | None = None


@dataclass(frozen=True)
class AugmentResult:
    """What `kd augment` wrote: the file, the examples read, views per operation, views dropped as repeats."""

    output: Path
    examples: int
    views: dict[str, int]
    duplicates: int
    included_input: int


class TagVocabulary:
    """Words seen with each tag and how often, for drawing a same-tag replacement of a word."""

    def __init__(self, words: Sequence[Sequence[str]], tags: Sequence[Sequence[Any]]):
        counts: dict[Any, dict[str, int]] = {}
        for ws, ts in zip(words, tags):
            for w, t in zip(ws, ts):
                seen = counts.setdefault(t, {})
                seen[w] = seen.get(w, 0) + 1
        self._words = {t: list(c) for t, c in counts.items()}
        self._index = {t: {w: i for i, w in enumerate(c)} for t, c in counts.items()}
        self._counts = {t: np.fromiter(c.values(), dtype=np.float64, count=len(c)) for t, c in counts.items()}
        self._cum = {t: np.cumsum(c) for t, c in self._counts.items()}

    def words(self, tag: Any) -> list[str]:
        """The words seen with `tag`."""
        return list(self._words.get(tag, []))

    def draw(self, tag: Any, exclude: str, rng: np.random.Generator) -> str:
        """A word seen with `tag`, other than `exclude`, drawn by frequency; `exclude` if there is no other."""
        counts, cum = self._counts[tag], self._cum[tag]
        j = self._index[tag].get(exclude)
        left = cum[-1] - (counts[j] if j is not None else 0.0)
        if left <= 0:
            return exclude
        r = rng.random() * left
        if j is not None and r >= cum[j] - counts[j]:
            r += counts[j]  # skip the excluded word's share of the line
        return self._words[tag][min(int(np.searchsorted(cum, r, side="right")), len(cum) - 1)]


# ----------------------------------------------------------------------------------------------------------------
# Operations: (words, tags or None, rng, settings, vocabulary) -> (new words, source position of each new word)

Op = Callable[[list[str], "list[Any] | None", np.random.Generator, dict, "TagVocabulary | None"],
              tuple[list[str], list[int]]]


def _pick(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Each of n positions with probability p, and at least one: a view that changes nothing is no view."""
    hit = rng.random(n) < p
    if n and not hit.any():
        hit[rng.integers(n)] = True
    return hit


def _mask(words, tags, rng, s, vocab):
    hit = _pick(len(words), s["p"], rng)
    return [s["token"] if h else w for w, h in zip(words, hit)], list(range(len(words)))


def _delete(words, tags, rng, s, vocab):
    if len(words) < 2:
        return list(words), list(range(len(words)))  # nothing can go: the view repeats its example, dropped
    hit = _pick(len(words), s["p"], rng)
    if hit.all():
        hit[rng.integers(len(words))] = False
    keep = np.flatnonzero(~hit).tolist()
    return [words[i] for i in keep], keep


def _ngram(words, tags, rng, s, vocab):
    n = min(int(rng.integers(s["min_n"], s["max_n"] + 1)), len(words))
    start = int(rng.integers(0, len(words) - n + 1))
    return words[start : start + n], list(range(start, start + n))


def _shuffle(words, tags, rng, s, vocab):
    order = np.argsort(np.arange(len(words)) + rng.uniform(0, s["window"], len(words)), kind="stable").tolist()
    return [words[i] for i in order], order


def _pos(words, tags, rng, s, vocab):
    hit = _pick(len(words), s["p"], rng)
    out = [vocab.draw(t, w, rng) if h else w for w, t, h in zip(words, tags, hit)]
    return out, list(range(len(words)))


OPS: dict[str, Op] = {"mask": _mask, "delete": _delete, "ngram": _ngram, "shuffle": _shuffle, "pos": _pos}


# ----------------------------------------------------------------------------------------------------------------
# Views of examples


def augment_examples(examples: Examples, ops: dict[str, dict], *, views: int, seed: int,
                     tags: Sequence[Sequence[Any]] | None = None) -> tuple[list[View], int]:
    """The views of `examples` (in example, operation, view-number order) and how many were dropped as repeats.

    `ops` maps operation names (OPS) to their settings; `tags` (one list per example, parallel to its words)
    is needed by `pos` and carried into the views. Words are `examples.words` when set, else the texts split
    at whitespace (text pairs likewise, each changed with the same operation).
    """
    if "pos" in ops and tags is None:
        raise ConfigError("augment.ops.pos replaces a word by another seen with the same tag, and this data has "
                          "no tags; use token_classification data with tags or remove augment.ops.pos")
    words = examples.words if examples.words is not None else [t.split() for t in examples.texts]
    pairs = [t.split() for t in examples.text_pairs] if examples.text_pairs is not None else None
    vocab = TagVocabulary(words, tags) if "pos" in ops else None
    # Per (op, view number): the recipe, hashed once; a view's seed adds its parent's id.
    recipes = {(op, k): fingerprint(("augment", op, settings, seed, k)) for op, settings in ops.items()
               for k in range(views)}
    seen = {_key(w, p) for w, p in zip(words, pairs or [None] * len(words))}
    out: list[View] = []
    dropped = 0
    with progress_bar(total=len(examples), desc="augment", unit="example", hide_below=_PROGRESS_MIN_EXAMPLES) as bar:
        for row, parent in enumerate(examples.ids):
            for (op, k), recipe in recipes.items():
                rng = np.random.default_rng(int(fingerprint((recipe, parent))[:16], 16))
                row_tags = tags[row] if tags is not None else None
                new, positions = OPS[op](words[row], row_tags, rng, ops[op], vocab)
                new_pair = OPS[op](pairs[row], None, rng, ops[op], vocab)[0] if pairs is not None else None
                key = _key(new, new_pair)
                if key in seen:
                    dropped += 1
                    continue
                seen.add(key)
                view_id = f"{parent}~{op}-{recipe[:8]}"
                if len(view_id.encode("utf-8")) > MAX_ID_BYTES:
                    raise DataError(f"example {parent}: its view id {view_id[:40]}... is over {MAX_ID_BYTES} "
                                    "bytes; shorten the input's ids")
                out.append(View(view_id, parent, op, new, new_pair,
                                [row_tags[i] for i in positions] if row_tags is not None else None))
            bar.update(1)
    return out, dropped


def _key(words: Sequence[str], pair: Sequence[str] | None) -> tuple:
    return (tuple(words), tuple(pair) if pair is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# The stage


def augment(cfg: Config) -> AugmentResult:
    """Write `augment.output`: the views of `augment.input` (see the module docstring), written atomically.

    With no operation on (the default), the file holds no views (only the input with include_input).
    """
    cfg = checked(cfg, data=False)  # string labels named from data.train
    a, d = cfg.augment, cfg.data
    ops = {name: op.model_dump() for name, op in a.ops.enabled().items()}
    if ops and cfg.tasks:
        raise ConfigError("kd augment reads one data set (the data section) and tasks: is set; run it with a "
                          "single-task params file whose data section is the task's")
    check_outputs({"augment.output": (a.output, "file")})
    examples, tags = _load(cfg)
    if "mask" in ops:
        ops["mask"]["token"] = _mask_token(ops["mask"]["token"])
    views, dropped = augment_examples(examples, ops, views=a.views, seed=a.seed, tags=tags) if ops else ([], 0)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, a, d, examples, tags, views)
    counts = {op: sum(v.op == op for v in views) for op in ops}
    return AugmentResult(out, len(examples), counts, dropped, len(examples) if a.include_input else 0)


def _load(cfg: Config) -> tuple[Examples, list[list[Any]] | None]:
    """The input's examples and, for token classification, each one's tags (names when data.label_names)."""
    a, d = cfg.augment, cfg.data
    if d.task == "token_classification":
        from stages.tasks import get_task  # the kind's own reader (JSON lines, Parquet, CoNLL), its checks

        examples = get_task(d).load(a.input)
        names = d.label_names
        tags = [[names[t] if names else int(t) for t in row.tolist()] for row in examples.labels]
        return examples, tags
    columns = read_table(a.input, string_columns=[d.text_field]).column_names
    id_field = d.id_field if d.id_field in columns else None  # e.g. an unlabelled set without ids: content ids
    return load_examples(a.input, text_field=d.text_field, text_pair_field=d.text_pair_field,
                         id_field=id_field), None


def _mask_token(spec: str) -> str:
    """`spec`, or the mask token of the tokenizer it names (`tokenizer:<model folder>`)."""
    if not spec.startswith("tokenizer:"):
        return spec
    from transformers import AutoTokenizer

    name = spec.removeprefix("tokenizer:")
    if not Path(name).is_dir():
        raise DataError(f"augment.ops.mask.token: {name!r} is not a folder; name a saved model or tokenizer "
                        "folder (e.g. tokenizer:models/teacher) or write the token itself, e.g. [MASK]")
    try:
        token = AutoTokenizer.from_pretrained(name).mask_token
    except (OSError, ValueError) as e:
        raise DataError(f"augment.ops.mask.token: cannot load the tokenizer {name!r} ({str(e).splitlines()[0]}); "
                        "give a model folder or write the token itself, e.g. [MASK]") from None
    if not token or len(token.split()) != 1:
        raise DataError(f"augment.ops.mask.token: the tokenizer {name!r} has no one-word mask token ({token!r}); "
                        "write the token itself, e.g. [MASK]")
    return token


def _write(out: Path, a: AugmentConfig, d, examples: Examples, tags, views: list[View]) -> None:
    """The input rows (with include_input, op "original") then the views, as CSV or JSON lines."""
    id_col = d.id_field or "id"
    tokens = tags is not None
    rows: list[dict[str, Any]] = []
    if a.include_input:
        for i, parent in enumerate(examples.ids):
            row = {id_col: parent, "parent": "", "op": "original"}
            if tokens:
                row.update({d.tokens_field or "tokens": examples.words[i], d.tags_field or "tags": tags[i]})
            else:
                row[d.text_field] = examples.texts[i]  # as written in the input, spacing included
                if d.text_pair_field:
                    row[d.text_pair_field] = examples.text_pairs[i]
            rows.append(row)
    rows += [_row(d, id_col, v) for v in views]
    names = [id_col, "parent", "op"] + ([d.tokens_field or "tokens", d.tags_field or "tags"] if tokens else
                                         [d.text_field] + ([d.text_pair_field] if d.text_pair_field else []))
    with atomic_file(out) as f:
        if out.suffix.lower() == ".csv":
            pa_csv.write_csv(pa.table({n: pa.array([r[n] for r in rows], pa.string()) for n in names}), f)
        else:
            for r in rows:
                f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))


def _row(d, id_col: str, v: View) -> dict[str, Any]:
    row: dict[str, Any] = {id_col: v.id, "parent": v.parent, "op": v.op}
    if v.tags is not None:
        row[d.tokens_field or "tokens"] = v.words
        row[d.tags_field or "tags"] = v.tags
    else:
        row[d.text_field] = " ".join(v.words)
        if d.text_pair_field:
            row[d.text_pair_field] = " ".join(v.pair_words or [])
    return row
