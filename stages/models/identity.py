"""What a model computes, as a hash: `model_fingerprint` of a loaded model, `teacher_fingerprint` of a saved folder
(memoised by path and file stats), which keys every teacher cache."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

import cache_format as cf
from stages.models.loading import _VOLATILE_CONFIG_KEYS, ModelError, _check_source, _load_error, load_tokenizer

__all__ = ["model_fingerprint", "TEACHER_MEMOS", "recorded_teachers", "teacher_fingerprint"]


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
