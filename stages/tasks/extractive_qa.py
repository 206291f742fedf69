"""Extractive question answering (SQuAD v1.1): the answer is a span of the context, predicted as a start and an
end token.

Data: a SQuAD v1.1 JSON file ({"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}]}]}]}]}), or a table (JSON lines, Parquet, CSV is not useful: answers are
nested) with id, question, context and answers ({"text": [...], "answer_start": [...]}, the `datasets` layout)
columns. Every answer must be at its character offset in its context.

Rows: a context too long for max_length is cut into overlapping windows (`doc_stride` tokens shared by
neighbours), each window its own row with id `<example id>#<k>`. Cache: per window, per token, the teacher's
start and end logits ([T, 2]). Losses: the mean of cross-entropy on the gold start and end tokens (the first
answer; the first token when the answer is not wholly in the window, as SQuAD v1 training does), and a
soft-target loss over the token axis for start and for end. Metrics: exact match and F1 of the best span over
all windows of an example, as the official SQuAD v1.1 script computes them, as fractions in [0, 1].
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn
from transformers import AutoModelForQuestionAnswering

from cache_format import KDError
from cache_format import MAX_ID_BYTES
from stages.data import DataError, Encoded, Examples, content_ids, read_table, string_column, where
from stages.losses import hard_ce_loss, kd_loss
from stages.tasks.base import LabelledTask

__all__ = ["ExtractiveQA", "normalize_answer", "squad_exact_match", "squad_f1"]

DOC_STRIDE = 128  # the usual SQuAD setting at max_length 384; capped at max_length // 3 for shorter windows
MAX_ANSWER_LENGTH = 30
# A window id is the example id + "#" + the window number: the example id must leave room for that suffix in
# the cache's id limit. 7 digits is ten million windows of one context, far more than any real one needs.
_WINDOW_SUFFIX_BYTES = 8
MAX_EXAMPLE_ID_BYTES = MAX_ID_BYTES - _WINDOW_SUFFIX_BYTES
_MASKED = -1e9  # logit of a padded token: no probability after softmax, yet finite (0 * log p stays 0, not NaN)
_START, _END = "qa_start_char", "qa_end_char"  # token fields: each context token's character span, -1 elsewhere


class ExtractiveQA(LabelledTask):
    name = "extractive_qa"
    auto_model = AutoModelForQuestionAnswering

    @property
    def num_labels(self) -> int:
        return 2  # a QA head's outputs per token: start and end (config.num_labels of ...ForQuestionAnswering)

    @property
    def label_names(self) -> list[str] | None:
        return None

    def doc_stride(self, max_length: int) -> int:
        """Tokens shared by consecutive windows: data.doc_stride, else 128 capped at max_length // 3."""
        return self.data.doc_stride if self.data.doc_stride is not None else max(1, min(DOC_STRIDE, max_length // 3))

    @property
    def max_answer_length(self) -> int:
        """The longest span predicted, in tokens."""
        return self.data.max_answer_length or MAX_ANSWER_LENGTH

    def cache_settings(self) -> dict[str, Any]:
        # The windows depend on the stride (max_length is recorded by the stages); max_answer_length is scoring only.
        return {"task": self.name, "doc_stride": self.data.doc_stride}

    # -- data -------------------------------------------------------------------------------------------------

    def load(self, path: str | Path, *, transfer: bool = False) -> Examples:
        """Read a SQuAD v1.1 JSON file or a table of questions; labels are one answers record per question."""
        path = Path(path)
        if transfer:
            raise DataError(f"{path}: an unlabelled transfer set is not supported for data.task: extractive_qa; "
                            "remove data.transfer")
        squad = _read_squad(path)
        ids, questions, contexts, answers = squad if squad is not None else self._read_table(path)
        _check_examples(path, ids, questions, contexts, answers)
        return Examples(ids=ids, texts=questions, text_pairs=contexts, labels=answers)

    def _read_table(self, path: Path) -> tuple[list[str], list[str], list[str], list[dict]]:
        d = self.data
        q_field, c_field = d.question_field or "question", d.context_field or "context"
        a_field = d.answers_field or "answers"
        table = read_table(path, string_columns=[f for f in (d.id_field, q_field, c_field) if f])
        for role, name in (("id_field", d.id_field), ("question_field", q_field), ("context_field", c_field),
                           ("answers_field", a_field)):
            if name is not None and name not in table.column_names:
                raise DataError(f"column {name!r} (data.{role}) not found in {path}; available columns: "
                                f"{', '.join(table.column_names)}; fix data.{role} or the file")
        if table.num_rows == 0:
            raise DataError(f"{path} has no rows; give a file with at least one question")
        questions = string_column(table, q_field, path, "question_field", "questions must be strings").to_pylist()
        contexts = string_column(table, c_field, path, "context_field", "contexts must be strings").to_pylist()
        if d.id_field:
            ids = [str(v) if v is not None else "" for v in table.column(d.id_field).to_pylist()]
        else:
            ids = content_ids(questions, contexts)
        column = table.column(a_field)
        if not pa.types.is_struct(column.type):
            raise DataError(f"column {a_field!r} (data.answers_field) in {path} has type {column.type}; it must hold "
                            '{"text": [...], "answer_start": [...]} per row (the datasets SQuAD layout)')
        answers = []
        for row, value in enumerate(column.to_pylist()):
            texts, starts = (value or {}).get("text"), (value or {}).get("answer_start")
            if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                raise DataError(f"{where(ids, row)} in {path} has answers {value!r}; give equally long lists "
                                '{"text": [...], "answer_start": [...]}')
            answers.append({"text": texts, "answer_start": starts})
        return ids, questions, contexts, answers

    def encode(self, tokenizer: Any, examples: Examples, max_length: int, batch_size: int = 1000) -> Encoded:
        """Tokenize (question, context) pairs into windows of at most `max_length` tokens, `doc_stride` apart.

        Row labels: [N, 2] start/end token of the first answer in that window, (0, 0) when it is not wholly
        inside. Token fields `qa_start_char`/`qa_end_char`: each context token's character span (-1 for question,
        special and padding tokens). Extras: `example` (each row's example index), `contexts`, `answers`.
        """
        stride = self.doc_stride(max_length)
        questions = [q.lstrip() for q in examples.texts]  # leading blanks would only eat the window
        contexts = examples.text_pairs or []
        _check_room(tokenizer, examples.ids, questions, max_length, stride)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:  # the attention mask hides padded tokens whatever their id
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

        ids, example_of, labels, lengths = [], [], [], []
        input_ids, type_ids, start_chars, end_chars = [], [], [], []
        answers = examples.labels
        for first in range(0, len(examples), batch_size):
            out = tokenizer(questions[first:first + batch_size], contexts[first:first + batch_size],
                            truncation="only_second", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True, return_attention_mask=False)
            windows: Counter[int] = Counter()
            for w, sample in enumerate(out["overflow_to_sample_mapping"]):
                ex = first + sample
                ids.append(f"{examples.ids[ex]}#{windows[ex]}")
                windows[ex] += 1
                example_of.append(ex)
                context = np.array([s == 1 for s in out.sequence_ids(w)])
                chars = np.asarray(out["offset_mapping"][w], dtype=np.int64).reshape(-1, 2)
                chars[~context] = -1
                labels.append(_window_label(chars, answers[ex] if answers is not None else None))
                input_ids.append(np.asarray(out["input_ids"][w], dtype=np.int32))
                if "token_type_ids" in out:
                    type_ids.append(np.asarray(out["token_type_ids"][w], dtype=np.int8))
                start_chars.append(chars[:, 0])
                end_chars.append(chars[:, 1])
                lengths.append(len(out["input_ids"][w]))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
        return Encoded(
            ids=ids,
            input_ids=flat(input_ids, np.int32),
            offsets=offsets,
            token_type_ids=flat(type_ids, np.int8) if type_ids else None,
            labels=np.asarray(labels, dtype=np.int64).reshape(-1, 2),
            pad_token_id=int(pad_id),
            token_fields={_START: (flat(start_chars, np.int64), -1), _END: (flat(end_chars, np.int64), -1)},
            extras={"example": np.asarray(example_of, dtype=np.int64), "contexts": list(contexts),
                    "answers": [a["text"] for a in answers] if answers is not None else None},
        )

    # -- the teacher signal -----------------------------------------------------------------------------------

    def logits(self, out: Any, batch: dict[str, Tensor]) -> Tensor:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)  # [B, T, 2]

    def logits_shape(self) -> tuple[int | str, ...]:
        return ("T", 2)

    # -- losses -----------------------------------------------------------------------------------------------

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean of cross-entropy on the start and on the end token (padded tokens take no probability)."""
        start, end = _per_token(logits, batch["attention_mask"].bool())
        labels = batch["labels"]
        return (hard_ce_loss(start, labels[:, 0]) + hard_ce_loss(end, labels[:, 1])) / 2

    def kd_loss(self, student: Tensor, teacher: Tensor, batch: dict[str, Tensor], *, temperature: float | Tensor,
                kind: str, temperature_squared: bool, teacher_lengths: Tensor | None = None) -> Tensor:
        """Soft-target loss over the token axis, for start and end (mean of the two), padded tokens left out."""
        mask = batch["attention_mask"].bool()
        if teacher_lengths is not None:
            mine = mask.sum(1).cpu()
            theirs = teacher_lengths.cpu().to(mine.dtype)
            if not torch.equal(mine, theirs):
                row = int((mine != theirs).nonzero()[0])
                raise KDError(
                    f"extractive_qa distils per-token start/end logits, but a window has {int(theirs[row])} teacher "
                    f"tokens and {int(mine[row])} student tokens; give the student the teacher's tokenizer "
                    "(e.g. distill.student.from_teacher) and the same max_length and data.doc_stride as precompute"
                )
        s = torch.cat(_per_token(student, mask))  # [2B, T]: start rows, then end rows
        t = torch.cat(_per_token(teacher, mask))
        if kind != "mse":
            return kd_loss(s, t, temperature, kind=kind, temperature_squared=temperature_squared)
        # MSE is a mean over the token axis: over each row's real tokens, not the batch's padded width.
        valid = torch.cat([mask, mask]).to(s.dtype)
        per_row = (((s - t) / temperature) ** 2 * valid).sum(1) / valid.sum(1).clamp_min(1)
        return (per_row * (temperature**2 if temperature_squared else 1)).mean()

    # -- metrics ----------------------------------------------------------------------------------------------

    def predictions(self, logits: Tensor, batch: dict[str, Tensor]) -> np.ndarray:
        """Per window, the best span (start <= end, at most max_answer_length tokens, in the context):
        [B, 3] float64 of (start logit + end logit, start char, end char); score -inf when there is none."""
        start_chars, end_chars = batch[_START], batch[_END]
        context = start_chars >= 0
        positions = torch.arange(logits.shape[1], device=logits.device)
        gap = positions[None, :] - positions[:, None]  # [i, j] = j - i: the span's length - 1
        allowed = (gap >= 0) & (gap < self.max_answer_length)
        allowed = allowed[None] & context[:, :, None] & context[:, None, :]
        scores = (logits[..., 0, None] + logits[..., None, :, 1]).masked_fill(~allowed, float("-inf"))
        best, index = scores.flatten(1).max(1)
        i, j = index // logits.shape[1], index % logits.shape[1]
        chars = torch.stack([start_chars.gather(1, i[:, None])[:, 0], end_chars.gather(1, j[:, None])[:, 0]], 1)
        return torch.cat([best[:, None].double(), chars.double()], 1).cpu().numpy()

    @torch.no_grad()
    def predict(self, model: nn.Module, data: Encoded, batch_size: int, device: torch.device) -> list[str]:
        """The predicted answer text of every example (not row): the best-scoring span over its windows."""
        rows = super().predict(model, data, batch_size, device)  # [rows, 3], in row order
        contexts = data.extras["contexts"]
        best = np.full(len(contexts), -np.inf)
        texts = [""] * len(contexts)
        for (score, start, end), ex in zip(rows, data.extras["example"]):
            if score > best[ex]:
                best[ex] = score
                texts[ex] = contexts[ex][int(start):int(end)]
        return texts

    def score(self, data: Encoded, predictions: list[str]) -> dict[str, float]:
        """SQuAD v1.1 exact match and F1 (best over each question's gold answers), averaged, as fractions."""
        golds = data.extras["answers"]
        if not golds:
            return {"exact_match": float("nan"), "f1": float("nan")}
        em = [max(squad_exact_match(p, g) for g in gold) for p, gold in zip(predictions, golds)]
        f1 = [max(squad_f1(p, g) for g in gold) for p, gold in zip(predictions, golds)]
        return {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking


def _read_squad(path: Path) -> tuple[list[str], list[str], list[str], list[dict]] | None:
    """The questions of a SQuAD-layout JSON file, or None if `path` is not one (e.g. JSON lines)."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # JSON lines (several documents) or not JSON: the table reader reports what is wrong
    if not isinstance(doc, dict) or "data" not in doc:
        return None
    ids, questions, contexts, answers = [], [], [], []
    hint = ('the SQuAD v1.1 layout is {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", '
            '"answers": [{"text", "answer_start"}]}]}]}]}')
    try:
        for a, article in enumerate(doc["data"]):
            for p, paragraph in enumerate(article["paragraphs"]):
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    if qa.get("is_impossible"):
                        raise DataError(f"question {qa.get('id')} in {path} is unanswerable (SQuAD v2); only "
                                        "SQuAD v1.1 (every question answered) is supported: remove it")
                    ids.append(str(qa["id"]))
                    questions.append(qa["question"])
                    contexts.append(context)
                    answers.append({"text": [x["text"] for x in qa["answers"]],
                                    "answer_start": [x["answer_start"] for x in qa["answers"]]})
    except (KeyError, TypeError) as e:
        at = f"question {ids[-1]}" if ids else "the start"
        raise DataError(f"{path} is not a SQuAD v1.1 file (missing or wrong {e} after {at}); {hint}") from None
    return ids, questions, contexts, answers


def _check_examples(path: Path, ids: list[str], questions: list, contexts: list, answers: list[dict]) -> None:
    """Ids unique and short enough for window ids; texts non-empty; every answer at its offset."""
    if not ids:
        raise DataError(f"{path} has no questions; give a file with at least one")
    for row, i in enumerate(ids):
        if not i.strip():
            raise DataError(f"question {row + 1} of {path} has an empty id; every question needs an id")
        if len(i.encode("utf-8")) > MAX_EXAMPLE_ID_BYTES:
            raise DataError(f"question {i[:40]}... in {path} has an id over {MAX_EXAMPLE_ID_BYTES} UTF-8 bytes "
                            "(window ids add a suffix within the cache's limit); shorten the ids")
    dups = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dups:
        raise DataError(f"duplicate question ids in {path}: {', '.join(dups[:5])}; make the ids unique")
    for qid, question, context, answer in zip(ids, questions, contexts, answers):
        for what, text in (("question", question), ("context", context)):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"question {qid} in {path} has an empty {what}; fill it in or remove the question")
        if not answer["text"]:
            raise DataError(f"question {qid} in {path} has no answers; give at least one (SQuAD v1.1) or remove it")
        for text, start in zip(answer["text"], answer["answer_start"]):
            if not isinstance(text, str) or not text.strip() or not isinstance(start, int) or isinstance(start, bool):
                raise DataError(f"question {qid} in {path} has answer {text!r} at {start!r}; answers need a "
                                "non-empty text and an integer answer_start")
            if context[start:start + len(text)] != text:
                found = context.find(text)
                fix = (f"set answer_start to {found} (where the text first occurs)" if found >= 0
                       else "the text does not occur in the context: fix the answer text")
                raise DataError(f"question {qid} in {path}: answer {text!r} is not at answer_start {start} of its "
                                f"context (which reads {context[start:start + len(text)]!r} there); {fix}")


def _check_room(tokenizer: Any, ids: list[str], questions: list[str], max_length: int, stride: int) -> None:
    """Each window must hold the question, the special tokens and more than `stride` context tokens."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    lengths = [len(x) for x in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    for qid, n in zip(ids, lengths):
        room = max_length - specials - n
        if room <= stride:  # the tokenizer would panic ("stride must be strictly less than max_len")
            raise DataError(
                f"question {qid} has {n} tokens, so a window of max_length {max_length} leaves {room} context "
                f"tokens, not more than doc_stride {stride}; raise max_length (to at least "
                f"{specials + n + stride + 1}) or lower data.doc_stride"
            )


def _window_label(chars: np.ndarray, answer: dict | None) -> tuple[int, int]:
    """Start and end token of the first answer in a window (token character spans `chars`, -1 outside the
    context); (0, 0), the first token, when the answer is not wholly inside."""
    if answer is None:
        return (0, 0)
    begin = answer["answer_start"][0]
    finish = begin + len(answer["text"][0])
    context = np.flatnonzero(chars[:, 0] >= 0)
    if not context.size or chars[context[0], 0] > begin or chars[context[-1], 1] < finish:
        return (0, 0)
    start = context[chars[context, 0] <= begin][-1]
    end = context[chars[context, 1] >= finish][0]
    return (int(start), int(end))


def _per_token(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Start and end logits [B, T] with padded tokens at a large negative value."""
    return logits[..., 0].masked_fill(~mask, _MASKED), logits[..., 1].masked_fill(~mask, _MASKED)


# ----------------------------------------------------------------------------------------------------------------
# The official SQuAD v1.1 metric


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse white space (SQuAD v1.1's evaluate)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_PUNCTUATION = frozenset(string.punctuation)


def squad_exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalized texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalized texts (bag of words)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)
