"""Model building shared by every stage: load teachers and tokenizers, build students, fingerprint weights."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

import cache_format as cf
from cache_format._errors import KDError

__all__ = [
    "ModelError",
    "load_tokenizer",
    "load_model_config",
    "check_head",
    "load_classifier",
    "load_causal_lm",
    "student_from_teacher",
    "student_from_config",
    "num_layers",
    "hidden_size",
    "num_parameters",
    "model_fingerprint",
    "teacher_fingerprint",
    "TEACHER_MEMOS",
    "recorded_teachers",
    "missing_folder",
    "make_tiny_classifier",
    "make_tiny_causal_lm",
]


# Config keys that change with where/how a model was loaded, not with what it computes.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_attn_implementation",
    "_attn_implementation_autoset", "attn_implementation", "output_attentions", "output_hidden_states",
    "return_dict", "use_cache",
})
# Where encoder blocks live in the base model of common architectures (BERT/RoBERTa/ELECTRA, DistilBERT, Llama).
_LAYER_LIST_PATHS = ("encoder.layer", "transformer.layer", "layers", "h")


class ModelError(KDError, ValueError):
    """A model or tokenizer cannot be loaded or built as asked (missing path, bad layer index, bad sizes)."""


# ----------------------------------------------------------------------------------------------------------------
# Loading


def missing_folder(name_or_path: str) -> bool:
    """True when `name_or_path` names a local folder (not a hub name like "org/name") and nothing is there."""
    path = Path(name_or_path).expanduser()
    looks_local = (
        path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
        or ("/" in name_or_path and path.parent.is_dir())  # "models/teacher" next to an existing models/
    )
    return looks_local and not path.exists()


def _check_source(name_or_path: str, what: str) -> None:
    """Raise for a missing local folder; hub names ("bert-base-uncased", "org/name") pass through."""
    if missing_folder(name_or_path):
        raise ModelError(f"{what} folder {name_or_path} does not exist; fix the path or train/save the model first")


def _load_error(name_or_path: str, what: str, error: Exception) -> ModelError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelError(
        f"cannot load {what} {name_or_path!r}: not a local folder nor a loadable hub name ({first_line}); "
        "give a folder saved with save_pretrained, or a hub name that is cached locally or reachable"
    )


def load_tokenizer(name_or_path: str) -> Any:
    """Load a fast (Rust-backed) tokenizer from a folder or hub name."""
    _check_source(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "tokenizer", e) from e
    if not tokenizer.is_fast:
        raise ModelError(
            f"the tokenizer of {name_or_path!r} has no fast (tokenizers) version; save one with tokenizer.json"
        )
    return tokenizer


def load_model_config(name_or_path: str) -> PretrainedConfig:
    """The model's config only (config.json): cheap, no weights are read."""
    _check_source(name_or_path, "model")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "model", e) from e


Head = Literal["require", "if_missing", "new"]
_HEAD_NAMES = {"ForSequenceClassification": "classification", "ForTokenClassification": "token-classification",
               "ForQuestionAnswering": "question-answering"}


def check_head(config: PretrainedConfig, name_or_path: str, num_labels: int, head: Head = "require",
               auto_model: type = AutoModelForSequenceClassification,
               label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Check a model's task head against `num_labels`; return the loading options that follow.

    A head that is kept must also have been trained on `label_names` (when both the model and the data
    name their labels): the same count in another order would silently swap classes.

    The head is the one `auto_model` builds (AutoModelForTokenClassification -> `...ForTokenClassification`).

    head="require" (teachers, evaluation): the model must have a `num_labels`-label head.
    head="if_missing" (a pretrained student): a base model gets a new head; a head of another size is an error.
    head="new" (train-teacher only): a base model or a head of another size gets a new, re-initialised head.
    """
    suffix = auto_model.__name__.removeprefix("AutoModel")
    what = _HEAD_NAMES.get(suffix, suffix[3:])
    archs = config.architectures or []
    has_head = any(a.endswith(suffix) for a in archs)
    if has_head and config.num_labels == num_labels:
        if head != "new":
            _check_label_names(config, name_or_path, label_names)
        return {}
    if head == "new" or (head == "if_missing" and not has_head):
        # A head of another size or task (a sentence head for a token task: same key names) is replaced.
        return {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if has_head:
        raise ModelError(
            f"{name_or_path} has a {config.num_labels}-label {what} head but data.num_labels is {num_labels}; "
            f"set data.num_labels: {config.num_labels} if that is the data's label count, else use a model "
            f"fine-tuned for {num_labels} labels (`kd train-teacher` makes one)"
        )
    other = next((a for a in archs if "For" in a and not a.endswith(("ForMaskedLM", "ForPreTraining"))), None)
    if other:
        raise ModelError(
            f"{name_or_path} is a {other}, not the {what} model data.task needs; use a model fine-tuned "
            f"for this task (`kd train-teacher` makes one) or fix data.task"
        )
    raise ModelError(
        f"{name_or_path} has no {what} head (a base model), so its predictions would be random; "
        f"fine-tune it first with `kd train-teacher` (which adds a {num_labels}-label head) and use that model"
    )


def _check_label_names(config: PretrainedConfig, name_or_path: str, label_names: Sequence[str] | None) -> None:
    saved = [str((config.id2label or {}).get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
    if label_names is None or all(re.fullmatch(r"LABEL_\d+", n) for n in saved):
        return  # the data or the model does not name its labels: nothing to compare
    if list(label_names) != saved:
        raise ModelError(
            f"{name_or_path} was trained on labels {saved} but data.label_names is {list(label_names)}; list the "
            "same names in the same order (a class id must mean the same class), or use a model trained on yours"
        )


def load_classifier(name_or_path: str, num_labels: int, *, eager_attention: bool = False,
                    head: Head = "require", auto_model: type = AutoModelForSequenceClassification,
                    label_names: Sequence[str] | None = None) -> PreTrainedModel:
    """Load a model with an `auto_model` head of `num_labels` outputs from a folder or hub name.

    `head` says whether a new classification head may be made (see `check_head`); the default refuses, so a
    model whose head has another number of labels is never silently re-initialised. `eager_attention=True`
    is needed to get attention maps (transformers 5 returns them only with attn_implementation="eager").
    """
    options = check_head(load_model_config(name_or_path), name_or_path, num_labels, head, auto_model, label_names)
    if eager_attention:
        options["attn_implementation"] = "eager"
    try:
        return auto_model.from_pretrained(name_or_path, **options)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "model", e) from e



def load_causal_lm(name_or_path: str, *, eager_attention: bool = False) -> PreTrainedModel:
    """Load an `AutoModelForCausalLM` (a language-model teacher or student) from a folder or hub name."""
    from transformers import AutoModelForCausalLM

    _check_source(name_or_path, "model")
    options = {"attn_implementation": "eager"} if eager_attention else {}
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **options)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, "model", e) from e

# ----------------------------------------------------------------------------------------------------------------
# Building students


def _layer_list(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks and its state_dict prefix."""
    base = model.base_model
    for path in _LAYER_LIST_PATHS:
        module: Any = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            prefix = next(name for name, m in model.named_modules() if m is module)
            return prefix, module
    raise ModelError(
        f"{type(model).__name__} is not supported for layer selection (no encoder layer list found); "
        "build the student with student_from_config or a pretrained student instead"
    )


def student_from_teacher(teacher: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A smaller model of the teacher's class keeping `keep_layers` (0-based blocks), TextBrewer's "T3" init.

    Embeddings, the kept blocks (in the given order), pooler and classifier are copied from the teacher.
    """
    prefix, layers = _layer_list(teacher)
    if not keep_layers:
        raise ModelError("keep_layers is empty; list the teacher layers to keep, e.g. [0, 5]")
    for index in keep_layers:
        if not isinstance(index, int) or not 0 <= index < len(layers):
            raise ModelError(
                f"keep_layers index {index!r} is out of range; the teacher has {len(layers)} layers "
                f"(valid 0..{len(layers) - 1})"
            )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep_layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer settings must follow the kept layers
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    student = type(teacher)(config)

    # Everything outside the block list is copied as is; student block j is a copy of teacher block keep_layers[j].
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(prefix + ".")}
    for new, old in enumerate(keep_layers):
        for key, tensor in layers[old].state_dict().items():
            state[f"{prefix}.{new}.{key}"] = tensor
    student.load_state_dict(state, strict=True)
    param = next(teacher.parameters())
    return student.to(device=param.device, dtype=param.dtype)


def student_from_config(
    base: str | PretrainedConfig,
    num_labels: int,
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    auto_model: type = AutoModelForSequenceClassification,
) -> PreTrainedModel:
    """A randomly initialised `auto_model` from a config (object, folder or hub name) with optional smaller sizes."""
    if isinstance(base, str):
        _check_source(base, "config")
        try:
            config = AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as e:
            raise _load_error(base, "config", e) from e
    else:
        config = copy.deepcopy(base)
    sizes = {"num_hidden_layers": num_layers, "hidden_size": hidden_size,
             "intermediate_size": intermediate_size, "num_attention_heads": num_heads}
    for key, value in sizes.items():
        if value is not None:
            if value < 1:
                raise ModelError(f"student {key} must be >= 1 (got {value})")
            setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise ModelError(
            f"student hidden_size={config.hidden_size} is not divisible by num_heads={config.num_attention_heads}; "
            "pick a hidden size that is a multiple of the head count"
        )
    if hasattr(config, "head_dim") and (hidden_size is not None or num_heads is not None):
        config.head_dim = config.hidden_size // config.num_attention_heads
    config.num_labels = num_labels
    return auto_model.from_config(config)


# ----------------------------------------------------------------------------------------------------------------
# Inspecting


def num_layers(model: PreTrainedModel) -> int:
    """Number of transformer blocks."""
    return int(model.config.num_hidden_layers)


def hidden_size(model: PreTrainedModel) -> int:
    """Width of the hidden states."""
    return int(model.config.hidden_size)


def num_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_fingerprint(model: PreTrainedModel, tokenizer: Any) -> str:
    """32-hex-digit hash of what the model computes: class, config, every weight, and the tokenizer.

    Independent of where the model was loaded from and of its attention implementation.
    """
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(f"class:{type(model).__name__};config:".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f";tensor:{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # buffer view: no copy
    h.update(b";tokenizer:")
    h.update(_tokenizer_description(tokenizer).encode())
    return h.hexdigest()


# Files that define what a saved model computes: weights (single or sharded, with their index) and tokenizer.
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
_TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
})


# Keys of saved tokenizer JSON files that record how it was loaded or last called, not how it tokenises.
_VOLATILE_TOKENIZER_KEYS = frozenset({"truncation", "padding", "is_local", "local_files_only", "name_or_path",
                                      "_name_or_path", "_commit_hash"})


def _file_identity(path: Path) -> str:
    if path.suffix != ".json" or path.name.endswith(".index.json"):
        return cf.file_hash(path)
    drop = _VOLATILE_CONFIG_KEYS if path.name == "config.json" else _VOLATILE_TOKENIZER_KEYS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e}); save the model again with save_pretrained") from None
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in drop}
    return cf.fingerprint(json.dumps(data, sort_keys=True, default=str))


def _identity_files(folder: Path) -> list[Path]:
    """The files whose content is a saved model's identity (config, weights, tokenizer), sorted by name."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; give a folder saved with save_pretrained")
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name == "config.json" or p.name in _TOKENIZER_FILES or _WEIGHT_FILE.fullmatch(p.name)))
    if not any(_WEIGHT_FILE.fullmatch(p.name) for p in files):
        raise ModelError(f"{folder} has no weight file (model.safetensors or pytorch_model.bin); "
                         "give a folder saved with save_pretrained")
    return files


_FINGERPRINT_KIND = "model files v1"
TEACHER_MEMOS = ".teachers"
"""Folder, next to the caches it serves, of teacher identity memos (`<cache root>/.teachers/<key>.json`)."""


def _hash_files(files: Sequence[Path]) -> str:
    return cf.Hasher().update({"kind": _FINGERPRINT_KIND,
                               "files": [[p.name, _file_identity(p)] for p in files]}).hexdigest()


def _folder_fingerprint(folder: Path, memo_dir: Path | None = None, rehash: bool = False) -> str:
    files = _identity_files(folder)
    if memo_dir is None:
        return _hash_files(files)
    # The memo: {resolved path, (size, mtime_ns) of each identity file, fingerprint}. Stats are taken before
    # hashing, so a file changed while it is hashed has a newer mtime than the memo and is hashed again.
    where = str(folder.resolve())
    memo_dir = Path(memo_dir)
    memo = memo_dir / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.json"
    stats = {p.name: [(st := p.stat()).st_size, st.st_mtime_ns] for p in files}
    if not rehash:
        try:
            old = json.loads(memo.read_text(encoding="utf-8"))
            if (old["kind"], old["path"], old["files"]) == (_FINGERPRINT_KIND, where, stats):
                return str(old["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):  # no memo yet, or not one we wrote: hash
            pass
    fp = _hash_files(files)
    record = {"kind": _FINGERPRINT_KIND, "path": where, "files": stats, "fingerprint": fp}
    try:
        cf.atomic_write_text(memo, json.dumps(record, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only cache root: the memo only saves time, the next run hashes again
        pass
    return fp


def recorded_teachers(memo_dir: Path, fingerprint: str) -> list[str]:
    """Teacher folders whose memo in `memo_dir` holds `fingerprint` (where the teacher of a cache was last seen)."""
    found = []
    for memo in sorted(Path(memo_dir).glob("*.json")):
        try:
            record = json.loads(memo.read_text(encoding="utf-8"))
            if record["fingerprint"] == fingerprint:
                found.append(str(record["path"]))
        except (OSError, ValueError, KeyError, TypeError):  # not a memo: nothing recorded there
            continue
    return found


def _hub_snapshot(name: str) -> Path | None:
    """The local snapshot folder of a hub model, if it is in the huggingface cache (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, not a valid repo id, or no hub library: the caller falls back
        return None


def teacher_fingerprint(name_or_path: str, memo_dir: Path | None = None, *, rehash: bool = False) -> str:
    """32-hex-digit identity of a saved teacher, computed from its files without building the model.

    Hashes the weight files' bytes, and config.json and the tokenizer files less the keys that change with how
    the model was loaded or saved (so a re-saved copy keeps its identity). Precompute and distill both use
    it, so a cache is found without loading the teacher.
    With `memo_dir` (a cache root's `TEACHER_MEMOS` folder), a folder whose files all have the size and mtime
    recorded there by an earlier call gets the recorded fingerprint without reading a byte; otherwise (or
    with `rehash`) the files are hashed and the memo rewritten. A change that keeps both size and mtime
    (restored with os.utime) is only seen with `rehash` (`kd cache verify --deep`).
    A hub name uses its huggingface cache snapshot; one not yet downloaded is loaded once (which downloads
    it), so later offline runs hash the same snapshot.
    """
    _check_source(name_or_path, "model")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _folder_fingerprint(path, memo_dir, rehash)
    snapshot = _hub_snapshot(name_or_path)
    if snapshot is None:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise _load_error(name_or_path, "model", e) from e
        tokenizer = load_tokenizer(name_or_path)
        snapshot = _hub_snapshot(name_or_path)
        if snapshot is None:  # loadable, but not through the hub cache: identify it by what it computes
            return model_fingerprint(model, tokenizer)
    return _folder_fingerprint(snapshot, memo_dir, rehash)


def _tokenizer_description(tokenizer: Any) -> str:
    # The backend JSON holds the vocab, normaliser (lower-casing, accents), pre-tokeniser and special-token
    # template. Its truncation/padding are set by each call (and even saved by save_pretrained), not by the
    # tokenizer itself, so they are left out; init_kwargs is skipped for the same reason.
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("truncation", None)
    backend.pop("padding", None)
    settings = {
        "class": type(tokenizer).__name__,
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
    }
    return json.dumps({"backend": backend, "settings": settings}, sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------------------------
# Tiny offline models for tests and benchmarks


def make_tiny_classifier(
    out_dir: str | os.PathLike,
    *,
    num_labels: int = 2,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    vocab_texts: Sequence[str] = (),
    seed: int = 0,
    auto_model: type = AutoModelForSequenceClassification,
) -> Path:
    """Save a tiny random BERT with an `auto_model` head and its fast tokenizer to `out_dir` (no downloads).

    The WordPiece vocabulary is the special tokens, every lowercase word of `vocab_texts`, and single
    letters/digits/punctuation (plus their `##` continuations), so any text tokenises without [UNK] floods.
    """
    out_dir = Path(out_dir)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = sorted({w for text in vocab_texts for w in re.findall(r"[a-z0-9]+", text.lower())} - set(chars))
    tokens = specials + chars + [f"##{c}" for c in chars] + list(".,!?'\"-:;()") + words
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, model_max_length=512)
    if hidden % heads:
        raise ModelError(f"hidden={hidden} is not divisible by heads={heads}; pick a multiple of heads")
    config = BertConfig(
        vocab_size=len(tokens), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=512, num_labels=num_labels,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = auto_model.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_causal_lm(
    out_dir: str | os.PathLike,
    *,
    texts: Sequence[str],
    vocab_size: int = 300,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    seed: int = 0,
) -> Path:
    """Save a tiny random Llama causal LM and a byte-level BPE tokenizer trained on `texts` (no downloads).

    Two calls with other `vocab_size`s give two tokenizers that cut the same text differently (cross-tokenizer
    tests). The tokenizer's EOS (`</s>`) is also its pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if hidden % heads:
        raise ModelError(f"hidden={hidden} is not divisible by heads={heads}; pick a multiple of heads")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="</s>",
                                        model_max_length=4096)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
