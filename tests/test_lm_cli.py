"""Bad input to the causal_lm flow through the `kd` CLI: one `Error:` line, exit 1, no traceback.

Complements the function-level checks in tests/test_task_causal_lm.py and tests/test_lm_distill.py (and the CLI
ones there: empty or too short text and k above the vocabulary at precompute) with the paths only distill and
evaluate take: a student with another vocabulary, a cache of another codec, text that is empty or shorter than
one block when there is no cache to find first.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from tests.tiny_models import make_tiny_causal_lm

L = 16
_DOCS = [f"the cat number {i} sat on the mat and the dog barked at it ." for i in range(40)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """train.txt, a tiny Llama teacher (V=300), another tokenizer's model (V=400), and a topk and a sampled cache
    of the teacher."""
    root = tmp_path_factory.mktemp("lmcli")
    (root / "train.txt").write_text("\n".join(_DOCS) + "\n")
    make_tiny_causal_lm(root / "teacher", texts=_DOCS, vocab_size=300)
    make_tiny_causal_lm(root / "other", texts=_DOCS, vocab_size=400, seed=1)
    for codec in ({"codec": "topk", "k": 8}, {"codec": "sampled", "samples": 4}):
        code, out = _kd(["precompute"], _params(root, root, codec=codec), root)
        assert code == 0, out
    return root


def _params(root: Path, tmp: Path, *, codec: dict | None = None, student: str = "teacher", lm: dict | None = None,
            signal: str = "cached", **distill) -> dict:
    return {
        "data": {"task": "causal_lm", "train": str(root / "train.txt"), "dev": None, "test": str(root / "train.txt")},
        "precompute": {"teachers": [str(root / "teacher")], "cache_root": str(root / "caches"), "max_length": L,
                       "batch_size": 8, "lm": codec or {"codec": "topk", "k": 8}},
        "distill": {"teacher_signal": signal, "max_length": L, "batch_size": 8, "epochs": 1,
                    "student": {"config": str(root / student), "num_layers": 1}, "lm": lm or {},
                    "output": str(tmp / "student"), "log_dir": str(tmp / "live"), "metrics": str(tmp / "m.json"),
                    **distill},
        "evaluate": {"models": {"teacher": str(root / "teacher")}, "max_length": L, "batch_size": 8,
                     "throughput_batches": 1, "output": str(tmp / "eval.json"), "predictions": str(tmp / "p.json")},
    }


def _kd(args: list[str], params: dict, tmp: Path) -> tuple[int, str]:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(cli, [*args, "--params", str(path)])
    return res.exit_code, res.output


def _one_error_line(code: int, output: str) -> str:
    """The `Error: ...` line of a run that failed as a user error should: exit 1, one line, no traceback."""
    assert code == 1, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == output.strip().splitlines()[-1], output
    return errors[0]


def _cache(root: Path, codec: str) -> Path:
    field = {"topk": "topk_ids", "sampled": "sample_ids"}[codec]
    found = [p for p in (root / "caches").iterdir() if p.is_dir() and not p.name.startswith(".")
             and field in (p / "manifest.json").read_text()]
    assert len(found) == 1, found
    return found[0]


def test_a_student_with_another_vocabulary_needs_cross_tokenizer(lm, tmp_path):
    line = _one_error_line(*_kd(["distill"], _params(lm, tmp_path, student="other"), tmp_path))
    assert line == ("Error: the student's vocabulary differs from the teacher's, so their next-token distributions "
                    "cannot be compared id by id; give the student the teacher's tokenizer, or set "
                    "distill.lm.cross_tokenizer: true (Universal Logit Distillation over a topk cache)")
    assert not (tmp_path / "student").exists()
    # Online too: the teacher's distribution is as incomparable live as cached.
    line = _one_error_line(*_kd(["distill"], _params(lm, tmp_path, student="other", signal="online"), tmp_path))
    assert "vocabulary differs from the teacher's" in line


def test_cross_tokenizer_on_a_sampled_cache_is_refused(lm, tmp_path):
    params = _params(lm, tmp_path, student="other", lm={"cross_tokenizer": True},
                     caches=[str(_cache(lm, "sampled"))])
    line = _one_error_line(*_kd(["distill"], params, tmp_path))
    assert line == (f"Error: distill.lm.cross_tokenizer needs a topk cache, but {_cache(lm, 'sampled')} holds "
                    "sampled; precompute with precompute.lm.codec: topk")
    # Said in the settings, it is a settings error before anything loads (the settings' format: a header line,
    # then one line per problem).
    params = _params(lm, tmp_path, student="other", lm={"cross_tokenizer": True}, codec={"codec": "sampled"})
    code, output = _kd(["distill"], params, tmp_path)
    assert code == 1 and "Traceback" not in output
    assert output.strip().splitlines() == [
        "Error: invalid settings:",
        ("  distill.lm.cross_tokenizer: Universal Logit Distillation reads a cached top-k: set "
         "distill.teacher_signal: cached and precompute.lm.codec: topk")]


def test_a_distill_temperature_other_than_the_caches_is_refused_in_one_line(lm, tmp_path):
    """A cache's capture temperature (1 here) is the only one it serves: by the settings' rules for the caches
    precompute writes, and against the manifest for an explicit distill.caches folder."""
    params = _params(lm, tmp_path, kd={"temperature": 2.0})
    code, output = _kd(["distill"], params, tmp_path)
    assert code == 1 and "Traceback" not in output
    assert output.strip().splitlines() == [
        "Error: invalid settings:",
        ("  distill.kd.temperature: 2 differs from the cache's capture temperature 1: a cached teacher holds its "
         "distribution at the temperature it was captured at; set precompute.lm.temperature: 2 and rerun kd "
         "precompute (or distill.kd.temperature: 1)")]
    cache = _cache(lm, "topk")
    line = _one_error_line(*_kd(["distill"], _params(lm, tmp_path, kd={"temperature": 2.0}, caches=[str(cache)]),
                                tmp_path))
    assert line == (f"Error: distill.kd.temperature: 2 differs from cache {cache}'s capture temperature 1: a cached "
                    "teacher holds its distribution at the temperature it was captured at; set "
                    "precompute.lm.temperature: 2 and rerun kd precompute (or distill.kd.temperature: 1)")
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("text", ["", "\n  \n", "the cat\n"], ids=["empty", "blank", "shorter-than-a-block"])
@pytest.mark.parametrize("stage", ["distill", "evaluate"])
def test_empty_or_short_text_at_distill_and_evaluate(lm, tmp_path, text, stage):
    data = tmp_path / "text.txt"
    data.write_text(text)
    params = _params(lm, tmp_path, signal="none")  # labels only: no cache is looked up first
    params["data"]["train" if stage == "distill" else "test"] = str(data)
    line = _one_error_line(*_kd([stage], params, tmp_path))
    if text.strip():
        assert re.fullmatch(rf"Error: the text has \d+ tokens \(with an EOS after each document\), fewer than one "
                            rf"block of max_length={L}; give more text or lower max_length", line), line
    else:
        assert line == (f"Error: {data} holds no text (every document is blank); give one document per line (.txt) "
                        "or per row")


def test_the_lm_example_settings_parse():
    """examples/lm.yaml (README "Language models: a run on Penn Treebank") still parses: no train_teacher section
    (examples/run.sh then skips that stage), one teacher, a student with the teacher's tokenizer."""
    from stages.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "lm.yaml"
    assert "train_teacher" not in yaml.safe_load(path.read_text())
    cfg = load_config(str(path), ())
    assert cfg.data.task == "causal_lm" and cfg.precompute.teachers == ["bundled:smollm2-135m"]
    assert cfg.distill.student.config == "bundled:smollm2-135m"
    assert cfg.distill.max_length == cfg.precompute.max_length and cfg.precompute.lm.codec == "topk"
