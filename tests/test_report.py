"""`kd report`: the paired statistics (McNemar exact, paired bootstrap), the report CLI, and evaluate's predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from stages.config import config_from_dict
from stages.evaluate import evaluate
from stages.report import (
    load_predictions,
    mcnemar_exact_p,
    paired_bootstrap_ci,
    save_predictions,
)

# ----------------------------------------------------------------------------------------------------------------
# McNemar


@pytest.mark.parametrize("b", [0, 1, 5, 40])
def test_mcnemar_equal_discordant_counts_give_one(b):
    assert mcnemar_exact_p(b, b) == 1.0


def test_mcnemar_hand_computed_cases():
    assert mcnemar_exact_p(0, 10) == pytest.approx(2 * 0.5**10, rel=1e-12)
    assert mcnemar_exact_p(10, 0) == mcnemar_exact_p(0, 10)
    # 2 * (C(10,0) + C(10,1) + C(10,2)) / 2**10 = 2 * 56 / 1024
    assert mcnemar_exact_p(2, 8) == pytest.approx(0.109375, rel=1e-12)
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, airway hyper-responsiveness example:
    # b = 1, c = 7, exact conditional McNemar p = 0.070 (= 2 * 9 / 256)
    assert mcnemar_exact_p(1, 7) == pytest.approx(0.0703125, rel=1e-12)
    assert mcnemar_exact_p(3, 4) == 1.0  # 2 * P[X <= 3] > 1 for n = 7: capped


def test_mcnemar_matches_scipy_binomtest():
    from scipy import stats  # a test dependency: the reference implementation
    for b, c in [(0, 1), (3, 9), (17, 30), (120, 95), (400, 470)]:
        expected = stats.binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9), (b, c)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 3)


# ----------------------------------------------------------------------------------------------------------------
# Paired bootstrap


def _correct(n: int, p: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def test_bootstrap_ci_contains_observed_difference():
    a, b = _correct(500, 0.8, 1), _correct(500, 0.7, 2)
    low, high = paired_bootstrap_ci(a, b)
    observed = a.mean() - b.mean()
    assert low < observed < high
    assert low > 0  # a 10-point gap on 500 examples is well outside noise


def test_bootstrap_ci_shrinks_with_more_examples():
    a, b = _correct(200, 0.8, 1), _correct(200, 0.75, 2)
    small = paired_bootstrap_ci(a, b)
    big = paired_bootstrap_ci(np.tile(a, 16), np.tile(b, 16))  # same difference, 16x the examples
    # the width scales as 1/sqrt(n): about a quarter
    assert (big[1] - big[0]) < 0.35 * (small[1] - small[0])


def test_bootstrap_ci_is_reproducible_from_the_seed():
    a, b = _correct(300, 0.8, 1), _correct(300, 0.75, 2)
    assert paired_bootstrap_ci(a, b, seed=7) == paired_bootstrap_ci(a, b, seed=7)
    assert paired_bootstrap_ci(a, b, seed=7) != paired_bootstrap_ci(a, b, seed=8)


def test_bootstrap_ci_of_identical_predictions_is_zero():
    a = _correct(300, 0.8, 1)
    assert paired_bootstrap_ci(a, a.copy()) == (0.0, 0.0)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99])
def test_bootstrap_ci_equals_an_explicit_resampling_loop(level):
    """The same generator, one resample at a time, percentile interval by np.quantile: the reference."""
    rng0 = np.random.default_rng(3)
    a, b = rng0.random(301) < 0.8, rng0.random(301) < 0.7
    diff = a.astype(int) - b.astype(int)
    rng = np.random.default_rng(0)
    means = [diff[rng.integers(0, len(diff), size=len(diff))].mean() for _ in range(2000)]
    tail = (1 - level) / 2
    expected = tuple(float(q) for q in np.quantile(means, [tail, 1 - tail]))
    assert paired_bootstrap_ci(a, b, resamples=2000, seed=0, level=level) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_ci_covers_the_true_difference_about_as_often_as_its_level():
    """Coverage simulation: paired correctness with a known true accuracy gap of 0.05."""
    rng = np.random.default_rng(11)
    trials, n, covered = 300, 300, {0.8: 0, 0.95: 0}
    for t in range(trials):
        u = rng.random(n)
        a, b = u < 0.80, u < 0.75  # paired: the model is right wherever the baseline is, plus 5 points
        for level in covered:
            low, high = paired_bootstrap_ci(a, b, resamples=1000, seed=t, level=level)
            covered[level] += low <= 0.05 <= high
    # Binomial spread of 300 trials is about +-0.025 at 0.95 and +-0.045 at 0.8; percentile intervals run a bit
    # narrow at this n.
    assert 0.90 <= covered[0.95] / trials <= 0.99, covered
    assert 0.70 <= covered[0.8] / trials <= 0.89, covered


def test_bootstrap_uses_the_pairing():
    # Two models right on the same examples except 10: unpaired, the spread would come from 50% accuracy.
    a = np.arange(400) % 2 == 0
    b = a.copy()
    b[:20:2] = False  # baseline wrong on 10 examples the model gets right
    low, high = paired_bootstrap_ci(a, b)
    assert 0 < low and high < 0.05


# ----------------------------------------------------------------------------------------------------------------
# kd report


N = 40
IDS = [f"ex{i:03d}" for i in range(N)]
LABELS = [i % 2 for i in range(N)]


def _preds(n_right: int) -> list[int]:
    """Right on the first `n_right` examples, wrong on the rest."""
    return [y if i < n_right else 1 - y for i, y in enumerate(LABELS)]


def _write_run(folder: Path, models: dict[str, list[int]], *, predictions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        m: {"model": f"models/{m}", "accuracy": round(float(np.mean(np.array(p) == LABELS)), 4), "macro_f1": 0.5,
            "parameters": 4_000_000 if m != "teacher" else 22_000_000, "examples_per_second": 1000.0,
            "device": "cpu", "split": "test", "examples": N}
        for m, p in models.items()
    }
    (folder / "evaluate.json").write_text(json.dumps(results, indent=2))
    if predictions:
        save_predictions(folder / "predictions.json", split="test", data="data/test.csv", ids=IDS, labels=LABELS,
                         models=models)
    return folder


def _report(*args: str):
    return CliRunner().invoke(cli, ["report", *args])


def _params(tmp_path: Path, run: Path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"output": str(run / "evaluate.json"),
                                                 "predictions": str(run / "predictions.json")}}))
    return str(path)


def _row(output: str, model: str) -> list[str]:
    [line] = [ln for ln in output.splitlines() if ln.startswith(f"| {model} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def _one_line_error(r) -> str:
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def test_report_one_run_paired_statistics(tmp_path):
    # baseline right on 20/40; student on 30 (10 discordant, all its way); teacher on all 40
    run = _write_run(tmp_path / "m", {"teacher": _preds(40), "student": _preds(30), "baseline": _preds(20)})
    r = _report("--params", _params(tmp_path, run))
    assert r.exit_code == 0, r.output
    assert "| model | accuracy | macro-F1 | parameters | examples/s | Δ acc vs baseline | 95% CI | McNemar p |" \
        in r.output
    student = _row(r.output, "student")
    assert student[:2] == ["student", "0.7500"] and student[5] == "+0.2500"
    assert student[7] == f"{2 * 0.5**10:.4f}"  # b = 10, c = 0
    low, high = (float(x) for x in student[6].strip("[]").split(","))
    assert 0 < low < 0.25 < high <= 0.5
    teacher = _row(r.output, "teacher")
    assert teacher[5] == "+0.5000" and teacher[7] == f"{2 * 0.5**20:.1e}"
    assert _row(r.output, "baseline")[5] == "(reference)"
    assert "Paired on the same 40 examples (test split, data/test.csv)" in r.output


def test_report_baseline_option_picks_the_reference(tmp_path):
    run = _write_run(tmp_path / "m", {"teacher": _preds(40), "student": _preds(30), "baseline": _preds(20)})
    r = _report("--run", str(run), "--baseline", "teacher")
    assert r.exit_code == 0, r.output
    assert "Δ acc vs teacher" in r.output
    assert _row(r.output, "teacher")[5] == "(reference)"
    assert _row(r.output, "student")[5] == "-0.2500"
    assert "no such model" in _one_line_error(_report("--run", str(run), "--baseline", "nobody"))


def test_report_without_baseline_is_the_plain_table_and_a_note(tmp_path):
    run = _write_run(tmp_path / "m", {"teacher": _preds(40), "student": _preds(30)})
    r = _report("--run", str(run))
    assert r.exit_code == 0, r.output
    assert "| model | accuracy | macro-F1 | parameters | examples/s |\n|---|---:|---:|---:|---:|\n" in r.output
    assert "McNemar" not in r.output and "95% CI" not in r.output
    assert _row(r.output, "student") == ["student", "0.7500", "0.5000", "4.0M", "1000"]
    assert "note: no model named 'baseline'" in r.output


def test_report_without_predictions_asks_to_rerun_evaluate(tmp_path):
    # A run from before predictions.json existed: metrics only.
    run = _write_run(tmp_path / "old", {"teacher": _preds(40), "student": _preds(30), "baseline": _preds(20)},
                     predictions=False)
    r = _report("--params", _params(tmp_path, run))
    assert r.exit_code == 0, r.output
    student = _row(r.output, "student")
    assert student[5] == "+0.2500" and student[6] == "—" and student[7] == "—"
    assert "not found" in r.output and "rerun `kd evaluate`" in r.output


def test_report_several_runs_adds_mean_and_spread(tmp_path):
    runs = [
        _write_run(tmp_path / "seed1", {"student": _preds(30), "baseline": _preds(20)}),
        _write_run(tmp_path / "seed2", {"student": _preds(26), "baseline": _preds(22)}),
        _write_run(tmp_path / "seed3", {"student": _preds(24), "baseline": _preds(24)}),
    ]
    # the third run given as a pair of files
    r = _report("--run", str(runs[0]), "--run", str(runs[1]),
                "--run", f"{runs[2] / 'evaluate.json'},{runs[2] / 'predictions.json'}")
    assert r.exit_code == 0, r.output
    for i in (1, 2, 3):
        assert f"### run {i}:" in r.output
    # per-run paired statistics are there: run 3 has no discordant pair at all
    assert r.output.count("| student |") == 4 and "| +0.0000 | [+0.0000, +0.0000] | 1.0000 |" in r.output
    summary = r.output.split("### across 3 runs")[1]
    accs, deltas = np.array([0.75, 0.65, 0.6]), np.array([0.25, 0.1, 0.0])
    student = _row(summary, "student")
    assert student[:2] == ["student", "3"]
    assert student[2] == f"{accs.mean():.4f} ± {accs.std(ddof=1):.4f}" and student[3] == "0.6000 – 0.7500"
    assert student[4] == f"+{deltas.mean():.4f} ± {deltas.std(ddof=1):.4f}" and student[5] == "+0.0000 – +0.2500"
    assert _row(summary, "baseline")[4] == "(reference)"


def test_report_run_must_be_a_folder_or_a_pair(tmp_path):
    run = _write_run(tmp_path / "m", {"student": _preds(30), "baseline": _preds(20)})
    assert "not a folder" in _one_line_error(_report("--run", str(run / "evaluate.json")))
    missing = _one_line_error(_report("--run", f"{run / 'evaluate.json'},{run / 'nope.json'}"))
    assert "nope.json does not exist" in missing


def _corrupt(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if key in d:
            d[key] = value
        else:
            d["models"][key] = value
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"student": _preds(30)[:-1]}, "model 'student' has 39 entries for 40 ids"),
        ({"ids": IDS[:-1] + ["ex000"]}, "id 'ex000' appears more than once"),
        ({"labels": LABELS[:-2]}, "labels has 38 entries for 40 ids"),
        ({"student": _preds(31)}, "model 'student' scores 0.7750 but the metrics say 0.7500"),
    ],
)
def test_report_mismatched_predictions_exit_1_with_one_line(tmp_path, changes, expected):
    run = _write_run(tmp_path / "m", {"student": _preds(30), "baseline": _preds(20)})
    _corrupt(run / "predictions.json", **changes)
    assert expected in _one_line_error(_report("--run", str(run)))


def test_report_model_missing_from_predictions_exits_1(tmp_path):
    run = _write_run(tmp_path / "m", {"student": _preds(30), "baseline": _preds(20)})
    d = json.loads((run / "predictions.json").read_text())
    del d["models"]["student"]
    (run / "predictions.json").write_text(json.dumps(d))
    assert "no predictions for model(s) student" in _one_line_error(_report("--run", str(run)))


def test_report_missing_metrics_file_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "does not exist; run `kd evaluate`" in _one_line_error(_report("--run", str(tmp_path / "empty")))


# ----------------------------------------------------------------------------------------------------------------
# kd evaluate writes the predictions


def test_evaluate_writes_predictions(tmp_path, tiny_data_dir, tiny_teacher_dir):
    out, preds_path = tmp_path / "metrics" / "evaluate.json", tmp_path / "metrics" / "predictions.json"
    params = {
        "data": {"train": str(tiny_data_dir / "train.csv"), "dev": str(tiny_data_dir / "dev.csv"),
                 "test": str(tiny_data_dir / "test.csv")},
        "evaluate": {"models": {"teacher": str(tiny_teacher_dir), "baseline": str(tiny_teacher_dir)},
                     "max_length": 32, "batch_size": 16, "throughput_batches": 1,
                     "output": str(out), "predictions": str(preds_path)},
    }
    results = evaluate(config_from_dict(params))

    preds = load_predictions(preds_path)
    with open(tiny_data_dir / "test.csv") as f:
        rows = list(csv.DictReader(f))
    assert preds.split == "test" and preds.data == str(tiny_data_dir / "test.csv")
    assert preds.ids == [r["id"] for r in rows]
    assert preds.labels.tolist() == [int(r["label"]) for r in rows]
    assert set(preds.models) == {"teacher", "baseline"}
    for name, p in preds.models.items():
        assert len(p) == len(rows) and set(p.tolist()) <= {0, 1}
        assert round(float((p == preds.labels).mean()), 4) == results[name]["accuracy"]
    assert preds.models["teacher"].tolist() == preds.models["baseline"].tolist()  # same model, same answers
    assert json.loads(out.read_text()) == results  # evaluate.json keeps its format
    assert not list(preds_path.parent.glob("*.partial"))

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    r = _report("--params", str(params_file))
    assert r.exit_code == 0, r.output
    assert _row(r.output, "teacher")[5:] == ["+0.0000", "[+0.0000, +0.0000]", "1.0000"]


def test_report_on_a_regression_or_multi_task_file_says_what_it_compares(tmp_path):
    from stages.report import ReportError, load_results

    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps({"teacher": {"pearson": 0.5, "spearman": 0.4, "parameters": 1,
                                            "examples_per_second": 2.0}}))
    with pytest.raises(ReportError, match=r"model 'teacher' has no accuracy \(pearson, spearman, parameters, "
                                          r"examples_per_second\): `kd report` compares classifiers"):
        load_results(path)
    path.write_text(json.dumps({"ner": {"teacher": {"f1": 0.5}}}))
    with pytest.raises(ReportError, match=r"model 'ner' has no accuracy \(teacher\)"):
        load_results(path)
