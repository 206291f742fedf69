"""Split arithmetic shared by `kd prepare` and the bundled sets: fraction checks and exact largest-remainder counts."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from stages.data.examples import DataError
from stages.data.examples import DataError

__all__ = ["check_fractions", "allocate"]


def check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions or any(not re.fullmatch(r"[A-Za-z0-9_-]+", s) for s in fractions):
        raise DataError(f"split names must be non-empty words like train/dev/test (got {list(fractions)})")
    if any(f <= 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise DataError(f"split fractions must be > 0 and sum to 1 (got {dict(fractions)})")


def allocate(total: int, shares: Mapping[Any, float]) -> dict[Any, int]:
    """Split `total` by `shares` with largest-remainder rounding, so the counts add up exactly."""
    raw = {k: total * s / sum(shares.values()) for k, s in shares.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    by_remainder = sorted(shares, key=lambda k: -(raw[k] - counts[k]))  # stable: ties keep the given order
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts
