"""The `kd` command: one subcommand per stage, each a thin shell over the stage's Python function."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import click
import yaml

from cache_format._errors import KDError
from stages.config import Config, config_to_dict, load_config

__all__ = ["main", "cli"]


def _common(f: Callable) -> Callable:
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a setting, e.g. --set distill.epochs=2 (repeatable).")(f)
    return click.option("--params", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
                        help="Params file (the one dvc.yaml uses).")(f)


def _run(section: str | None, params: str, overrides: tuple[str, ...], fn: Callable[[Config], object]) -> object:
    """Parse config, log the resolved section, run the stage, turn user errors into one line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(params, overrides)
        if section:
            click.echo(f"# {section} settings\n" + yaml.safe_dump({section: config_to_dict(getattr(cfg, section))},
                                                                 sort_keys=False).rstrip(), err=True)
        t0 = time.perf_counter()
        out = fn(cfg)
        click.echo(f"done in {time.perf_counter() - t0:.1f} s", err=True)
        return out
    except KDError as e:
        raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """kd-pipeline: precompute teacher outputs once, distill many students from the cache."""


@cli.command()
@_common
def prepare(params: str, overrides: tuple[str, ...]) -> None:
    """Split the source data into train/dev/test (seeded, stratified, recorded in split.json)."""
    from stages.prepare import prepare as run

    paths = _run("prepare", params, overrides, run)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


_resume = click.option("--resume", is_flag=True, help="Continue from the last checkpoint (same as --set <stage>.resume=true).")


@cli.command("train-teacher")
@_common
@_resume
def train_teacher(params: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Fine-tune the teacher on labelled data and save it with save_pretrained."""
    from stages.train_teacher import train_teacher as run

    res = _run("train_teacher", params, overrides + (("train_teacher.resume=true",) if resume else ()), run)
    click.echo(f"teacher saved to {res.output}; dev accuracy {res.fit.dev_accuracy}")


@cli.command()
@_common
def precompute(params: str, overrides: tuple[str, ...]) -> None:
    """Run each teacher once over the split and write its outputs to a cache."""
    from stages.precompute import precompute as run

    for r in _run("precompute", params, overrides, run):
        rate = f", {r.written / r.seconds:.0f} examples/s" if r.seconds > 0 else ""
        click.echo(f"{r.teacher}: {r.status}: {r.path} ({r.examples} examples, {r.written} written{rate})")


@cli.command()
@_common
@_resume
def distill(params: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Train a student from cached (or live) teacher outputs."""
    from stages.distill import distill as run

    res = _run("distill", params, overrides + (("distill.resume=true",) if resume else ()), run)
    click.echo(f"student saved to {res.output}; dev accuracy {res.fit.dev_accuracy}")


@cli.command()
@_common
def evaluate(params: str, overrides: tuple[str, ...]) -> None:
    """Accuracy, macro-F1, parameters and inference speed of saved models, side by side."""
    from stages.evaluate import evaluate as run

    click.echo(json.dumps(_run("evaluate", params, overrides, run), indent=2))


@cli.command()
@_common
def report(params: str, overrides: tuple[str, ...]) -> None:
    """Print the last `kd evaluate` results as a table (reads evaluate.output; runs nothing)."""
    try:
        cfg = load_config(params, overrides)
    except KDError as e:
        raise click.ClickException(str(e)) from None
    path = cfg.evaluate.output
    try:
        results = json.loads(open(path).read())
    except FileNotFoundError:
        raise click.ClickException(f"{path} does not exist; run `kd evaluate` (or `dvc repro`) first") from None
    click.echo("| model | accuracy | macro-F1 | parameters | examples/s |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        click.echo(f"| {name} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['parameters'] / 1e6:.1f}M "
                   f"| {r['examples_per_second']:.0f} |")


def _add_cache_group() -> None:
    from pipeline.cache_cli import cache

    cli.add_command(cache)


_add_cache_group()


def main() -> None:
    cli(prog_name="kd")


if __name__ == "__main__":
    sys.exit(main())
