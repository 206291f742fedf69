"""Token classification (NER, part-of-speech tagging): one tag per word, softmax over tags.

Data: JSON lines / Parquet with a list-of-words column (data.tokens_field, "tokens") and a list-of-tags column
(data.tags_field, "tags": names listed in data.label_names, or ids in [0, num_labels)); or CoNLL column files
(.conll, .bio, .iob, .txt): `word<TAB or spaces>...tag` a line (the last column is the tag), a blank line
between sentences, `-DOCSTART-` lines skipped. CoNLL ids are content hashes of the words.

Words, not sub-tokens, are the unit of everything that leaves the model: the tag of a word is trained (and
predicted) on its first sub-token (data.label_all_subwords: the hard loss trains every sub-token on it), and
the teacher signal is one logit vector per word, at the word's first sub-token, in word order. So the cache's
"T" axis counts words, and a student with another tokenizer still distils word by word (aligned by word index).

Truncation: words past `max_length` sub-tokens have no position; they count as wrongly predicted (tag "O" for
the entity metrics) and the KD loss covers only the words both teacher and student kept. A word that
tokenizes to nothing (e.g. a lone zero-width character) is replaced by the tokenizer's unknown token, so it
keeps its position and later words keep theirs.

Metrics: word accuracy and macro-F1 over tags always; entity-level precision/recall/F1 (seqeval, default mode)
as well when data.label_names are all "O" or B-/I-/E-/S- tags (BIO or BIOES).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from transformers import AutoModelForTokenClassification

from stages.data import IGNORE_LABEL, DataError, Encoded, Examples, check_ids, content_ids, read_table, read_text, where
from stages.losses import hard_ce_loss, kd_loss
from stages.tasks.base import LabelledTask

__all__ = ["TokenClassification", "read_conll", "CONLL_SUFFIXES"]

CONLL_SUFFIXES = (".conll", ".bio", ".iob", ".txt")
_ENTITY_TAG = re.compile(r"O|[BIES]-.+")
_TOKEN_LOGITS = "token_logits"  # batch key: the token-level logits, kept for the all-subwords hard loss


def read_conll(path: str | Path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL column file as (words, tags): the first column is the word, the last the tag.

    Columns are split at TABs when the line has one (words may then hold spaces), else at whitespace.
    """
    path = Path(path)
    text = read_text(path)
    rows: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            if words:
                rows.append((words, tags))
                words, tags = [], []
            continue
        parts = [p.strip() for p in line.split("\t")] if "\t" in line else line.split()
        if parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2 or not parts[0] or not parts[-1]:
            raise DataError(f"{path} line {n}: expected word<TAB>tag (tag in the last column), got {line!r}; "
                            "fix or delete the line")
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        rows.append((words, tags))
    if not rows:
        raise DataError(f"{path} holds no sentences; give word<TAB>tag lines with a blank line between sentences")
    return rows


class TokenClassification(LabelledTask):
    name = "token_classification"
    auto_model = AutoModelForTokenClassification

    @property
    def tokens_field(self) -> str:
        return self.data.tokens_field or "tokens"

    @property
    def tags_field(self) -> str:
        return self.data.tags_field or "tags"

    @property
    def label_all_subwords(self) -> bool:
        return bool(self.data.label_all_subwords)

    # -- data -------------------------------------------------------------------------------------------------

    def load(self, path: str | Path, *, transfer: bool = False) -> Examples:
        if transfer:
            raise DataError("an unlabelled transfer set is not supported for data.task: token_classification; "
                            "remove data.transfer")
        path = Path(path)
        if path.suffix.lower() in CONLL_SUFFIXES and not path.is_dir():
            rows = read_conll(path)
            words = [w for w, _ in rows]
            raw_tags: list[list[Any]] = [t for _, t in rows]
            ids = content_ids([" ".join(w) for w in words])
        else:
            words, raw_tags, ids = self._read_columns(path)
        for row, (w, t) in enumerate(zip(words, raw_tags)):
            if not w:
                raise DataError(f"{where(ids, row)} in {path} has no words; remove the row")
            empty = next((k for k, x in enumerate(w) if x is None or not x.strip()), None)
            if empty is not None:
                raise DataError(f"{where(ids, row)} in {path}: word {empty + 1} is empty; remove the word and its "
                                "tag, or fill it in")
            if len(w) != len(t):
                raise DataError(f"{where(ids, row)} in {path} has {len(w)} words but {len(t)} tags; give exactly "
                                "one tag per word")
        labels = self._tag_ids(raw_tags, ids, path)
        return Examples(ids=ids, texts=[" ".join(w) for w in words], text_pairs=None, labels=labels, words=words)

    def _read_columns(self, path: Path) -> tuple[list[list[str]], list[list[Any]], list[str]]:
        d = self.data
        table = read_table(path, string_columns=[d.id_field] if d.id_field else [])
        for role, name in (("tokens_field", self.tokens_field), ("tags_field", self.tags_field),
                           ("id_field", d.id_field)):
            if name is not None and name not in table.column_names:
                fix = "; set data.id_field: null to use content hashes" if role == "id_field" else ""
                raise DataError(f"column {name!r} ({role}) not found in {path}; available columns: "
                                f"{', '.join(table.column_names)}{fix}")
        if table.num_rows == 0:
            raise DataError(f"{path} has no rows; give a file with at least one example")
        for role, name in (("tokens_field", self.tokens_field), ("tags_field", self.tags_field)):
            if not pa.types.is_list(table.column(name).type) and not pa.types.is_large_list(table.column(name).type):
                raise DataError(f"column {name!r} ({role}) in {path} has type {table.column(name).type}; it must "
                                "hold one list per row (words, or tags)")
        words = table.column(self.tokens_field).to_pylist()
        tags = table.column(self.tags_field).to_pylist()
        if d.id_field:
            ids = [str(v) if v is not None else None for v in table.column(d.id_field).to_pylist()]
            check_ids(ids, d.id_field, path)
        else:
            ids = content_ids([" ".join(w or []) for w in words])
        for row, (w, t) in enumerate(zip(words, tags)):
            if w is None or t is None:
                raise DataError(f"{where(ids, row)} in {path} has no {self.tokens_field if w is None else self.tags_field!r}; "
                                "fill it in or drop the row")
            if any(x is not None and not isinstance(x, str) for x in w):
                raise DataError(f"{where(ids, row)} in {path}: {self.tokens_field!r} must be a list of strings; "
                                "fix the row")
        return words, tags, ids

    def _tag_ids(self, tags: list[list[Any]], ids: list[str], path: Path) -> list[np.ndarray]:
        """Tag names (mapped through data.label_names) or ids in [0, num_labels) as one int64 array per example."""
        names, n = self.label_names, self.num_labels
        index = {t: i for i, t in enumerate(names)} if names is not None else None
        out = []
        for row, t in enumerate(tags):
            if any(isinstance(x, str) for x in t):
                if index is None:
                    found = sorted({x for ts in tags for x in ts if isinstance(x, str)})
                    more = f" (the first 50 of {len(found)})" if len(found) > 50 else ""
                    raise DataError(f"{path} holds text tags; to map them to tag ids, set data.label_names to "
                                    f"{found[:50]}{more} (and data.num_labels: {len(found)}) in the params file")
                bad = next((k for k, x in enumerate(t) if x not in index), None)
                if bad is not None:
                    raise DataError(f"{where(ids, row)} in {path}: word {bad + 1} has tag {t[bad]!r}, not one of "
                                    f"data.label_names; fix the tag or add it to data.label_names (and num_labels)")
                out.append(np.array([index[x] for x in t], dtype=np.int64))
                continue
            bad = next((k for k, x in enumerate(t) if not isinstance(x, int) or isinstance(x, bool)
                        or not 0 <= x < n), None)
            if bad is not None:
                raise DataError(f"{where(ids, row)} in {path}: word {bad + 1} has tag {t[bad]!r}, not a tag id in "
                                f"[0, {n}); fix the tag or data.num_labels")
            out.append(np.array(t, dtype=np.int64))
        return out

    def encode(self, tokenizer: Any, examples: Examples, max_length: int, batch_size: int = 1000) -> Encoded:
        """Sub-tokens of each example's words, with the token fields `word_index` (the word's number at its
        first sub-token, -1 elsewhere) and `labels` (its tag id there, or on all its sub-tokens with
        label_all_subwords; IGNORE_LABEL elsewhere). extras: "tags" (every word's tag id, truncated or not)."""
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"token classification needs a fast tokenizer (for word ids), but "
                            f"{type(tokenizer).__name__} is not one; use a model with a tokenizer.json")
        min_length = tokenizer.num_special_tokens_to_add(pair=False) + 1
        if max_length < min_length:
            raise DataError(f"max_length={max_length} leaves no room for words; use max_length >= {min_length}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        words = examples.words
        if words is None:
            raise DataError("token classification needs word lists; load the data with data.task: "
                            "token_classification")
        rows: list[list[int]] = []
        word_ids: list[list[int | None]] = []
        for start in range(0, len(words), batch_size):
            chunk = words[start : start + batch_size]
            out = self._tokenize(tokenizer, chunk, max_length)
            for k in range(len(chunk)):
                ids, wids = out["input_ids"][k], out.word_ids(k)
                present = {w for w in wids if w is not None}
                kept = max(present, default=-1) + 1
                # A gap, or missing words in a row that was not truncated: some word has no sub-token.
                if len(present) != kept or (kept < len(chunk[k]) and len(ids) < max_length):
                    ids, wids = self._without_empty_words(tokenizer, chunk[k], max_length, examples.ids[start + k])
                rows.append(ids)
                word_ids.append(wids)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        word_index = np.full(int(offsets[-1]), -1, dtype=np.int64)
        token_labels = np.full(int(offsets[-1]), IGNORE_LABEL, dtype=np.int64)
        for r, wids in enumerate(word_ids):
            tags = examples.labels[r] if examples.labels is not None else None
            previous = None
            for t, w in enumerate(wids):
                if w is None:
                    previous = None
                    continue
                first = w != previous
                previous = w
                if first:
                    word_index[offsets[r] + t] = w
                if tags is not None and (first or self.label_all_subwords):
                    token_labels[offsets[r] + t] = tags[w]
        return Encoded(
            ids=list(examples.ids),
            input_ids=np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(offsets[-1])),
            offsets=offsets,
            token_type_ids=None,
            labels=None,
            pad_token_id=int(pad_id),
            token_fields={"word_index": (word_index, -1), "labels": (token_labels, IGNORE_LABEL)},
            extras={"tags": examples.labels},
        )

    @staticmethod
    def _tokenize(tokenizer: Any, words: list[list[str]], max_length: int) -> Any:
        return tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length,
                         add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False)

    def _without_empty_words(self, tokenizer: Any, words: list[str], max_length: int,
                             example_id: str) -> tuple[list[int], list[int | None]]:
        """Re-tokenize an example whose words include ones with no sub-token, those replaced by the unknown
        token: every word keeps its own position, so later words are not shifted onto the wrong tags."""
        pieces = tokenizer(words, is_split_into_words=False, add_special_tokens=False)["input_ids"]
        fixed = list(words)
        for k, p in enumerate(pieces):
            if not p:
                if tokenizer.unk_token is None:
                    raise DataError(f"example {example_id}: word {k + 1} ({words[k]!r}) tokenizes to nothing and "
                                    "the tokenizer has no unknown token; remove or replace that word")
                fixed[k] = tokenizer.unk_token
        out = self._tokenize(tokenizer, [fixed], max_length)
        return out["input_ids"][0], out.word_ids(0)

    # -- the teacher signal -----------------------------------------------------------------------------------

    def lengths(self, batch: dict[str, Tensor]) -> Tensor:
        """Words kept (not cut off by truncation) per row."""
        return (batch["word_index"] >= 0).sum(1)

    def logits(self, out: Any, batch: dict[str, Tensor]) -> Tensor:
        """Per-word logits [B, W, C] (the token logits at each word's first sub-token, in word order; zeros past
        a row's words), W = the batch's most words kept."""
        token_logits = out.logits
        if self.label_all_subwords:
            batch[_TOKEN_LOGITS] = token_logits  # the hard loss trains every sub-token (see `hard_loss`)
        return _by_word(token_logits, batch["word_index"], 0.0)

    def logits_shape(self) -> tuple[int | str, ...]:
        return ("T", self.num_labels)

    def cache_settings(self) -> dict[str, Any]:
        return {"task": self.name}

    # -- losses -----------------------------------------------------------------------------------------------

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of each word's tag on its word logits; with label_all_subwords, of every sub-token.

        `logits` are per word, so the word tags are gathered from the first sub-tokens the same way. The
        all-subwords loss needs the token logits, which `logits` left in the batch (the stages pass the same
        batch dict to both)."""
        if self.label_all_subwords:
            return hard_ce_loss(batch[_TOKEN_LOGITS].float(), batch["labels"])
        return hard_ce_loss(logits, _by_word(batch["labels"], batch["word_index"], IGNORE_LABEL))

    def kd_loss(self, student: Tensor, teacher: Tensor, batch: dict[str, Tensor], *, temperature: float | Tensor,
                kind: str, temperature_squared: bool, teacher_lengths: Tensor | None = None) -> Tensor:
        """`kd_loss` over the words both the student and (every) teacher kept, by word index."""
        kept = self.lengths(batch)
        if teacher_lengths is not None:
            kept = torch.minimum(kept, teacher_lengths.to(kept.device))
        mask = torch.arange(student.shape[1], device=student.device)[None, :] < kept[:, None]
        return kd_loss(student, teacher, temperature, kind=kind, temperature_squared=temperature_squared, mask=mask)

    # -- metrics ----------------------------------------------------------------------------------------------

    def predictions(self, logits: Tensor, batch: dict[str, Tensor]) -> list[np.ndarray]:
        """Each row's predicted tag id per word kept."""
        tags = logits.argmax(-1).cpu().numpy()
        return [tags[b, :n] for b, n in enumerate(self.lengths(batch).tolist())]

    def gather(self, parts: list[tuple[np.ndarray, Any]], n: int) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros(0, np.int64)] * n
        for rows, values in parts:
            for r, v in zip(rows.tolist(), values):
                out[r] = v
        return out

    def score(self, data: Encoded, predictions: list[np.ndarray]) -> dict[str, float]:
        """Word accuracy and macro-F1 over tags; entity precision/recall/F1 (seqeval) for BIO/BIOES tag names.

        Words cut off by truncation count as predicted wrong ("O" for the entity metrics); how many there
        were is reported as `truncated_words` when there are any."""
        gold = data.extras["tags"]
        full = [np.concatenate([p, np.full(len(g) - len(p), -1, np.int64)]) for g, p in zip(gold, predictions)]
        flat_gold = np.concatenate(gold) if gold else np.zeros(0, np.int64)
        flat_pred = np.concatenate(full) if full else np.zeros(0, np.int64)
        metrics = {"accuracy": float((flat_pred == flat_gold).mean()) if flat_gold.size else float("nan"),
                   "macro_f1": _macro_f1(flat_gold, flat_pred)}
        names = self.label_names
        if names is not None and all(_ENTITY_TAG.fullmatch(t) for t in names):
            from seqeval.metrics import f1_score, precision_score, recall_score

            def tag(i: int) -> str:
                return names[i] if i >= 0 else "O"

            y_true = [[names[i] for i in g] for g in gold]
            y_pred = [[tag(i) for i in p] for p in full]
            metrics.update(precision=float(precision_score(y_true, y_pred, zero_division=0)),
                           recall=float(recall_score(y_true, y_pred, zero_division=0)),
                           f1=float(f1_score(y_true, y_pred, zero_division=0)))
        truncated = int(sum(len(g) - len(p) for g, p in zip(gold, predictions)))
        if truncated:
            metrics["truncated_words"] = float(truncated)
        return metrics


def _by_word(values: Tensor, word_index: Tensor, fill: float | int) -> Tensor:
    """Token-major `values` [B, T, ...] -> word-major [B, W, ...]: position w of a row holds the value at its
    word w's first sub-token (`word_index` [B, T], -1 elsewhere); `fill` past the row's words."""
    rows, tokens = (word_index >= 0).nonzero(as_tuple=True)
    width = int(word_index.max().clamp_min(-1)) + 1 if word_index.numel() else 0
    out = values.new_full((values.shape[0], width, *values.shape[2:]), fill)
    out[rows, word_index[rows, tokens]] = values[rows, tokens]
    return out


def _macro_f1(gold: np.ndarray, pred: np.ndarray) -> float:
    """Mean F1 over the tags that occur in `gold` or `pred` (-1, a truncated word, is no tag but is wrong)."""
    f1s = []
    for c in np.unique(np.concatenate([gold, pred[pred >= 0]])):
        tp = np.sum((pred == c) & (gold == c))
        f1s.append(2 * tp / (np.sum(pred == c) + np.sum(gold == c)))
    return float(np.mean(f1s)) if f1s else float("nan")
