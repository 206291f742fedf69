"""`kd report`: did distillation help? Each model against the labels-only baseline, on the same examples.

`kd evaluate` writes two files per run: `evaluate.output` (accuracy, macro-F1, size and speed per model)
and `evaluate.predictions` (every model's predicted label per example id, see `save_predictions`). With
both, each model is compared with the baseline on the same test examples: the accuracy difference, a
paired bootstrap 95% interval of it and McNemar's exact p-value. Several runs (e.g. one per seed) add
the mean and spread of accuracy and of the difference across runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_format import atomic_write_text
from cache_format import KDError

__all__ = [
    "Predictions",
    "ReportError",
    "Row",
    "Summary",
    "load_predictions",
    "load_results",
    "mcnemar_exact_p",
    "paired_bootstrap_ci",
    "report_rows",
    "save_predictions",
    "summarize_runs",
]

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
_CHUNK_ENTRIES = 1 << 22  # resampled indices held at once: bounds memory for large test sets


class ReportError(KDError, ValueError):
    """The metrics or predictions files are missing, malformed or do not belong together."""


@dataclass(frozen=True)
class Predictions:
    """Per-example predictions of one `kd evaluate` run: parallel to `ids`, gold `labels` once."""

    split: str
    data: str
    ids: list[str]
    labels: np.ndarray
    models: dict[str, np.ndarray]


@dataclass(frozen=True)
class Row:
    """One model's line of the report; the paired fields are None where they cannot be computed."""

    model: str
    accuracy: float
    macro_f1: float
    parameters: int
    examples_per_second: float
    delta: float | None = None  # accuracy - baseline accuracy
    ci: tuple[float, float] | None = None  # paired bootstrap interval of `delta`
    p_value: float | None = None  # McNemar exact, two-sided
    is_baseline: bool = False


@dataclass(frozen=True)
class Summary:
    """One model across several runs: accuracy and difference to baseline (None where unavailable)."""

    model: str
    runs: int
    accuracy: tuple[float, float, float, float]  # mean, sample std (nan for one run), min, max
    delta: tuple[float, float, float, float] | None


# ----------------------------------------------------------------------------------------------------------------
# Files


def save_predictions(path: str | Path, *, split: str, data: str, ids: Sequence[str], labels: Sequence[int],
                     models: Mapping[str, Sequence[int]]) -> None:
    """Write the predictions file atomically as compact JSON: ids, labels and each model's list, all parallel."""
    record = {
        "split": split,
        "data": str(data),
        "ids": list(ids),
        "labels": [int(x) for x in labels],
        "models": {name: [int(x) for x in preds] for name, preds in models.items()},
    }
    atomic_write_text(Path(path), json.dumps(record, separators=(",", ":")) + "\n")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist; run `kd evaluate` (or `dvc repro`) first") from None
    except OSError as e:  # a folder, no permission...
        raise ReportError(f"cannot read {path} ({e.strerror}); give the path of the {what} file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON ({e}); rerun `kd evaluate` to rewrite the {what}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object of {what}; rerun `kd evaluate`")
    return data


def load_results(path: str | Path) -> dict[str, dict]:
    """The `kd evaluate` metrics file: {model name: {accuracy, macro_f1, parameters, examples_per_second, ...}}."""
    path = Path(path)
    results = _read_json(path, "metrics")
    for name, r in results.items():
        missing = [k for k in ("accuracy", "macro_f1", "parameters", "examples_per_second")
                   if not isinstance(r, dict) or k not in r]
        if missing and isinstance(r, dict) and "accuracy" not in r:  # another task kind, or a multi-task file
            raise ReportError(f"{path}: model {name!r} has no accuracy ({', '.join(map(str, r)) or 'no metrics'}): "
                              "`kd report` compares classifiers; read the other task kinds' metrics in the file")
        if missing:
            raise ReportError(f"{path}: model {name!r} lacks {', '.join(missing)}; rerun `kd evaluate`")
    return results


def load_predictions(path: str | Path) -> Predictions:
    """Read and check a predictions file: unique ids, one label and one prediction per id for every model."""
    path = Path(path)
    d = _read_json(path, "predictions")
    missing = [k for k in ("split", "data", "ids", "labels", "models") if k not in d]
    if missing:
        raise ReportError(f"{path}: missing key(s) {', '.join(missing)}; rerun `kd evaluate` to rewrite it")
    ids = [str(i) for i in d["ids"]]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ReportError(f"{path}: id {dup!r} appears more than once; ids must be unique, rerun `kd evaluate`")
    for name, values in [("labels", d["labels"])] + [(f"model {m!r}", v) for m, v in d["models"].items()]:
        if len(values) != len(ids):
            raise ReportError(f"{path}: {name} has {len(values)} entries for {len(ids)} ids; predictions must "
                              "be parallel to ids, rerun `kd evaluate`")
    return Predictions(split=str(d["split"]), data=str(d["data"]), ids=ids,
                       labels=np.asarray(d["labels"], dtype=np.int64),
                       models={m: np.asarray(v, dtype=np.int64) for m, v in d["models"].items()})


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def mcnemar_exact_p(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for b and c discordant pairs (model right / baseline right only).

    Under the null each discordant pair goes either way with probability 1/2, so with X ~ Binomial(b + c, 1/2)
    p = min(1, 2 * P[X <= min(b, c)]). Computed with exact integers: no rounding until the final division.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0 (got b={b}, c={c})")
    n, k = b + c, min(b, c)
    if n == 0 or b == c:
        return 1.0
    term = tail = 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        tail += term
    return min(1.0, tail / 2 ** (n - 1))


def paired_bootstrap_ci(correct_model: np.ndarray, correct_baseline: np.ndarray, *,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(correct_model) - mean(correct_baseline) over paired examples.

    Both arrays say per example whether the prediction was right; the same resampled example indices
    (drawn with replacement, `resamples` times, from a generator seeded with `seed`) are used for both,
    so the interval reflects the pairing. Identical inputs give (0.0, 0.0).
    """
    a = np.asarray(correct_model, dtype=np.int8)
    b = np.asarray(correct_baseline, dtype=np.int8)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two non-empty 1-d arrays of the same length (got {a.shape} and {b.shape})")
    diff = a - b  # -1, 0 or 1 per example
    n = len(diff)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------------------------
# Report


def report_rows(results: Mapping[str, Mapping], predictions: Predictions | None, baseline: str | None, *,
                source: str = "predictions", resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> list[Row]:
    """One Row per model of `results` (in its order), compared with `baseline` when that model is present.

    Without `predictions` the difference comes from the rounded accuracies of `results` and the interval
    and p-value stay None. With them, every model of `results` must have predictions (`source` names the
    file in errors) and the paired statistics are computed on the examples both were scored on.
    """
    if predictions is not None:
        absent = [m for m in results if m not in predictions.models]
        if absent:
            raise ReportError(f"{source} has no predictions for model(s) {', '.join(absent)} listed in the "
                              "metrics; both files must come from the same `kd evaluate` run, rerun it")
        for m in results:
            acc = float((predictions.models[m] == predictions.labels).mean())
            # evaluate.json rounds to 4 decimals: a larger gap means the two files are from different runs
            if abs(acc - float(results[m]["accuracy"])) > 5.1e-5:
                raise ReportError(f"{source}: model {m!r} scores {acc:.4f} but the metrics say "
                                  f"{float(results[m]['accuracy']):.4f}; the files are from different "
                                  "`kd evaluate` runs, rerun it")
    rows = []
    for m, r in results.items():
        row = {"model": m, "accuracy": float(r["accuracy"]), "macro_f1": float(r["macro_f1"]),
               "parameters": int(r["parameters"]), "examples_per_second": float(r["examples_per_second"])}
        if baseline is not None and baseline in results:
            if predictions is None:
                row["delta"] = round(float(r["accuracy"]) - float(results[baseline]["accuracy"]), 4)
            else:
                right = predictions.models[m] == predictions.labels
                base_right = predictions.models[baseline] == predictions.labels
                row["delta"] = float(right.mean() - base_right.mean())
                row["ci"] = paired_bootstrap_ci(right, base_right, resamples=resamples, seed=seed)
                row["p_value"] = mcnemar_exact_p(int((right & ~base_right).sum()), int((~right & base_right).sum()))
            row["is_baseline"] = m == baseline
        rows.append(Row(**row))
    return rows


def _spread(values: Sequence[float]) -> tuple[float, float, float, float]:
    v = np.asarray(values, dtype=float)
    std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return float(v.mean()), std, float(v.min()), float(v.max())


def summarize_runs(runs: Sequence[Sequence[Row]]) -> list[Summary]:
    """Per model (in order of first appearance): mean, sample std, min and max across runs.

    The difference to baseline is summarised over the runs that have one; None when no run has.
    """
    names = list(dict.fromkeys(r.model for rows in runs for r in rows))
    out = []
    for name in names:
        mine = [r for rows in runs for r in rows if r.model == name]
        deltas = [r.delta for r in mine if r.delta is not None]
        out.append(Summary(model=name, runs=len(mine), accuracy=_spread([r.accuracy for r in mine]),
                           delta=_spread(deltas) if deltas else None))
    return out
