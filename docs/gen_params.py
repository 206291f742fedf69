"""Write docs/params.md, the params reference, from the pydantic settings in stages/config.py.

    python docs/gen_params.py           # (re)write docs/params.md
    python docs/gen_params.py --check   # exit 1 if docs/params.md is not what this script writes

Every setting of `stages.config.Config` gets a row: dotted key, type, default (the value when the key is
absent from params.yaml) and meaning. The meaning is the field's pydantic `description` when it has one, else
the entry of HELP below (keyed by dotted name; `[]` marks the items of a list of sections). The script stops
with a list of problems when a setting has neither, when a HELP or SECTIONS entry names a setting that no longer
exists, or when a HELP entry repeats a field that now has a description.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "params.md"

# ----------------------------------------------------------------------------------------------- help texts

# The settings that train-teacher and distill share (one training loop); filled in for both below.
_TRAINING = {
    "max_length": "tokens per example after truncation",
    "epochs": "epochs (fractions allowed: 0.5 stops half-way)",
    "batch_size": "examples per micro-batch",
    "lr": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay (not on biases and LayerNorm)",
    "warmup_ratio": "share of steps with linear warm-up, then linear decay to 0",
    "grad_accum": "micro-batches per optimizer step",
    "max_grad_norm": "gradient clipping norm (null: off)",
    "seed": "seed of weights init, dropout and batch order",
    "mixed_precision": "autocast on CUDA: `auto` (bf16, else fp16), `no`, `bf16`, `fp16`; ignored on CPU",
    "eval_batch_size": "batch size for dev evaluation",
    "group_by_length": "batches of similar length (random order): less padding, same examples per epoch",
    "checkpoint_every": "also checkpoint every N optimizer steps (0: end of each epoch only)",
    "resume": "continue from `<output>/checkpoint` (weights, optimizer, scheduler, RNG, position in the epoch); "
              "`--resume` sets it",
    "eval_every": "dev evaluation every N optimizer steps and at the end (0: at the end of each epoch)",
    "keep_best": "save the model with the best dev metric: a metric name (higher is better, e.g. `accuracy`) or "
                 "`min:<name>` (lower is better); null: the last model. See [Callbacks](methods/callbacks.md)",
    "snapshots": "keep a loadable `save_pretrained` folder `<output>/snapshots/gs{step}` at each evaluation",
    "callbacks": "`package.module:function`s called after each evaluation as `fn(step=, metrics=, model=)`; "
                 "return values logged",
}

HELP: dict[str, str] = {
    # data
    "data.train": "training split file (CSV, JSONL, Parquet or a `datasets` folder; `.txt` for causal_lm)",
    "data.dev": "dev split, evaluated after every epoch (null: none)",
    "data.test": "test split for `kd evaluate` (null: none)",
    "data.text_field": "column with the text",
    "data.text_pair_field": "column with the second text of a sentence pair (null: single sentences)",
    "data.label_field": "column with the label: an int id, or a string (see `label_names`) (null: unlabelled)",
    "data.id_field": "column with a unique example id (null: a hash of the text, stable under reordering)",
    "data.num_labels": "number of classes (not read for regression)",
    "data.label_names": "class names for string labels (`[neg, pos]` maps `neg` to 0); saved as the models' "
                        "`id2label`; length must equal `num_labels`. Null with string labels: the sorted labels "
                        "of `data.train` (and their count as `num_labels`); a dev or test label that train lacks "
                        "is an error",
    "data.transfer": "unlabelled extra texts for distillation (teacher terms only; null: none; "
                     "sequence_classification only), e.g. the `transfer.csv` that `kd prepare` builds from "
                     "`prepare.transfer_source`. The shipped params.yaml sets `data/transfer.csv`",
    "data.task": "the task kind; see [Task kinds](tasks/index.md)",
    "data.label_delimiter": "multi_label: labels joined in one string, e.g. `sports|politics` with `\"|\"` "
                            "(null: a list column)",
    "data.threshold": "multi_label: a label is predicted when its probability is at least this (null: 0.5)",
    "data.tokens_field": "token_classification: the column of word lists (null: `tokens`)",
    "data.tags_field": "token_classification: the column of tag lists (null: `tags`)",
    "data.label_all_subwords": "token_classification: train every sub-token on its word's tag (null: false, the "
                               "first sub-token only)",
    "data.question_field": "extractive_qa: question column of a table (null: `question`; a SQuAD JSON file has "
                           "fixed names)",
    "data.context_field": "extractive_qa: context column (null: `context`)",
    "data.answers_field": "extractive_qa: answers column, `{\"text\": [...], \"answer_start\": [...]}` "
                          "(null: `answers`)",
    "data.doc_stride": "extractive_qa: tokens shared by consecutive windows of a long context "
                       "(null: min(128, max_length // 3))",
    "data.max_answer_length": "extractive_qa: longest predicted answer, in tokens (null: 30)",
    # prepare
    "prepare.source": "file to split, or a bundled set: `bundled:rotten_tomatoes`, `bundled:ptb` (Penn Treebank "
                      "text for causal_lm, its own splits), `bundled:wnut16_ner`, ... "
                      "(see [Own data](own-data.md)); null: nothing to split, the `data.*` files exist (prepare "
                      "still builds the transfer set and checks the files)",
    "prepare.filter": "keep only rows whose columns equal these values (the bundled source defaults to "
                      "`{source: rotten_tomatoes}`)",
    "prepare.fractions": "split sizes; keys train and optionally dev, test; sum 1",
    "prepare.max_examples": "cap on the rows used (null: all); for `bundled:ptb` the first lines of each split",
    "prepare.seed": "seed of the stratified split",
    "prepare.out_dir": "where the split files, `split.json`, `transfer.csv` and `check.json` (what the data "
                       "check found) go; `dvc repro` empties it before `kd prepare` runs, so keep no file of "
                       "yours in it",
    "prepare.transfer_source": "where `kd prepare` takes the sentences of `<out_dir>/transfer.csv` from, whenever "
                               "it is set, whatever `source` is: a file of texts (cut into sentences), "
                               "`bundled:imdb_sentences` (IMDB review sentences) or `bundled:ptb_sentences` (19,931 "
                               "Penn Treebank news sentences, general text); null: no transfer set. The shipped "
                               "params.yaml sets `bundled:imdb_sentences`",
    "prepare.transfer_examples": "how many distinct sentences go into `<out_dir>/transfer.csv` (seeded draw)",
    # augment
    "augment.input": "file whose examples `kd augment` makes views of (read with the `data.*` column settings)",
    "augment.output": "where the views go, written atomically: `.csv` or `.jsonl` (`.jsonl` for "
                      "token_classification); a `data.transfer` file for text data",
    "augment.views": "views per example and operation",
    "augment.seed": "seed of the views' draws (each view's seed also derives from its operation, settings and "
                    "parent id)",
    "augment.include_input": "write the input's examples (op `original`) before the views",
    "augment.ops.mask": "each word, with probability p, becomes `token` (null: off; `{}`: on with its defaults)",
    "augment.ops.delete": "each word, with probability p, is dropped (null: off)",
    "augment.ops.ngram": "a random run of n consecutive words, n drawn from [min_n, max_n] (null: off)",
    "augment.ops.shuffle": "a local shuffle: each word moves fewer than `window` places (null: off)",
    "augment.ops.pos": "each word, with probability p, becomes another word the input shows with the same tag; "
                       "token_classification only (null: off)",
    "augment.ops.mask.p": "probability that a word is masked",
    "augment.ops.mask.token": "the mask word; `tokenizer:<model folder>` uses that tokenizer's mask token "
                              "(`<mask>` for RoBERTa)",
    "augment.ops.delete.p": "probability that a word is dropped (never every word)",
    "augment.ops.ngram.min_n": "shortest n-gram, in words",
    "augment.ops.ngram.max_n": "longest n-gram, in words",
    "augment.ops.shuffle.window": "word i takes the rank of i + uniform(0, window); at least 2",
    "augment.ops.pos.p": "probability that a word is replaced",
    # train_teacher
    "train_teacher.model": "model path or hub name (or `bundled:all-MiniLM-L6-v2`); a new head is trained",
    "train_teacher.output": "where the fine-tuned teacher is saved (multi-task: `<output>/<task name>`)",
    "train_teacher.metrics": "metrics JSON (dev metrics, steps, seconds)",
    # precompute
    "precompute.teachers": "teacher models (paths or hub names); one cache each",
    "precompute.split": "which data split to cache (train for distillation)",
    "precompute.cache_root": "folder of caches, or a URL such as `s3://bucket/prefix` "
                             "([Caches](caches.md#caches-on-object-stores)); each cache's folder name derives from "
                             "teacher, data and settings",
    "precompute.batch_size": "teacher batch size",
    "precompute.max_length": "teacher tokens per example (causal_lm: tokens per block)",
    "precompute.logits": "cache the logits",
    "precompute.hidden_layers": "hidden states to cache (0 = embeddings, i = block i)",
    "precompute.hidden_tokens": "`all` tokens ([T, H] per example) or `first` token only ([H])",
    "precompute.attention_layers": "attention maps to cache ([heads, T, T]; 0-based blocks)",
    "precompute.dtype": "storage dtype of cached hidden states, attention maps and logits (not of the causal_lm "
                        "codec fields, which have fixed dtypes)",
    "precompute.store_input_ids": "cache the teacher's token ids (alignment checks, other tokenizers)",
    "precompute.device": "`auto` (CUDA if present), `cpu` or `cuda`",
    "precompute.commit_examples": "commit a shard at least every N examples (a kill loses at most this much work)",
    "precompute.commit_seconds": "... or every T seconds, whichever comes first",
    "precompute.format": "shard format of new caches: `arrow` (memory-mapped Arrow IPC) or `zarr` (Zarr v3, "
                         "compressed); readers take it from the manifest "
                         "([Arrow or Zarr](caches.md#cache-formats-arrow-or-zarr))",
    "precompute.lm.codec": "what is cached per token: `dense`, `topk` or `sampled` "
                           "([Language models](language-models.md#the-sparse-cache))",
    "precompute.lm.temperature": "capture temperature T: every codec stores softmax(teacher logits / T); part of the "
                                 "cache's name, and a causal_lm `distill.kd.temperature` left unset takes it",
    "precompute.lm.k": "topk: ids kept per token (at most the vocabulary)",
    "precompute.lm.samples": "sampled: ids drawn per token, 1 to 255",
    "precompute.lm.proposal_temperature": "sampled: draw from q ∝ p^(1/this); at least 1 ([why](language-models.md"
                                          "#the-sparse-cache))",
    "precompute.lm.max_dense_vocab": "dense: refused for a larger vocabulary",
    "precompute.lm.seed": "sampled: with the row id, seeds each row's draws",
    # distill
    "distill.batch_size": "examples per micro-batch (under torchrun: over all processes together)",
    "distill.method": "`kd` (everything on this page), `theseus`: BERT-of-Theseus module replacing (needs "
                      "`teacher_signal: online`; [Theseus](methods/theseus.md)), or `fastbert`: self-distil "
                      "FastBERT branches onto a fine-tuned backbone ([FastBERT](methods/fastbert.md))",
    "distill.teacher_signal": "`cached` (read caches), `online` (run teachers live) or `none` (labels only; "
                              "`kd.weight` is ignored)",
    "distill.caches": "cache folders or URLs to read (empty: the caches precompute writes for "
                      "`precompute.teachers`)",
    "distill.teachers": "live teachers (online mode; FastBERT's and Theseus' teacher) (empty: "
                        "`precompute.teachers`)",
    "distill.matches": "intermediate matches, each a section as below; kinds and the `gram`/`nst` aliases in "
                       "[Methods](methods/index.md#intermediate-matches)",
    "distill.match_preset": "named layer-pair preset(s), e.g. `L3_hidden_mse+L3_hidden_smmd`; the list is in "
                            "[Methods](methods/index.md#presets)",
    "distill.match_weight_schedule": "`constant`, `linear_decay` or `linear_growth`, shared by all matches",
    "distill.prefetch": "cached batches gathered ahead on the background thread (and, for a cache on an object "
                        "store, fetched ahead concurrently)",
    "distill.check_cache_teacher": "refuse a cache in `distill.caches` made by another teacher than the "
                                   "configured one (false: use it anyway, with a warning)",
    "distill.task_tau": "multi-task: a batch's task is drawn with probability |D_task|^tau / sum (1: "
                        "proportional to size, 0: uniform)",
    "distill.output": "where the student is saved (`save_pretrained` + tokenizer; `checkpoint/` inside)",
    "distill.log_dir": "dvclive folder: per-term loss curves, dev metrics",
    "distill.metrics": "metrics JSON (dev metrics, steps, seconds, examples/s)",
    "distill.theseus.groups": "theseus (required): successor blocks; must divide the teacher's layer count, each "
                              "stands in for layers / groups teacher blocks",
    "distill.theseus.replace_prob": "replacement probability p in (0, 1], or the base rate b of the linear "
                                    "curriculum",
    "distill.theseus.curriculum": "`constant` (p) or `linear` (p_t = min(1, k·t + b), t the optimizer step)",
    "distill.theseus.curriculum_k": "linear only (required there): k > 0, the growth of p per optimizer step",
    "distill.theseus.successor_epochs": "epochs of the successors alone after the `distill.epochs` of replacing",
    "distill.fastbert.backbone": "the fine-tuned BERT/RoBERTa classifier that gets branches (null: the first of "
                                 "`distill.teachers`, else `precompute.teachers`)",
    "distill.fastbert.branch_width": "width of each branch classifier",
    "distill.fastbert.branch_heads": "attention heads of each branch (must divide `branch_width`)",
    "distill.student.from_teacher": "build the student from this teacher, keeping `keep_layers`",
    "distill.student.keep_layers": "with `from_teacher` (required): 0-based teacher blocks copied into the "
                                   "student (TextBrewer's T3 init)",
    "distill.student.pretrained": "or: a pretrained student (path or hub name)",
    "distill.student.config": "or: a config path/name, randomly initialised, resized by the keys below. Naming "
                              "`from_teacher`, `pretrained` or `module` replaces the whole default student",
    "distill.student.num_layers": "with `config` only: transformer blocks",
    "distill.student.hidden_size": "with `config` only: width",
    "distill.student.intermediate_size": "with `config` only: feed-forward width",
    "distill.student.num_heads": "with `config` only: attention heads (must divide hidden_size)",
    "distill.student.num_kv_heads": "causal_lm students with `config` only: key/value heads (grouped-query "
                                    "attention; must divide num_heads)",
    "distill.student.module": "or: any `torch.nn.Module` class as `package.module:Class` (e.g. "
                              "`stages.models.module_student:BiLSTMClassifier`); see "
                              "[Students that are not transformers](methods/any-student.md)",
    "distill.student.module_kwargs": "with `module` only: the class's keyword arguments (JSON values); "
                                     "`num_labels`, `vocab_size` and `pad_token_id` are filled in when the class "
                                     "takes them and they are left out",
    "distill.kd.loss": "`kl`, `ce` (soft cross-entropy) or `mse` on logits",
    "distill.kd.weight": "weight of the logit KD term",
    "distill.kd.weight_schedule": "`constant`, `linear_decay` or `linear_growth` over training (scales `weight`)",
    "distill.kd.temperature": "softmax temperature (the base temperature for dynamic schedules). causal_lm: "
                              "`precompute.lm.temperature` when not given, and a cached run must use the cache's "
                              "capture temperature ([Temperature](language-models.md#temperature))",
    "distill.kd.temperature_squared": "multiply the KD term by T² (Hinton; for causal_lm with every signal); "
                                      "TextBrewer does not",
    "distill.kd.temperature_schedule": "`constant`, or per-example `flsw` / `cwsm` (arXiv 1911.07471)",
    "distill.kd.flsw_beta": "FLSW beta",
    "distill.kd.flsw_gamma": "FLSW gamma",
    "distill.kd.cwsm_beta": "CWSM beta",
    "distill.kd.probability_shift": "swap the teacher's top logit with the gold label's when the teacher is wrong",
    "distill.kd.hard_weight": "weight of cross-entropy on gold labels (next-token cross-entropy for causal_lm)",
    "distill.kd.hard_weight_schedule": "`constant`, `linear_decay` or `linear_growth` (scales `hard_weight`)",
    "distill.kd.teacher_combine": "several teachers: average `logits` or `probs`",
    "distill.kd.teacher_weights": "one weight per teacher (null: equal)",
    "distill.matches[].kind": "`hidden_mse`, `hidden_cosine`, `pkd`, `mmd`, `fsp`, `attention_mse`, "
                              "`attention_ce`, `attention_mse_sum`, `attention_ce_mean` (aliases `gram` = `fsp`, "
                              "`nst` = `mmd`)",
    "distill.matches[].teacher_layer": "teacher layer (a pair [a, b] for `mmd` and `fsp`)",
    "distill.matches[].student_layer": "student layer (a pair [a, b] for `mmd` and `fsp`)",
    "distill.matches[].weight": "weight of this match's term",
    "distill.matches[].projection": "`linear`, `relu` or `tanh`: a learned map from the student's width to the "
                                    "teacher's (null: none; not for attention kinds)",
    "distill.matches[].projection_lr": "with `projection`: that projection's own learning rate (null: "
                                       "`distill.lr`)",
    "distill.lm.loss": "`forward_kl`, `reverse_kl`, `jsd`, `tvd`, `skew_kl` or `skew_reverse_kl`: any with a dense "
                       "or topk cache or online; a sampled cache serves `forward_kl` only",
    "distill.lm.jsd_beta": "jsd: the mixture weight beta, in (0, 1)",
    "distill.lm.skew_alpha": "skew_kl, skew_reverse_kl: the mixture weight alpha (DistiLLM), in (0, 1)",
    "distill.lm.topk_tail": "cached topk: the tail mass as one `bucket`, or `renormalize` the top-k",
    "distill.lm.chunk_tokens": "tokens per chunk of the student's logits in the loss (null: 2**23 / V, 32 MiB of "
                               "logits per chunk)",
    "distill.lm.cross_tokenizer": "a student with another tokenizer: Universal Logit Distillation over a cached "
                                  "topk (weight: `distill.kd.weight`)",
    # evaluate
    "evaluate.models": "name -> model path; all measured side by side",
    "evaluate.split": "split to evaluate on",
    "evaluate.batch_size": "inference batch size",
    "evaluate.max_length": "tokens per example",
    "evaluate.throughput_batches": "batches timed for examples/s (after one warm-up batch)",
    "evaluate.output": "metrics JSON",
    "evaluate.predictions": "per-example predictions of every model (for `kd report`'s paired statistics)",
    "evaluate.fastbert_speeds": "FastBERT models are also measured at each of these speeds, each in (0, 1]",
    "evaluate.fastbert_curve": "speed/accuracy curve of every model when a FastBERT model is evaluated (CSV for "
                               "`dvc plots`, and a PNG of the same name)",
    # tasks
    "tasks": "multi-task: several tasks, one student; see [Multi-task](methods/multi-task.md)",
    "tasks[].name": "letters, digits, `_` or `-`: it names folders and ids",
    "tasks[].data": "this task's data (replaces the top-level `data` section)",
    "tasks[].prepare": "`kd prepare` writes this task's split files (null: they exist already)",
    "tasks[].teachers": "this task's teachers (empty: `<train_teacher.output>/<name>`, what `kd train-teacher` "
                        "writes)",
    "tasks[].weight": "this task's loss terms are multiplied by it",
    "tasks[].kd": "this task's KD settings (null: `distill.kd`)",
    "tasks[].matches": "this task's intermediate matches",
    "tasks[].match_preset": "this task's match preset(s)",
}
for _section in ("train_teacher", "distill"):
    for _key, _text in _TRAINING.items():
        HELP.setdefault(f"{_section}.{_key}", _text)

# Section introductions, keyed by the section's dotted path ("" is the page itself); a section without one gets
# the first line of its class docstring.
SECTIONS: dict[str, str] = {
    "data": "Where the labelled splits are, which columns to read and the task kind.",
    "prepare": "`kd prepare`: split a source into train/dev/test with a recorded, seeded split "
               "(`data/split.json`), and optionally cut a transfer set.",
    "augment": "`kd augment`: write views of a data file for the teacher to label "
               "([Augmentation](methods/augmentation.md)). Off until `augment.ops` names an operation.",
    "augment.ops": "The operations `kd augment` applies, each with its settings; an operation left out (or null) "
                   "is off, `{}` turns it on with its defaults.",
    "train_teacher": "`kd train-teacher`: fine-tune the teacher (a path or hub name) with a new head.",
    "precompute": "`kd precompute`: run each teacher once over a split and cache its outputs.",
    "precompute.lm": "`data.task: causal_lm` only: what the cache stores per token.",
    "distill": "`kd distill`: train a student from cached (or live) teacher outputs.",
    "distill.theseus": "`distill.method: theseus` only ([BERT-of-Theseus](methods/theseus.md)).",
    "distill.fastbert": "`distill.method: fastbert` only ([FastBERT](methods/fastbert.md)).",
    "distill.student": "How the student is built: exactly one of `from_teacher` (with `keep_layers`), "
                       "`pretrained`, `config` (random init, resized by the size keys) or `module` (any "
                       "`torch.nn.Module`). A key the chosen way ignores is an error. The defaults are the demo's "
                       "student; keys given without a way to build adjust it.",
    "distill.kd": "Knowledge distillation on logits plus the hard-label term.",
    "distill.matches[]": "One intermediate match between a teacher layer and a student layer. Hidden layer 0 is "
                         "the embeddings output, layer i the output of block i; attention layer i is block i+1's "
                         "map.",
    "distill.lm": "`data.task: causal_lm` only: the KD loss of a causal-LM student "
                  "([Language models](language-models.md#distillation)).",
    "evaluate": "`kd evaluate`: metrics, size and throughput of saved models, side by side.",
    "tasks[]": "One task of a multi-task run: its data, teacher(s), loss weight and matches. Each task gets its "
               "own cache and its own student head on the shared encoder. With `tasks:`, the top-level `data`, "
               "`precompute.teachers`, `distill.teachers` and `distill.matches` are refused.",
}

INTRO = """\
Every key of `params.yaml`, its type, its default (the value when the key is absent) and its meaning. The
defaults are the demo's settings: the shipped `params.yaml` differs from them only in `data.transfer` and
`prepare.transfer_source` (the IMDB transfer set suits only the movie-review demo). Settings are parsed with
pydantic: unknown keys, wrong types and values out of range are reported together, each with its dotted key;
a setting that has no effect in the chosen mode is an error naming it. Override any key with
`--set dotted.key=value` (the value is read as YAML) or `dvc exp run -S dotted.key=value`.
"""

# ----------------------------------------------------------------------------------------------- the walk


@dataclass
class Section:
    path: str  # dotted, e.g. "distill.kd"; "distill.matches[]" for the items of a list
    doc: str
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # key, type, default, meaning


def _models_in(tp: Any, base: type) -> list[type]:
    if isinstance(tp, type) and issubclass(tp, base):
        return [tp]
    return [m for a in get_args(tp) for m in _models_in(a, base)]


def _type_name(tp: Any, base: type, anchors: dict[type, str]) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0], base, anchors)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(_type_name(a, base, anchors) for a in args)
        return text + " or null" if len(args) < len(get_args(tp)) else text
    if origin is Literal:
        values = [f"`{v}`" for v in get_args(tp)]
        return "one of " + ", ".join(values)
    if origin is list:
        return "list of " + _type_name(get_args(tp)[0], base, anchors)
    if origin is dict:
        k, v = get_args(tp)
        return f"mapping of {_type_name(k, base, anchors)} to {_type_name(v, base, anchors)}"
    if isinstance(tp, type) and issubclass(tp, base):
        path = anchors.get(tp)
        return f"section ([`{path}`](#{_anchor(path)}))" if path is not None else "section"
    names = {str: "string", int: "int", float: "float", bool: "bool"}
    if tp in names:
        return names[tp]
    return "JSON value" if getattr(tp, "__name__", str(tp)) == "JsonValue" else str(tp)


def _anchor(path: str) -> str:
    return path.replace("[]", "").replace(".", "-").replace("_", "-") or "top"


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = value and not any(c in value for c in ",[]{}#&*!|>'\"%@`") and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "model_dump"):
        return _yaml_scalar(value.model_dump(exclude_defaults=True))
    return str(value)


def _cell(text: str) -> str:
    # Outside code spans a | would split the table cell: escape it there (inside backticks it is kept as is).
    parts = text.replace("\n", " ").split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def walk(config_cls: type, base: type) -> tuple[list[Section], list[str], set[str], set[str]]:
    """Sections in page order, problems found, every dotted key with a row, every section path."""
    sections: list[Section] = []
    problems: list[str] = []
    keys: set[str] = set()
    where: dict[type, str] = {}  # section class -> the path it is documented at (the first one met)

    def visit(cls: type, path: str, instance: Any, lead: tuple | None = None) -> None:
        where[cls] = path
        section = Section(path, SECTIONS.get(path) or _first_line(cls.__doc__))
        sections.append(section)
        if lead is not None:  # the row of a list of sections at the top level (`tasks`) heads its own section
            section.rows.append(lead)
        later: list[tuple[type, str, Any, tuple | None]] = []
        for name, info in cls.model_fields.items():
            key = f"{path}.{name}" if path else name
            value = getattr(instance, name) if instance is not None else info.default
            models = [m for m in _models_in(info.annotation, base) if m not in where]
            plain = isinstance(info.annotation, type) and issubclass(info.annotation, base)
            if plain and models:
                later.append((models[0], key, value, None))  # a nested section: its own heading, no row
                continue
            keys.add(key)
            help_text = info.description or HELP.get(key)
            if info.description and key in HELP:
                problems.append(f"HELP[{key!r}] repeats the field's description in stages/config.py; remove it")
            if not help_text:
                problems.append(f"{key}: no description in stages/config.py and no HELP entry in "
                                "docs/gen_params.py; add one")
            default = "required" if info.is_required() else f"`{_yaml_scalar(value)}`"
            row = (f"`{key}`", info.annotation, default, help_text or "")
            listed = get_origin(info.annotation) is list
            if models and not path:
                later.append((models[0], f"{key}[]" if listed else key, None, row))
                continue
            section.rows.append(row)
            for model in models:
                later.append((model, f"{key}[]" if listed else key, None if listed else value, None))
        for model, sub_path, value, lead in later:
            if model not in where:
                visit(model, sub_path, value, lead)

    visit(config_cls, "", config_cls())
    for s in sections:
        s.rows = [(k, _type_name(t, base, where), d, h) for k, t, d, h in s.rows]
    return sections, problems, keys, {s.path for s in sections}


def render(sections: list[Section]) -> str:
    out = ["# Params reference", "",
           "<!-- Generated by docs/gen_params.py from stages/config.py: do not edit by hand; "
           "run `python docs/gen_params.py`. -->", "", INTRO]
    for s in sections:
        if s.path:
            level = "##" if "." not in s.path else "###"
            out += [f"{level} `{s.path}` {{#{_anchor(s.path)}}}", ""]
        if s.doc and s.path:
            out += [s.doc, ""]
        if s.rows:
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            out += [f"| {_cell(k)} | {_cell(t)} | {_cell(d)} | {_cell(h)} |" for k, t, d, h in s.rows]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def generate() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as `python docs/gen_params.py`: the repository root is not on the path
    from pydantic import BaseModel

    from stages.config import Config

    sections, problems, keys, paths = walk(Config, BaseModel)
    problems += [f"HELP[{k!r}]: no such setting in stages.config.Config; remove or rename it"
                 for k in sorted(set(HELP) - keys)]
    problems += [f"SECTIONS[{p!r}]: no such section in stages.config.Config; remove or rename it"
                 for p in sorted(set(SECTIONS) - paths)]
    if problems:
        raise SystemExit("docs/gen_params.py: the params reference cannot be generated:\n  " + "\n  ".join(problems))
    return render(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/params.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/params.md is stale (stages/config.py or docs/gen_params.py changed): "
                  "run python docs/gen_params.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
