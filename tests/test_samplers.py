"""The length-grouped sampler (`EpochSampler` with `lengths`, on by default: `distill.group_by_length`).

Properties over random data sets, batch sizes, seeds and stopping points: every row once per epoch, batches of
similar length (and how much padding that saves against random batches), and an exact mid-epoch resume.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.train import EpochSampler

GROUP_BATCHES = 50  # batches per length-sorted group (stages/train/samplers.py)


@st.composite
def data_sets(draw, max_rows: int = 400):
    """(lengths, batch_size, seed): 1-`max_rows` rows of length 1-128 (many ties: narrow ranges are drawn too)."""
    n = draw(st.integers(1, max_rows))
    low = draw(st.integers(1, 128))
    high = draw(st.integers(low, 128))
    seed = draw(st.integers(0, 2**32 - 1))
    lengths = np.random.default_rng(seed).integers(low, high + 1, n)
    return lengths, draw(st.integers(1, 40)), seed


def _epochs(sampler: EpochSampler, epochs: int) -> list[list[np.ndarray]]:
    """The batches of the next `epochs` epochs, as a training run walks them."""
    out = []
    for epoch in range(sampler.epoch, sampler.epoch + epochs):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def _padding(batches: list[np.ndarray], lengths: np.ndarray) -> int:
    """Pad tokens of `batches`: each row padded to its batch's longest."""
    return int(sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches))


@settings(max_examples=60, deadline=None)
@given(data=data_sets(), drop_last=st.booleans())
def test_every_row_once_per_epoch(data, drop_last):
    lengths, batch_size, seed = data
    n = len(lengths)
    sampler = EpochSampler(n, batch_size, seed=seed, lengths=lengths, drop_last=drop_last)
    epochs = _epochs(sampler, 2)
    for batches in epochs:
        assert len(batches) == sampler.batches_per_epoch
        rows = np.concatenate(batches) if batches else np.array([], dtype=int)
        assert len(set(rows.tolist())) == len(rows)  # no row twice
        if drop_last:
            assert len(rows) == n // batch_size * batch_size and all(len(b) == batch_size for b in batches)
        else:
            assert sorted(rows.tolist()) == list(range(n))  # none missing
            assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size


@settings(max_examples=60, deadline=None)
@given(data=data_sets(max_rows=300))
def test_batches_are_runs_of_the_length_sorted_rows(data):
    """Within one group (here: the whole epoch), the full batches cut the rows sorted by length: their length
    ranges never overlap, and the last, partial batch holds the shortest rows."""
    lengths, batch_size, seed = data
    n = len(lengths)
    if n > GROUP_BATCHES * batch_size:
        batch_size = -(-n // GROUP_BATCHES)
    [batches] = _epochs(EpochSampler(n, batch_size, seed=seed, lengths=lengths), 1)
    full = [b for b in batches if len(b) == batch_size]
    ranges = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in full)
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert hi <= lo, ranges
    if n % batch_size:
        rest = batches[-1]
        assert len(rest) == n % batch_size
        assert not full or lengths[rest].max() <= min(lengths[b].min() for b in full)


def test_length_grouping_cuts_padding_against_random_batches():
    """Short-sentence data, several groups: a fraction of the padding of the same rows in random batches, and
    the batches still come in random order of length."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.0, 0.6, 5000).astype(int), 2, 256)
    batch_size = 16
    grouped = _epochs(EpochSampler(len(lengths), batch_size, seed=1, lengths=lengths), 3)
    plain = _epochs(EpochSampler(len(lengths), batch_size, seed=1), 3)
    for g, p in zip(grouped, plain):
        assert _padding(g, lengths) < 0.1 * _padding(p, lengths)
        longest = np.array([int(lengths[b].max()) for b in g])
        # Not in length order: the batches are shuffled, so a batch is as often longer than the next as shorter
        # (in length order, 49 of each group's 50 would be at least as long as the next).
        assert 0.35 < np.mean(longest[:-1] > longest[1:]) < 0.65
        assert 0.35 < np.mean(longest[:-1] < longest[1:]) < 0.65


@settings(max_examples=80, deadline=None)
@given(data=data_sets(max_rows=200), stop=st.integers(0, 3 * 200), epochs=st.integers(1, 3),
       drop_last=st.booleans())
def test_resume_mid_epoch_gives_the_uninterrupted_order(data, stop, epochs, drop_last):
    """Stop after `stop` batches (in any epoch), save the state, resume in a new sampler: the rows handed out,
    concatenated, are those of an uninterrupted run, in its order (none missing, none twice, none moved)."""
    lengths, batch_size, seed = data
    n = len(lengths)
    args = dict(seed=seed, lengths=lengths, drop_last=drop_last)
    expected = [b.tolist() for epoch in _epochs(EpochSampler(n, batch_size, **args), epochs) for b in epoch]
    stop = min(stop, len(expected))

    run = EpochSampler(n, batch_size, **args)
    seen: list[list[int]] = []
    for epoch in range(epochs):
        if len(seen) == stop:
            break
        run.set_epoch(epoch)
        for rows in run:  # the sampler counts a batch as handed out when it yields it: stop right after one
            seen.append(rows.tolist())
            if len(seen) == stop:
                break
    state = run.state_dict()  # as saved with the checkpoint of the step that used the last batch
    resumed = EpochSampler(n, batch_size, seed=seed + 1, lengths=lengths, drop_last=drop_last)  # the saved seed wins
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    for epoch in range(resumed.epoch, epochs):
        resumed.set_epoch(epoch)
        seen += [rows.tolist() for rows in resumed]
    assert seen == expected
