"""A cached distill finds and checks its cache without reading the teacher's weights (issue 10).

The teacher's fingerprint is memoised in `<cache root>/.teachers/` by path and file (size, mtime_ns);
`kd cache verify --deep` hashes the teacher in full.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import safetensors
import transformers.modeling_utils
from click.testing import CliRunner
from transformers import AutoModelForSequenceClassification

from cache_format import CacheMismatchError, KDError
from pipeline.cache_cli import cache
from stages.distill import distill
from stages.precompute import precompute
from stages.config import config_from_dict
from stages.methods import load_distill_data
from stages.models import TEACHER_MEMOS, load_classifier, teacher_fingerprint
from tests.helpers import stage_params

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_opened: list[str] | None = None  # the audit hook records into it while a test listens
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.abspath(os.fsdecode(args[0])))


@contextmanager
def _record_opens() -> Iterator[list[str]]:
    """Every file opened meanwhile: Python opens (audit hook) and safetensors' own (Rust) opens."""
    global _opened, _hooked
    if not _hooked:  # an audit hook cannot be removed: install one for the session, idle unless listening
        sys.addaudithook(_audit)
        _hooked = True
    seen: list[str] = []
    real = safetensors.safe_open

    def safe_open(filename, *a, **k):
        seen.append(os.path.abspath(os.fspath(filename)))
        return real(filename, *a, **k)

    modules = (safetensors, transformers.modeling_utils)
    for m in modules:
        m.safe_open = safe_open
    _opened = seen
    try:
        yield seen
    finally:
        _opened = None
        for m in modules:
            m.safe_open = real


def _weights_opened(opened: list[str], teacher: Path) -> list[str]:
    root = os.path.realpath(teacher)
    return [p for p in opened if os.path.realpath(p).startswith(root + os.sep) and p.endswith(_WEIGHT_SUFFIXES)]


def _params(tmp: Path, data: Path, teacher: Path, student_config: Path, **distill_settings) -> dict:
    files = {split: str(data / f"{split}.csv") for split in ("train", "dev", "test")}
    return stage_params(tmp, teacher, files, distill={"student": {"config": str(student_config), "num_layers": 2},
                                                      "epochs": 0.2, **distill_settings})


def _copy_teacher(src: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(src, tmp / "teacher_copy"))


def _change_weights(teacher: Path, *, keep_stats: bool) -> None:
    """Flip one bit of weight data (same size); with `keep_stats`, put the old mtime back as os.utime can."""
    path = teacher / "model.safetensors"
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x01  # tensor data, past the header
    path.write_bytes(bytes(data))
    if keep_stats:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert after.st_size == before.st_size
    assert (after.st_mtime_ns == before.st_mtime_ns) == keep_stats  # a precondition, not the behaviour under test


@pytest.mark.parametrize("named", ["absolute", "bare"])
def test_deleted_teacher_with_explicit_cache_still_trains(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_model_dir,
                                                          capsys, monkeypatch, named):
    teacher = _copy_teacher(tiny_teacher_dir, tmp_path)
    # "bare": a folder name without a slash, relative to the working folder, which could also be a hub name;
    # it was a folder when the cache was made, so it is a gone folder, not a hub model to download.
    monkeypatch.chdir(tmp_path)
    name = str(teacher) if named == "absolute" else teacher.name
    p = _params(tmp_path, tiny_data_dir, Path(name), tiny_model_dir)
    [res] = precompute(config_from_dict(p))
    shutil.rmtree(teacher)
    p["distill"]["caches"] = [str(res.path)]
    capsys.readouterr()
    out = distill(config_from_dict(p))
    assert out.caches == [str(res.path)] and out.fit.steps > 0
    gone = [line for line in capsys.readouterr().err.splitlines() if "is gone" in line]
    assert len(gone) == 1 and gone[0].startswith("warning:") and str(res.path) in gone[0]
    assert f"entry {name}:" in gone[0]
    deep = CliRunner().invoke(cache, ["verify", "--deep", "--teacher", name, str(res.path)])
    assert deep.exit_code == 1 and f"teacher folder {name} is gone" in deep.output, deep.output
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").config.num_hidden_layers == 2


def test_cached_distill_opens_no_teacher_weight_file(tmp_path, tiny_data_dir, tiny_teacher_dir):
    teacher = _copy_teacher(tiny_teacher_dir, tmp_path)
    # The student's config and tokenizer come from the teacher folder too: only its weights are off limits.
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, teacher, teacher))
    [res] = precompute(cfg)
    [memo] = (tmp_path / "caches" / TEACHER_MEMOS).glob("*.json")
    record = json.loads(memo.read_text())
    assert record["path"] == str(teacher.resolve()) and "model.safetensors" in record["files"]

    with _record_opens() as opened:
        out = distill(cfg)
    assert out.caches == [str(res.path)]
    assert any(p.endswith("config.json") for p in opened)  # the recorder sees this run's opens
    assert _weights_opened(opened, teacher) == []

    # The recorder would have seen the weights being hashed (Python open) or loaded (safetensors).
    with _record_opens() as opened:
        teacher_fingerprint(str(teacher))
    assert _weights_opened(opened, teacher) == [str(teacher / "model.safetensors")]
    with _record_opens() as opened:
        load_classifier(str(teacher), 2)
    assert str(teacher / "model.safetensors") in _weights_opened(opened, teacher)


def test_change_with_restored_mtime_passes_the_cheap_check_and_fails_verify_deep(tmp_path, tiny_data_dir,
                                                                                  tiny_teacher_dir, tiny_model_dir):
    teacher = _copy_teacher(tiny_teacher_dir, tmp_path)
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, teacher, tiny_model_dir))
    [res] = precompute(cfg)
    runner = CliRunner()
    ok = runner.invoke(cache, ["verify", "--deep", "--teacher", str(teacher), str(res.path)])
    assert ok.exit_code == 0 and "teacher matches" in ok.output, ok.output

    _change_weights(teacher, keep_stats=True)
    # The known limit: same size and mtime look like the same teacher, so the cache is still found.
    _, _, readers = load_distill_data(cfg)
    assert [r.path for r in readers] == [res.path]
    plain = runner.invoke(cache, ["verify", str(res.path)])
    assert plain.exit_code == 0, plain.output
    deep = runner.invoke(cache, ["verify", "--deep", str(res.path)])  # the teacher recorded next to the cache
    assert deep.exit_code == 1
    assert f"teacher {teacher.resolve()} hashes to" in deep.output and "rerun `kd precompute`" in deep.output
    # --deep rewrote the memo: from now on the cheap check sees the new identity too.
    with pytest.raises(KDError, match="no cache for teacher"):
        load_distill_data(cfg)


def test_changed_teacher_is_rehashed_and_refused(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_model_dir):
    teacher = _copy_teacher(tiny_teacher_dir, tmp_path)
    p = _params(tmp_path, tiny_data_dir, teacher, tiny_model_dir)
    [res] = precompute(config_from_dict(p))
    _change_weights(teacher, keep_stats=False)
    with pytest.raises(KDError, match="no cache for teacher"):
        load_distill_data(config_from_dict(p))
    p["distill"]["caches"] = [str(res.path)]
    with pytest.raises(CacheMismatchError, match="was made by another teacher"):
        load_distill_data(config_from_dict(p))
    [memo] = (tmp_path / "caches" / TEACHER_MEMOS).glob("*.json")
    assert json.loads(memo.read_text())["fingerprint"] == teacher_fingerprint(str(teacher))


def test_verify_deep_without_a_recorded_teacher_asks_for_one(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                             tiny_model_dir):
    [res] = precompute(config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir, tiny_model_dir)))
    shutil.rmtree(tmp_path / "caches" / TEACHER_MEMOS)
    r = CliRunner().invoke(cache, ["verify", "--deep", str(res.path)])
    assert r.exit_code == 1 and "pass the teacher with --teacher PATH" in r.output
    r = CliRunner().invoke(cache, ["verify", "--teacher", str(tiny_teacher_dir), str(res.path)])
    assert r.exit_code == 2 and "only used with --deep" in r.output
