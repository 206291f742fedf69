"""`kd cache info | verify | ls | probe`: inspect teacher caches from the command line, and measure causal-LM codecs
before writing one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from cache_format import cache_info, human_bytes, list_caches, verify_cache
from cache_format import CacheError, KDError


def _kd_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print project errors as one line (`error: ...`) with exit status 1 instead of a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except KDError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group("cache")
def cache() -> None:
    """Inspect teacher-output caches.

    PATH and ROOT may be URLs of an object store (s3://bucket/prefix, gs://..., memory://...); credentials come
    from the filesystem library's usual environment and config (for s3: AWS_* variables, ~/.aws).
    """


@cache.command("info")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--deep", is_flag=True,
              help="Causal-LM caches: also read every row for the mean teacher mass outside the cached ids.")
@_kd_errors
def info_cmd(path: str, as_json: bool, deep: bool) -> None:
    """Teacher, data, example count, fields and sizes of the cache at PATH (a folder or URL).

    For a causal-LM cache also its codec, capture temperature, k or samples, and bytes per token; with --deep
    the mean teacher mass outside the cached ids, i.e. what the codec leaves out.
    """
    info = cache_info(path)
    lm = None
    if isinstance(info["settings"].get("lm"), dict):
        from stages.teacher import lm_cache_info  # torch: only for a causal-LM cache

        lm = lm_cache_info(path, deep=deep)
    if as_json:
        click.echo(json.dumps({**info, "lm": lm} if lm is not None else info, indent=2))
        return
    click.echo(f"cache      {info['path']}")
    click.echo(f"format     v{info['format_version']}, {info['shard_format']} shards (written by kd-pipeline "
               f"{info['library_version']}, "
               f"{info['created']})")
    click.echo(f"teacher    {info['teacher_fingerprint']}")
    click.echo(f"data       {info['data_fingerprint']}")
    click.echo(f"examples   {info['count']} in {info['shards']} shards, {human_bytes(info['bytes_on_disk'])} on disk")
    click.echo(f"size       {human_bytes(info['bytes_on_disk'] / max(info['count'], 1))} per example on disk")
    if info["bytes_per_token"] is not None:
        # Every field stored once per position of the ragged axis (tokens; words for token classification).
        click.echo(f"per token  {info['bytes_per_token']} bytes in the per-token fields, {info['tokens']} tokens")
    click.echo(f"settings   {json.dumps(info['settings'], sort_keys=True)}")
    click.echo("fields")
    for f in info["fields"]:
        shape = "(" + ", ".join(str(d) for d in f["shape"]) + ("," if len(f["shape"]) == 1 else "") + ")"
        click.echo(f"  {f['name']:<20} {f['dtype']:<9} {shape:<16} {f['codec']:<6} "
                   f"{human_bytes(f['bytes_per_example'])}/example")
    if lm is not None:
        _echo_lm(lm)
    elif deep:
        click.echo("(--deep reads causal-LM caches only: nothing more to show for this one)", err=True)


def _echo_lm(lm: dict[str, Any]) -> None:
    """The causal-LM lines of `kd cache info`."""
    options = {"k": "k {}", "samples": "{} samples", "proposal_temperature": "proposal temperature {:g}",
               "seed": "seed {}"}
    said = [fmt.format(lm[key]) for key, fmt in options.items() if key in lm]
    click.echo(f"lm codec   {', '.join([lm['codec'], *said])}, capture temperature {lm['temperature']:g}")
    codec = [f for f in lm["per_token_fields"] if f["codec"]]
    rest = [f for f in lm["per_token_fields"] if not f["codec"]]
    parts = ", ".join(f"{f['name']} {f['dtype']} x{f['width']} = {f['bytes']}" for f in codec)
    others = f" + {sum(f['bytes'] for f in rest)} B in {', '.join(f['name'] for f in rest)}" if rest else ""
    click.echo(f"lm bytes   {lm['codec_bytes_per_token']} B/token in the codec's fields ({parts}){others} = "
               f"{lm['bytes_per_token']} B/token")
    if "tail_mass" in lm:
        if lm["tail_mass"] is None:
            click.echo("lm tail    no tokens cached")
            return
        distinct = f"; {lm['distinct_ids']:.2f} distinct ids cached per token" if "distinct_ids" in lm else ""
        click.echo(f"lm tail    {lm['tail_mass']:.6f}: mean teacher mass per token outside the cached ids, over "
                   f"{lm['tokens']:,} tokens{distinct}")


@cache.command("verify")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--deep", is_flag=True,
              help="Also hash the teacher's files in full and compare them with the cache's teacher fingerprint "
                   "(catches a change that kept file sizes and mtimes; reads every weight file).")
@click.option("--teacher", metavar="PATH",
              help="Teacher for --deep (folder, hub name or bundled:...); default: the folder(s) recorded for the "
                   "cache's teacher in .teachers/ next to the cache.")
@_kd_errors
def verify_cmd(path: str, deep: bool, teacher: str | None) -> None:
    """Check every shard hash, the manifest against the shards, unique ids and finite values.

    On a URL every shard is downloaded to a temporary file, checked there and deleted.

    Without --deep the teacher is not read (distill matches it by path and file sizes and mtimes); --deep
    hashes its files in full, which also catches a change that kept them.
    """
    if teacher and not deep:
        raise click.UsageError("--teacher is only used with --deep")
    report = verify_cache(path)
    problems = list(report.problems)
    if deep:
        from stages.teacher import verify_cache_teacher  # torch and transformers: only for --deep

        try:
            problems += verify_cache_teacher(path, teacher)
        except CacheError:  # no readable manifest: that is already the report's problem
            if report.ok:
                raise
    if not problems:
        what = ", teacher matches" if deep else ""
        click.echo(f"OK {report.path}: {report.count} examples in {report.shards} shards, all hashes match{what}")
        return
    click.echo(f"FAILED {report.path}: {len(problems)} problem(s)", err=True)
    for problem in problems:
        click.echo(f"  {problem}", err=True)
    raise SystemExit(1)


@cache.command("ls")
@click.argument("root", type=click.Path(file_okay=False), default=".")
@_kd_errors
def ls_cmd(root: str) -> None:
    """List the caches under ROOT (a folder or URL; default: the current folder)."""
    caches = list_caches(root)
    if not caches:
        click.echo(f"no caches under {root}")
        return
    for c in caches:
        teacher = (c["teacher"] or "?")[:16]
        data = (c["data"] or "?")[:16]
        count = "?" if c["count"] is None else c["count"]
        click.echo(f"{c['status']:<10} {human_bytes(c['bytes']):>10} {count!s:>9} ex  teacher {teacher:<16} "
                   f"data {data:<16} {c['path']}")


def _ints(value: str | None, option: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers, e.g. 8,16,32",
                                 param_hint=option) from None


@cache.command("probe")
@click.option("--params", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Params file (the one dvc.yaml uses).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. --set precompute.lm.temperature=2 (repeatable).")
@click.option("--blocks", default=8, show_default=True, type=click.IntRange(min=1),
              help="Blocks of the data to run the teacher on (spread evenly over the split).")
@click.option("--k", "ks", metavar="K,K,...", help="Candidate top-k sizes [default: 4,8,...,256 up to the vocabulary].")
@click.option("--samples", metavar="N,N,...", help="Candidate sampled-codec sizes [default: 4,8,12,16,32,64].")
@click.option("--draws", default=4, show_default=True, type=click.IntRange(min=2),
              help="Seeded encodings per candidate n, for the spread of the sampled estimate.")
@click.option("--budget", type=click.FloatRange(min=0, min_open=True), metavar="BYTES",
              help="Bytes per token to recommend k and n for [default: a top-k cache at precompute.lm.k].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the tables.")
@_kd_errors
def probe_cmd(params: str, overrides: tuple[str, ...], blocks: int, ks: str | None, samples: str | None,
              draws: int, budget: float | None, as_json: bool) -> None:
    """Measure what top-k and sampled LM caches keep of the teacher before writing one.

    Runs precompute.teachers[0] once over a few blocks of data.<precompute.split> (precompute.max_length,
    precompute.lm) and prints, per candidate k: bytes per token, the mean teacher mass outside the top k, and the
    KL gap KL(p || top k + the rest spread evenly) in nats per token; per candidate n: bytes per token, the distinct
    ids and the mass outside them, and the relative standard deviation of the sampled forward-KL estimate (student:
    the teacher at temperature 2). Recommends the best k and n within --budget bytes per token. Writes nothing.
    """
    from stages.config import load_config
    from stages.teacher import probe_codecs  # torch and transformers: only for this command

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(params, overrides)
    res = probe_codecs(cfg, blocks=blocks, ks=_ints(ks, "--k"), samples=_ints(samples, "--samples"), draws=draws,
                       budget=budget)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"teacher {res['teacher']} (vocabulary {res['vocab_size']:,}), {res['blocks']} blocks of "
               f"data.{res['split']}, {res['tokens']:,} tokens, capture temperature {res['temperature']:g}")
    click.echo("\ntop-k: tail = mean teacher mass outside the k ids; KL gap = KL(p || the k ids + the rest spread "
               "evenly), nats/token")
    click.echo(f"{'k':>7} {'B/token':>8} {'tail':>10} {'KL gap':>10}")
    for row in res["topk"]:
        click.echo(f"{row['k']:>7} {row['bytes_per_token']:>8} {row['tail_mass']:>10.5f} {row['kl_gap']:>10.5f}")
    click.echo(f"\nsampled (proposal temperature {res['proposal_temperature']:g}): rel. std = std of the per-token "
               f"forward-KL estimate over {res['draws']} draws / the exact KL {res['reference_kl']:.4f} "
               "(student: the teacher at temperature 2)")
    click.echo(f"{'n':>7} {'B/token':>8} {'distinct':>9} {'tail':>10} {'rel. std':>9}")
    for row in res["sampled"]:
        rel = "-" if row["rel_std"] is None else f"{row['rel_std']:.3f}"
        click.echo(f"{row['samples']:>7} {row['bytes_per_token']:>8} {row['distinct_ids']:>9.2f} "
                   f"{row['tail_mass']:>10.5f} {rel:>9}")
    rec = res["recommended"]
    click.echo(f"\nwithin {rec['budget']:g} B/token (codec fields; every LM cache adds 12 B/token of input_ids and "
               f"char_offsets): k {rec['k'] if rec['k'] is not None else 'none fits'}, "
               f"samples {rec['samples'] if rec['samples'] is not None else 'none fits'}")
