"""Small helpers every stage shares: the one progress-bar policy."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(*, total: int, initial: int, desc: str, unit: str) -> tqdm:
    """A tqdm bar; off with KD_PROGRESS=0, and redrawn at most every 30 s when stderr is a log file."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.1 if tty else 30,
                disable=os.environ.get("KD_PROGRESS", "1") == "0")
