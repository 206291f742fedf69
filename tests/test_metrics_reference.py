"""Metrics and the multi-teacher target against independent references (scikit-learn, direct formulas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score

from stages.losses.schedules import combine_teachers
from stages.tasks.sequence_classification import accuracy_and_macro_f1
from stages.tasks.token_classification import _macro_f1

_labels = st.integers(1, 60).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 5), min_size=n, max_size=n),
                        st.lists(st.integers(0, 5), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(_labels)
def test_accuracy_and_macro_f1_equal_scikit_learn(pair):
    gold, pred = map(np.array, pair)
    classes = np.union1d(gold, pred)  # ours averages over the classes that occur in either
    acc, macro = accuracy_and_macro_f1(gold, pred)
    assert acc == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert macro == pytest.approx(f1_score(gold, pred, labels=classes, average="macro", zero_division=0), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(_labels, st.lists(st.integers(0, 59), max_size=10))
def test_token_macro_f1_equals_scikit_learn_with_truncated_words_wrong(pair, truncated):
    gold, pred = map(np.array, pair)
    pred[[i for i in truncated if i < len(pred)]] = -1  # a word cut off by max_length: no prediction, wrong
    classes = np.union1d(gold, pred[pred >= 0])
    expected = f1_score(gold, pred, labels=classes, average="macro", zero_division=0)
    assert _macro_f1(gold, pred) == pytest.approx(expected, abs=1e-12)


def _two_teachers() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_probability_combination_is_the_weighted_mixture(temperature):
    z1, z2 = _two_teachers()
    out = combine_teachers([z1, z2], [0.7, 0.3], mode="probs", temperature=temperature)
    mixture = 0.7 * torch.softmax(z1 / temperature, -1) + 0.3 * torch.softmax(z2 / temperature, -1)
    torch.testing.assert_close(torch.softmax(out / temperature, -1), mixture, rtol=0, atol=1e-12)


def test_logit_combination_is_the_weighted_mean_and_weights_are_normalised():
    z1, z2 = _two_teachers()
    torch.testing.assert_close(combine_teachers([z1, z2], [0.7, 0.3]), 0.7 * z1 + 0.3 * z2, rtol=0, atol=1e-12)
    torch.testing.assert_close(combine_teachers([z1, z2], [7, 3]), 0.7 * z1 + 0.3 * z2, rtol=0, atol=1e-12)


_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _chunks(tags: list[str], sentence: int) -> set[tuple[int, int, int, str]]:
    """Entity spans by conlleval's rules, written out: a chunk starts at B-X, or at I-X after O or another type."""
    spans, start, kind = set(), None, None
    for i, t in enumerate([*tags, "O"]):
        if start is not None and (t == "O" or t.startswith("B-") or t[2:] != kind):
            spans.add((sentence, start, i, kind))
            start = kind = None
        if t != "O" and start is None:
            start, kind = i, t[2:]
    return spans


_sentences = st.lists(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 4), min_size=n, max_size=n), st.lists(st.integers(0, 4), min_size=n, max_size=n),
    st.integers(0, n))), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(_sentences)
def test_entity_f1_through_the_label_mapping_equals_conlleval_spans(sentences):
    from types import SimpleNamespace

    from stages.config import config_from_dict
    from stages.tasks import get_task

    task = get_task(config_from_dict({"data": {"task": "token_classification", "num_labels": 5,
                                               "label_names": _TAGS}}).data)
    gold = [np.array(g) for g, _, _ in sentences]
    # the last `cut` words of a sentence were truncated away: no prediction, scored as O
    preds = [np.array(p[:len(p) - cut]) for _, p, cut in sentences]
    m = task.score(SimpleNamespace(extras={"tags": gold}), preds)
    want = set().union(*(_chunks([_TAGS[i] for i in g], s) for s, g in enumerate(gold)))
    got = set().union(*(_chunks([_TAGS[i] for i in p] + ["O"] * (len(g) - len(p)), s)
                        for s, (g, p) in enumerate(zip(gold, preds))))
    hit = len(want & got)
    precision = hit / len(got) if got else 0.0
    recall = hit / len(want) if want else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((precision, recall, f1), abs=1e-12)
    assert m.get("truncated_words", 0.0) == sum(cut for _, _, cut in sentences)
