"""Small helpers every stage shares: the one progress-bar policy, the check of output locations, the cache home."""

from __future__ import annotations

import os
import importlib
import sys
from pathlib import Path
from typing import Any, Literal, Mapping

from tqdm.auto import tqdm

from cache_format import KDError
from stages.config import ConfigError

__all__ = ["OutputError", "cache_home", "check_outputs", "progress_bar", "import_object", "one_line"]

OutputKind = Literal["file", "folder", "model"]


class OutputError(KDError):
    """An output location cannot be written (read-only, or a file where a folder is expected or vice versa)."""


def progress_bar(*, total: int, initial: int = 0, desc: str, unit: str, hide_below: int = 0) -> tqdm:
    """A tqdm bar; off with KD_PROGRESS=0 or for `total < hide_below` (work too short to watch), and redrawn
    at most every 30 s when stderr is a log file."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.1 if tty else 30,
                disable=os.environ.get("KD_PROGRESS", "1") == "0" or total < hide_below)


def cache_home() -> Path:
    """Folder for what kd-pipeline downloads or converts once: `$KD_CACHE_HOME`, else `$XDG_CACHE_HOME/kd-pipeline`,
    else `~/.cache/kd-pipeline`."""
    if os.environ.get("KD_CACHE_HOME"):
        return Path(os.environ["KD_CACHE_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kd-pipeline"


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _problem(path: Path, kind: OutputKind) -> str | None:
    """What stops a stage from writing `path` (None if nothing)."""
    if path.exists():
        if kind == "file" and path.is_dir():
            return f"{path} is a folder, a file is expected there"
        if kind != "file" and not path.is_dir():
            return f"{path} is a file, a folder is expected there"
        if kind != "file" and not _writable(path):
            return f"folder {path} is not writable"
        # Files are replaced atomically and models swapped in from a sibling folder: both need the parent.
        if kind != "folder" and not _writable(path.absolute().parent):
            return f"folder {path.absolute().parent} is not writable"
        return None
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {path} cannot be created under it"
    if not _writable(ancestor):
        return f"folder {ancestor} is not writable, so {path} cannot be created"
    return None


def check_outputs(outputs: Mapping[str, tuple[str | os.PathLike, OutputKind]]) -> None:
    """Check every output location before a stage does any work; raise one OutputError listing each problem.

    `outputs` maps a setting name (e.g. "distill.metrics") to (path, kind): "file" (written atomically),
    "folder" (written into) or "model" (a folder replaced as a whole). A path that does not exist yet needs
    its nearest existing ancestor to be a writable folder.
    """
    problems = [f"{key}: {msg}" for key, (path, kind) in outputs.items()
                if (msg := _problem(Path(path), kind)) is not None]
    if problems:
        raise OutputError("cannot write the outputs: " + "; ".join(problems)
                          + "; fix these settings or the permissions, then rerun")


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def import_object(path: str, setting: str, want: str) -> Any:
    """The object named by `package.module:attr` (looked up on sys.path, then in the current folder).

    A path that does not import is a one-line ConfigError naming the `setting`; `want` says what to name instead.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # `kd` is a console script: the params' folder is not on sys.path by itself
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise ConfigError(f"{setting}: {path!r} does not import ({one_line(e)}); name {want}, importable from "
                          "the current folder or PYTHONPATH") from None
    return obj
