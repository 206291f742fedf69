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
