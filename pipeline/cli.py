"""The `kd` command: one subcommand per stage, each a thin shell over the stage's Python function."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable

import click
import yaml

from cache_format import KDError
from stages.config import BUNDLED_TEACHER, Config, config_to_dict, load_config

__all__ = ["main", "cli"]


def _common(f: Callable) -> Callable:
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a setting, e.g. --set distill.epochs=2 (repeatable).")(f)
    return click.option("--params", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
                        help="Params file (the one dvc.yaml uses).")(f)


def _run(section: str | None, params: str, overrides: tuple[str, ...], fn: Callable[[Config], object]) -> object:
    """Parse config, log the resolved section, run the stage, turn user errors into one line. Each stage function
    checks its data and names string labels itself (`stages.tasks.checked`), so Python callers get the same."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun started several processes
    if launched and section not in _TORCHRUN_STAGES:
        name = (section or "this command").replace("_", "-")
        raise click.ClickException(f"kd {name} runs as one process; start it without torchrun (under torchrun: "
                                   f"kd {' and kd '.join(_TORCHRUN_STAGES)})")
    try:
        cfg = load_config(params, overrides)
        if section and os.environ.get("RANK", "0") == "0":  # one copy of the settings under torchrun
            click.echo(f"# {section} settings\n" + yaml.safe_dump({section: config_to_dict(getattr(cfg, section))},
                                                                 sort_keys=False).rstrip(), err=True)
        t0 = time.perf_counter()
        out = fn(cfg)
        click.echo(f"done in {time.perf_counter() - t0:.1f} s", err=True)
        return out
    except KDError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if launched:
            from stages.train import dist  # imported here: it imports torch, which most commands never need

            dist.destroy()


_TORCHRUN_STAGES = ("precompute", "distill")  # the stages that run as several processes under torchrun


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """kd-pipeline: precompute teacher outputs once, distill many students from the cache."""


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--params", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="The params file to write.")
@click.option("--force", is_flag=True, help="Replace an existing params file.")
@click.option("--teacher", default=BUNDLED_TEACHER, show_default=True,
              help="Teacher model (path or hub name): its tokenizer measures the texts for max_length.")
@click.option("--text-field", default=None, metavar="COLUMN", help="The text column (default: found by name).")
@click.option("--text-pair-field", default=None, metavar="COLUMN", help="The second text of sentence pairs.")
@click.option("--label-field", default=None, metavar="COLUMN",
              help="The label column (the tag lists for token classification; default: found by name).")
@click.option("--label-delimiter", default=None, metavar="TEXT",
              help="Multi-label strings: labels joined by TEXT, e.g. '|'.")
@click.option("--task", default=None, metavar="KIND", help="Task kind, when the label column's shape does not say it "
              "(e.g. regression on integer scores).")
@click.option("--unlabelled", default=None, type=click.Path(exists=True, dir_okay=True), metavar="FILE",
              help="Your unlabelled texts (same text column): the transfer set's source.")
@click.option("--no-transfer", is_flag=True, help="Write no transfer set.")
@click.option("--out-dir", default="data", show_default=True, help="Folder kd prepare writes (splits, transfer set).")
def init(files: tuple[str, ...], params: str, force: bool, teacher: str, text_field: str | None,
         text_pair_field: str | None, label_field: str | None, label_delimiter: str | None, task: str | None,
         unlabelled: str | None, no_transfer: bool, out_dir: str) -> None:
    """Write a params file for your data: FILE to split, or TRAIN TEST, or TRAIN DEV TEST.

    Finds the text and label columns, the task kind, string label names and num_labels; sets max_length from the
    teacher's tokenizer (95th percentile of the training texts' lengths); proposes a transfer set; writes nothing
    over an existing file without --force. Then prints the commands to run.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from stages.init import init as run

    try:
        res = run(list(files), params=params, force=force, teacher=teacher, text_field=text_field,
                  text_pair_field=text_pair_field, label_field=label_field, label_delimiter=label_delimiter,
                  task=task, unlabelled=unlabelled, transfer=not no_transfer, out_dir=out_dir)
    except KDError as e:
        raise click.ClickException(str(e)) from None
    columns = ("word and tag lists" if res.text_field is None
               else f"text {res.text_field!r}" + (f" + {res.text_pair_field!r}" if res.text_pair_field else "")
               + f", label {res.label_field!r}")
    labels = (f"{res.num_labels} labels ({', '.join(res.label_names)})" if res.label_names
              else f"{res.num_labels} class ids" if res.num_labels else "numeric targets")
    click.echo(f"wrote {res.params}: {res.task}, {columns}: {labels}")
    if res.split:
        click.echo("split by kd prepare: " + ", ".join(f"{s} {n}" for s, n in res.split.items()))
    click.echo(f"max_length {res.max_length} (95% of the training texts fit in {res.length_p95} tokens)")
    if res.transfer_source:
        click.echo(f"transfer set: {res.transfer_examples:,} sentences from {res.transfer_source}")
    for note in res.notes:
        click.echo(f"note: {note}")
    click.echo("next:\n" + "\n".join(f"  {c}" for c in res.commands))


@cli.command()
@_common
def prepare(params: str, overrides: tuple[str, ...]) -> None:
    """Split the source data into train/dev/test (seeded, stratified, recorded in split.json), build the transfer
    set prepare.transfer_source names (none when it is null), and check every data file the params name."""
    from stages.prepare import prepare as run

    paths = _run("prepare", params, overrides, run)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


@cli.command()
@_common
def augment(params: str, overrides: tuple[str, ...]) -> None:
    """Write augmented views of augment.input to augment.output (off until an operation is set).

    \b
    Operations (--set augment.ops.OP.KEY=VALUE; each one named turns it on, =null turns it off):
      mask.p, mask.token     each word, with probability p, becomes token ([MASK], or
                             tokenizer:<model folder> for that tokenizer's mask token)
      delete.p               each word, with probability p, is dropped
      ngram.min_n, max_n     keep a random run of n consecutive words, n in [min_n, max_n]
      shuffle.window         local shuffle: each word moves fewer than window places
      pos.p                  each word, with probability p, becomes another word seen with its tag
                             (token_classification data only)
    Other settings: augment.views (per example and operation), augment.seed, augment.include_input
    (write the input's examples first). Text views form a data.transfer set: --set data.transfer=<output>.
    """
    from stages.augment import augment as run

    res = _run("augment", params, overrides, run)
    per_op = ", ".join(f"{op} {n}" for op, n in res.views.items()) or "augmentation is off: set augment.ops"
    first = f"; {res.included_input} input examples first" if res.included_input else ""
    click.echo(f"{sum(res.views.values())} views of {res.examples} examples ({per_op}; {res.duplicates} dropped "
               f"as repeats{first}) written to {res.output}")


_resume = click.option("--resume", is_flag=True, help="Continue from the last checkpoint (same as --set <stage>.resume=true).")


@cli.command("train-teacher")
@_common
@_resume
def train_teacher(params: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Fine-tune the teacher on labelled data and save it with save_pretrained.

    Evaluation settings (--set train_teacher.KEY=VALUE): eval_every (dev evaluation every N steps; 0: each epoch),
    keep_best (save the best model by a dev metric, e.g. accuracy or min:loss), snapshots (keep
    <output>/snapshots/gs<step> at each evaluation), callbacks (package.module:function list, called as
    fn(step=, metrics=, model=) after each evaluation).
    """
    from stages.train_teacher import train_teacher as run

    for res in _run("train_teacher", params, overrides + (("train_teacher.resume=true",) if resume else ()), run):
        click.echo(f"teacher saved to {res.output}; dev {res.fit.dev_summary()}")


@cli.command()
@_common
def precompute(params: str, overrides: tuple[str, ...]) -> None:
    """Run each teacher once over the split and write its outputs to a cache.

    precompute.format: arrow (default, memory-mapped) or zarr (Zarr v3, compressed shards).
    Under `torchrun --nproc-per-node N` each process runs the teacher over every N-th example; rank 0 writes
    the manifest once all have committed (README "Many processes (torchrun)").
    """
    from stages.precompute import precompute as run

    for r in _run("precompute", params, overrides, run):
        rate = f", {r.written / r.seconds:.0f} examples/s" if r.seconds > 0 else ""
        click.echo(f"{r.teacher}: {r.status}: {r.path} ({r.examples} examples, {r.written} written{rate})")


@cli.command()
@_common
@_resume
def distill(params: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Train a student from cached (or live) teacher outputs.

    With distill.method=theseus (and distill.teacher_signal=online): BERT-of-Theseus module replacing, set by
    distill.theseus.groups, replace_prob, curriculum (constant or linear), curriculum_k and successor_epochs.

    Evaluation settings (--set distill.KEY=VALUE): eval_every (dev evaluation every N steps; 0: each epoch),
    keep_best (save the best model by a dev metric, e.g. accuracy or min:loss), snapshots (keep
    <output>/snapshots/gs<step> at each evaluation), callbacks (package.module:function list, called as
    fn(step=, metrics=, model=) after each evaluation).

    Intermediate matches: distill.matches (a list of {kind, teacher_layer, student_layer, weight, projection,
    projection_lr}; projection_lr trains that projection at its own learning rate; TextBrewer's gram and nst
    are aliases of fsp and mmd) and distill.match_preset (TextBrewer's presets, joined with +, e.g.
    small_hidden_mse+L3_attention_ce_mean; README "Distillation methods" lists them).

    With --set distill.method=fastbert: FastBERT instead. Branch classifiers (distill.fastbert.branch_width,
    branch_heads) after every block of a fine-tuned backbone (distill.fastbert.backbone; default: the first
    teacher) learn from its final classifier; the saved folder exits early in `kd evaluate`.
    Any torch.nn.Module as the student: distill.student.module (package.module:Class, e.g.
    stages.models.module_student:BiLSTMClassifier) with distill.student.module_kwargs, in place of
    from_teacher/pretrained/config: --set 'distill.student={"module": "stages.models.module_student:BiLSTMClassifier"}'.

    Under `torchrun --nproc-per-node N`: DistributedDataParallel, each process on every N-th row of each
    distill.batch_size batch (the same optimizer steps as one process); rank 0 writes every output.
    """
    from stages.distill import distill as run

    res = _run("distill", params, overrides + (("distill.resume=true",) if resume else ()), run)
    click.echo(f"student saved to {res.output}; dev {res.fit.dev_summary()}")


@cli.command()
@_common
def evaluate(params: str, overrides: tuple[str, ...]) -> None:
    """The task's metrics, parameters and inference speed of saved models, side by side.

    Writes evaluate.output and each model's prediction per example to evaluate.predictions (for `kd report`).
    A FastBERT model is also measured at each of evaluate.fastbert_speeds (accuracy, average blocks run,
    examples/s); the curve of all the models goes to evaluate.fastbert_curve (CSV) and a PNG next to it.
    """
    from stages.evaluate import evaluate as run

    click.echo(json.dumps(_run("evaluate", params, overrides, run), indent=2))


@cli.command()
@_common
@click.option("--run", "runs", multiple=True, metavar="DIR | EVAL,PRED",
              help="A `kd evaluate` run to report: a folder holding evaluate.json and (optionally) "
                   "predictions.json, or the two file paths joined by a comma. Repeat for several runs "
                   "(e.g. one per seed) to add mean, std and min-max across them. Default: the files "
                   "named by evaluate.output and evaluate.predictions in the params.")
@click.option("--baseline", default=None, metavar="NAME",
              help="Model every other model is compared with  [default: baseline, the labels-only student].")
def report(params: str, overrides: tuple[str, ...], runs: tuple[str, ...], baseline: str | None) -> None:
    """Did distillation help? The `kd evaluate` results as a table, each model against the baseline.

    Per model: accuracy, macro-F1, size, speed and, on the same test examples as the baseline, the accuracy
    difference, its paired bootstrap 95% interval and McNemar's exact p-value. Runs nothing.

    \b
    Several seeds: evaluate each into its own folder, then report them together:
      kd evaluate --set evaluate.models.student=models/s1 --set evaluate.models.baseline=models/b1 \\
                  --set evaluate.output=metrics/seed1/evaluate.json \\
                  --set evaluate.predictions=metrics/seed1/predictions.json
      kd report --run metrics/seed1 --run metrics/seed2 --run metrics/seed3
    """
    from stages.report import (
        ReportError,
        load_predictions,
        load_results,
        report_rows,
        summarize_runs,
    )

    name = baseline or "baseline"
    try:
        if runs:
            files = [_run_files(r) for r in runs]
        else:
            cfg = load_config(params, overrides)
            files = [(cfg.evaluate.output, cfg.evaluate.predictions, False)]
        loaded = []
        for metrics, preds_path, required in files:
            results = load_results(metrics)
            if baseline is not None and baseline not in results:
                raise ReportError(f"--baseline {baseline}: no such model in {metrics}; "
                                  f"models there: {', '.join(results)}")
            exists = os.path.exists(preds_path)
            if required and not exists:
                raise ReportError(f"--run: {preds_path} does not exist; give an existing predictions file")
            preds = load_predictions(preds_path) if exists else None
            loaded.append((metrics, preds_path, preds, report_rows(results, preds, name, source=preds_path)))
    except KDError as e:
        raise click.ClickException(str(e)) from None

    for i, (metrics, preds_path, preds, rows) in enumerate(loaded):
        if len(loaded) > 1:
            click.echo(("\n" if i else "") + f"### run {i + 1}: {metrics}\n")
        _echo_rows(rows, name, metrics, preds_path, preds)
    if len(loaded) > 1:
        _echo_summary(summarize_runs([rows for *_, rows in loaded]), name, len(loaded))
        id_sets = {frozenset(p.ids) for *_, p, _ in loaded if p is not None}
        if len(id_sets) > 1:
            click.echo("\nnote: the runs scored different examples (their ids differ), so the spread mixes "
                       "test-set and seed variation.")


def _run_files(spec: str) -> tuple[str, str, bool]:
    """(metrics path, predictions path, predictions required) of one --run value."""
    if "," in spec:
        metrics, _, preds = spec.partition(",")
        return metrics.strip(), preds.strip(), True
    if not os.path.isdir(spec):
        raise click.ClickException(f"--run {spec}: not a folder; give a folder holding evaluate.json and "
                                   "predictions.json, or EVAL.json,PREDICTIONS.json")
    return os.path.join(spec, "evaluate.json"), os.path.join(spec, "predictions.json"), False


def _signed(x: float) -> str:
    return f"{round(x, 4) + 0.0:+.4f}"  # + 0.0 turns -0.0 (a bootstrap bound of -1e-17) into +0.0000


def _echo_rows(rows: list, baseline: str, metrics: str, preds_path: str, preds) -> None:
    """One run's markdown table; the comparison columns only when the baseline model is in the run."""
    from stages.report import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    paired = any(r.delta is not None for r in rows)
    head = "| model | accuracy | macro-F1 | parameters | examples/s |"
    rule = "|---|---:|---:|---:|---:|"
    if paired:
        head += f" Δ acc vs {baseline} | 95% CI | McNemar p |"
        rule += "---:|---:|---:|"
    click.echo(head + "\n" + rule)
    for r in rows:
        line = (f"| {r.model} | {r.accuracy:.4f} | {r.macro_f1:.4f} | {r.parameters / 1e6:.1f}M "
                f"| {r.examples_per_second:.0f} |")
        if r.is_baseline:
            line += " (reference) | | |"
        elif paired:
            ci = f"[{_signed(r.ci[0])}, {_signed(r.ci[1])}]" if r.ci else "—"
            p = "—" if r.p_value is None else f"{r.p_value:.4f}" if r.p_value >= 1e-4 else f"{r.p_value:.1e}"
            line += f" {_signed(r.delta)} | {ci} | {p} |"
        click.echo(line)
    if not paired:
        click.echo(f"\nnote: no model named {baseline!r} in {metrics}, so nothing to compare with; "
                   "pass --baseline NAME to compare with another model.")
    elif preds is None:
        click.echo(f"\nnote: {preds_path} not found (a run from before it existed); rerun `kd evaluate` "
                   "for the 95% CI and McNemar p.")
    else:
        click.echo(f"\nPaired on the same {len(preds.ids)} examples ({preds.split} split, {preds.data}): "
                   f"Δ = model - {baseline} accuracy; 95% CI: paired bootstrap ({BOOTSTRAP_RESAMPLES:,} "
                   f"resamples, seed {BOOTSTRAP_SEED}); McNemar p: exact two-sided test on the examples "
                   "exactly one of the two got right.")


def _spread_cells(s: tuple[float, float, float, float], fmt: Callable[[float], str]) -> tuple[str, str]:
    """('mean ± std', 'min – max') of a (mean, std, min, max) tuple; std is nan for a single run."""
    mean, std, lo, hi = s
    sd = "—" if math.isnan(std) else f"{std:.4f}"
    return f"{fmt(mean)} ± {sd}", f"{fmt(lo)} – {fmt(hi)}"


def _echo_summary(summaries: list, baseline: str, n_runs: int) -> None:
    """The across-runs table: mean ± sample std and min-max of accuracy and of the difference to baseline."""
    click.echo(f"\n### across {n_runs} runs (mean ± sample std, min – max)\n")
    click.echo(f"| model | runs | accuracy | accuracy range | Δ acc vs {baseline} | Δ range |\n"
               "|---|---:|---:|---:|---:|---:|")
    for s in summaries:
        acc, acc_range = _spread_cells(s.accuracy, "{:.4f}".format)
        if s.model == baseline:
            delta, delta_range = "(reference)", ""
        elif s.delta is None:
            delta, delta_range = "—", "—"
        else:
            delta, delta_range = _spread_cells(s.delta, _signed)
        click.echo(f"| {s.model} | {s.runs} | {acc} | {acc_range} | {delta} | {delta_range} |")


def _add_cache_group() -> None:
    from pipeline.cache_cli import cache

    cli.add_command(cache)


_add_cache_group()


def main() -> None:
    cli(prog_name="kd")


if __name__ == "__main__":
    sys.exit(main())
