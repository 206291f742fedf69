"""Causal language modelling: predict the next token of text packed into fixed-length blocks.

Data: a `.txt` file (one document per line; blank lines skipped) or a table (CSV, JSON lines, Parquet, a datasets
folder) with the text in data.text_field (blank rows skipped). No labels and no ids: a document's id is its
position among the documents, so reordering them (which changes the blocks) changes the data fingerprint.

Rows are blocks, not documents: the documents are joined into one corpus string with "\\n" between them, each
document's tokens (no special tokens) are followed by the tokenizer's EOS id, and the token stream is cut into
blocks of exactly `max_length` tokens (the last partial block is left out, and how many tokens that drops is
printed). A block's id is `<block index, 7 digits>-<sha256 of its text, 12 hex digits>`: the same tokenizer,
data and max_length give the same ids, so reruns and resumes find the same rows. Position t of a row predicts
token t + 1.

Per row, `Encoded.extras` holds "text" (the corpus slice from the block's first token to its last),
"char_offsets" (int32 [tokens, 2], flat token-major: each token's (start, end) in its block's text; an EOS is
(end of the previous token, the same), zero width) and "words" (whitespace-separated words per block, for
per-word perplexity). The token fields `char_start`/`char_end` carry the offsets into collated batches.

The cache (precompute) holds `input_ids`, `char_offsets` and the codec's fields (stages/tasks/lm_codecs.py), computed
from the teacher's last hidden state and output layer without building the [B, T, V] logits. Online distillation
asks for the full logits instead (`TeacherSpec.full_logits`): the same output layer over every position.

A language model has no label head, so this kind is a `Task` and not a `LabelledTask`: a stage that needs a head
(`kd train-teacher`, a module student's label count) gets the one-line `no_head` error.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

import cache_format as cf
from stages.config import LMCacheConfig
from stages.data import DataError, Encoded, Examples, read_table, read_text, string_column
from stages.tasks.lm_codecs import check_codec, check_dense_size, codec_fields, codec_settings, encode_rows
from stages.models import Top1, head_logits, lm_metrics, lm_scores
from stages.models import ModelError, load_causal_lm
from stages.tasks.base import TORCH_DTYPES, Task

__all__ = ["CausalLM"]

_NO_HEAD = ("data.task causal_lm has no label head (it predicts the vocabulary), and `kd train-teacher` does not "
            "train language models; give precompute.teachers a trained causal LM (e.g. bundled:smollm2-135m)")
_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


class CausalLM(Task):
    name = "causal_lm"
    no_head = _NO_HEAD

    # -- data -------------------------------------------------------------------------------------------------

    def load(self, path: str | Path, *, transfer: bool = False) -> Examples:
        """The non-blank documents of a text file (one a line) or of a table's data.text_field column."""
        if transfer:
            raise DataError("an unlabelled transfer set does not apply to data.task: causal_lm (all its text is "
                            "unlabelled); remove data.transfer")
        path = Path(path)
        if path.suffix.lower() == ".txt" and not path.is_dir():
            text = read_text(path)
            docs = [line.removesuffix("\r") for line in text.split("\n")]
        else:
            field = self.data.text_field
            table = read_table(path, string_columns=[field])
            if field not in table.column_names:
                raise DataError(f"column {field!r} (text_field) not found in {path}; available columns: "
                                f"{', '.join(table.column_names)}")
            docs = string_column(table, field, path, "text_field").to_pylist()
        docs = [d for d in docs if d is not None and d.strip()]
        if not docs:
            raise DataError(f"{path} holds no text (every document is blank); give one document per line "
                            "(.txt) or per row")
        return Examples(ids=[f"doc{i:07d}" for i in range(len(docs))], texts=docs, text_pairs=None, labels=None)

    def encode(self, tokenizer: Any, examples: Examples, max_length: int, batch_size: int = 1000) -> Encoded:
        """Pack the documents into blocks of `max_length` tokens (see the module docstring)."""
        _check_tokenizer(tokenizer)
        eos = int(tokenizer.eos_token_id)
        docs = examples.texts
        corpus = "\n".join(docs)
        token_parts: list[np.ndarray] = []
        span_parts: list[np.ndarray] = []
        doc_start, prev_end = 0, 0
        for first in range(0, len(docs), batch_size):
            chunk = docs[first : first + batch_size]
            out = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True,
                            return_attention_mask=False)
            for doc, ids, offsets in zip(chunk, out["input_ids"], out["offset_mapping"]):
                spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + doc_start
                if len(spans):
                    prev_end = int(spans[:, 1].max())
                # The EOS stands for the "\n" that joins documents: zero width, where the document's text ends.
                token_parts.append(np.asarray([*ids, eos], dtype=np.int32))
                span_parts.append(np.concatenate([spans, [[prev_end, prev_end]]]))
                doc_start += len(doc) + 1
        tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, np.int32)
        spans = np.concatenate(span_parts) if span_parts else np.zeros((0, 2), np.int64)
        blocks = len(tokens) // max_length
        if blocks == 0:
            raise DataError(f"the text has {len(tokens)} tokens (with an EOS after each document), fewer than one "
                            f"block of max_length={max_length}; give more text or lower max_length")
        dropped = len(tokens) - blocks * max_length
        if dropped:
            print(f"causal_lm: {blocks} blocks of {max_length} tokens; the last {dropped} tokens (a partial block) "
                  "are left out", file=sys.stderr)
        tokens = tokens[: blocks * max_length]
        spans = spans[: blocks * max_length].reshape(blocks, max_length, 2)
        first_char, last_char = spans[:, :, 0].min(1), spans[:, :, 1].max(1)
        texts = [corpus[a:b] for a, b in zip(first_char.tolist(), last_char.tolist())]
        char_offsets = (spans - first_char[:, None, None]).reshape(-1, 2).astype(np.int32)
        ids = [f"{b:07d}-{hashlib.sha256(t.encode('utf-8')).hexdigest()[:12]}" for b, t in enumerate(texts)]
        return _encoded(ids, tokens, np.full(blocks, max_length, np.int64), char_offsets, texts, tokenizer)

    def encode_like(self, tokenizer: Any, teacher_rows: Encoded, max_length: int) -> Encoded:
        """`tokenizer`'s rows for the blocks of `teacher_rows` (another tokenizer's `encode`): the same ids and
        texts, each text tokenized without special tokens and cut to `max_length` (row lengths may differ), with
        char offsets relative to the same block texts. For a student with another tokenizer."""
        _check_tokenizer(tokenizer)
        texts = teacher_rows.extras["text"]
        out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        truncation=True, max_length=max_length)
        rows = out["input_ids"]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.array([o for row in out["offset_mapping"] for o in row], dtype=np.int32).reshape(-1, 2)
        return _encoded(list(teacher_rows.ids), tokens, lengths, offsets, texts, tokenizer)

    # -- the teacher ------------------------------------------------------------------------------------------

    def check_teacher(self, config: PretrainedConfig, teacher: str, spec: Any) -> None:
        archs = config.architectures or []
        if archs and not any(a.endswith(_LM_ARCHITECTURES) for a in archs):
            raise ModelError(f"{teacher} is a {archs[0]}, not a causal language model; data.task causal_lm needs "
                             "a model that AutoModelForCausalLM loads (e.g. ...ForCausalLM)")
        if not spec.full_logits:
            check_codec(_lm(spec), _vocab_size(config), teacher)

    def check_rows(self, config: PretrainedConfig, teacher: str, spec: Any, rows: Encoded) -> None:
        if not spec.full_logits:
            check_dense_size(_lm(spec), _vocab_size(config), int(rows.offsets[-1]), teacher)

    def load_teacher(self, path_or_name: str, *, eager_attention: bool = False) -> nn.Module:
        return load_causal_lm(path_or_name, eager_attention=eager_attention)

    def teacher_forward(self, model: nn.Module, batch: dict[str, Tensor], *, hidden: bool, attentions: bool) -> Any:
        """The base model only: the codecs apply the output layer chunk by chunk (no [B, T, V] logits)."""
        return model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_hidden_states=hidden, output_attentions=attentions, use_cache=False)

    def teacher_signal(self, model: nn.Module, out: Any, batch: dict[str, Tensor], ids: Sequence[str],
                       spec: Any) -> dict[str, Tensor]:
        """The codec's fields and `char_offsets`; with `spec.full_logits`, `logits` [B, T, V] (the output layer on
        the whole batch at once, as the model's own forward applies it)."""
        if spec.full_logits:
            return {"logits": head_logits(model, out.last_hidden_state).to(TORCH_DTYPES[spec.dtype])}
        res = encode_rows(out.last_hidden_state, functools.partial(head_logits, model), _vocab_size(model.config),
                          self.lengths(batch), ids, _lm(spec))
        res["char_offsets"] = torch.stack([batch["char_start"], batch["char_end"]], dim=-1).int()
        return res

    def teacher_fields(self, spec: Any, config: PretrainedConfig) -> list[cf.FieldSpec]:
        if spec.full_logits:
            return [cf.FieldSpec("logits", spec.dtype, ("T", _vocab_size(config)))]
        return [*codec_fields(_lm(spec), _vocab_size(config)), cf.FieldSpec("char_offsets", "int32", ("T", 2))]

    def signal_settings(self, spec: Any) -> dict[str, Any]:
        return {"lm": "full_logits" if spec.full_logits else codec_settings(_lm(spec))}

    # -- metrics ----------------------------------------------------------------------------------------------

    needs_labels = False  # the text is its own target

    def load_model(self, path_or_name: str) -> nn.Module:
        return load_causal_lm(path_or_name)

    def evaluate(self, model: nn.Module, data: Encoded, batch_size: int, device: torch.device,
                 reference: Top1 | None = None) -> dict[str, float]:
        """Perplexity (per token and per word), ECE, tokens/s and, with the teacher's `reference` top-1 made on
        the same rows (a model with the teacher's tokenizer), top-1 agreement with it (`lm_metrics`)."""
        same_rows = reference is not None and reference.covers(data)
        vocab = model.get_output_embeddings().out_features
        return lm_metrics(model, data, batch_size=batch_size, device=device,
                          teacher_top1=reference if same_rows and reference.vocab_size == vocab else None)

    def evaluate_teacher(self, model: nn.Module, data: Encoded, batch_size: int, device: torch.device
                         ) -> tuple[dict[str, float], Top1]:
        """The teacher's metrics and its top-1 predictions, from one forward pass: every model's agreement is
        counted against these, so the teacher runs once however many models are evaluated."""
        return lm_scores(model, data, batch_size=batch_size, device=device)


def _lm(spec: Any) -> Any:
    """The spec's LM cache settings (precompute.lm; its defaults when the spec was built without them)."""
    return spec.lm if spec.lm is not None else LMCacheConfig()


def _vocab_size(config: PretrainedConfig) -> int:
    return int(config.get_text_config().vocab_size)


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"causal_lm needs a fast tokenizer (for character offsets), but {type(tokenizer).__name__} "
                        "is not one; use a model with a tokenizer.json")
    if tokenizer.eos_token_id is None:
        raise DataError("causal_lm ends every document with the tokenizer's EOS token, but this tokenizer has none; "
                        "use a tokenizer with an eos_token")


def _encoded(ids: list[str], tokens: np.ndarray, lengths: np.ndarray, char_offsets: np.ndarray, texts: list[str],
             tokenizer: Any) -> Encoded:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Encoded(
        ids=ids, input_ids=tokens, offsets=offsets, token_type_ids=None, labels=None, pad_token_id=int(pad),
        # Column views of char_offsets: collate pads them into [B, T] like input_ids.
        token_fields={"char_start": (char_offsets[:, 0], 0), "char_end": (char_offsets[:, 1], 0)},
        extras={"text": texts, "char_offsets": char_offsets,
                "words": np.array([len(t.split()) for t in texts], dtype=np.int64)},
    )
