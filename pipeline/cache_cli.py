"""`kd cache info | verify | ls`: inspect teacher caches from the command line."""

from __future__ import annotations

import json
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
@_kd_errors
def info_cmd(path: str, as_json: bool) -> None:
    """Teacher, data, example count, fields and sizes of the cache at PATH (a folder or URL)."""
    info = cache_info(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
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
