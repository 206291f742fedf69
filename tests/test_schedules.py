"""Weight schedules, dynamic temperatures, probability shift and multi-teacher targets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format import KDError
from stages.losses import kd_loss
from stages.losses import ScheduleError, combine_teachers, cwsm_temperature, flsw_temperature, probability_shift, weight_at


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- weights


def test_weight_schedules_values():
    assert [weight_at("constant", 2.0, s, 4) for s in (0, 2, 4)] == [2.0, 2.0, 2.0]
    assert [weight_at("linear_decay", 2.0, s, 4) for s in (0, 1, 2, 4)] == [2.0, 1.5, 1.0, 0.0]
    assert [weight_at("linear_growth", 2.0, s, 4) for s in (0, 1, 2, 4)] == [0.0, 0.5, 1.0, 2.0]
    # past the end: clamped, never negative or above base
    assert weight_at("linear_decay", 2.0, 9, 4) == 0.0
    assert weight_at("linear_growth", 2.0, 9, 4) == 2.0


def test_weight_schedule_errors():
    with pytest.raises(ScheduleError, match="valid: constant, linear_decay, linear_growth"):
        weight_at("cosine", 1.0, 0, 10)
    with pytest.raises(ScheduleError, match="total_steps"):
        weight_at("constant", 1.0, 0, 0)
    with pytest.raises(ScheduleError, match="step"):
        weight_at("constant", 1.0, -1, 10)
    assert issubclass(ScheduleError, KDError) and issubclass(ScheduleError, ValueError)


# --------------------------------------------------------------------------- temperatures


def _ref_flsw(s, t, base, beta, gamma):
    w = []
    for zs, zt in zip(s.tolist(), t.tolist()):
        dot = sum(a * b for a, b in zip(zs, zt))
        cos = dot / (math.sqrt(sum(a * a for a in zs)) * math.sqrt(sum(b * b for b in zt)))
        w.append((1 - cos) ** gamma)
    mean = sum(w) / len(w)
    return [base + (mean - x) * beta for x in w]


def _ref_cwsm(s, base, beta, eps):
    w = []
    for zs in s.tolist():
        m = max(zs)
        e = [math.exp(x - m) for x in zs]
        w.append(1 / (max(e) / sum(e) + eps))
    mean = sum(w) / len(w)
    return [base + (mean - x) * beta for x in w]


def test_flsw_matches_reference():
    s, t = _randn(6, 4, seed=1), _randn(6, 4, seed=2)
    got = flsw_temperature(s, t, 4.0, beta=1.0, gamma=2.0)
    assert got.shape == (6,)
    assert got.tolist() == pytest.approx(_ref_flsw(s, t, 4.0, 1.0, 2.0))
    # the example farthest from the teacher gets the lowest temperature
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert got.argmin() == cos.argmin()


def test_cwsm_matches_reference():
    s = _randn(6, 4, seed=3) * 2
    got = cwsm_temperature(s, _randn(6, 4, seed=4), 4.0, beta=0.5)
    assert got.tolist() == pytest.approx(_ref_cwsm(s, 4.0, 0.5, 1e-3))
    # the least confident example gets the lowest temperature
    assert got.argmin() == torch.softmax(s, -1).amax(-1).argmin()


@pytest.mark.parametrize("schedule", ["flsw", "cwsm"])
def test_dynamic_temperature_no_grad_token_level_mask_and_floor(schedule):
    def temps(s, t, base, beta, mask=None):
        if schedule == "flsw":
            return flsw_temperature(s, t, base, beta, 1.0, mask=mask)
        return cwsm_temperature(s, t, base, beta, mask=mask)

    s = _randn(2, 3, 4, seed=5).requires_grad_()
    t = _randn(2, 3, 4, seed=6)
    tau = temps(s, t, 2.0, 1.0)
    assert tau.shape == (2, 3) and not tau.requires_grad
    # masked: the batch mean uses valid tokens only, so it equals the reference on those tokens
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tau_m = temps(s, t, 2.0, 1.0, mask)
    valid = mask.bool()
    flat = temps(s[valid], t[valid], 2.0, 1.0)
    torch.testing.assert_close(tau_m[valid], flat)
    # a huge beta cannot make a temperature zero or negative
    assert (temps(s, t, 1.0, 1e6) >= 1e-2).all()
    # usable directly as a kd_loss temperature, gradient still flows to the student
    loss = kd_loss(s, t, tau_m, mask=mask)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_flsw_zero_logits_are_finite():
    tau = flsw_temperature(torch.zeros(2, 3), torch.ones(2, 3), 2.0, 1.0, 1.0)
    assert torch.isfinite(tau).all()


# --------------------------------------------------------------------------- probability shift


def _ref_shift(logits, labels, ignore_index=-100):
    out = [row[:] for row in logits]
    for row, y in zip(out, labels):
        if y == ignore_index:
            continue
        top = max(range(len(row)), key=lambda k: row[k])
        row[top], row[y] = row[y], row[top]
    return out


def test_probability_shift_matches_reference_2d():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 2.0, 9.0], [4.0, 0.0, 1.0]])
    labels = torch.tensor([2, 1, 0, -100])
    original = logits.clone()
    got = probability_shift(logits, labels)
    assert got.tolist() == _ref_shift(logits.tolist(), labels.tolist())
    torch.testing.assert_close(logits, original)  # input untouched
    torch.testing.assert_close(got[1], logits[1])  # correct teacher: unchanged
    torch.testing.assert_close(got[3], logits[3])  # ignored label: unchanged


def test_probability_shift_token_level():
    logits = _randn(2, 4, 5, seed=7)
    labels = torch.tensor([[0, 4, -100, 2], [-100, -100, 1, 3]])
    got = probability_shift(logits, labels)
    want = _ref_shift(logits.reshape(8, 5).tolist(), labels.reshape(8).tolist())
    torch.testing.assert_close(got.reshape(8, 5), torch.tensor(want, dtype=torch.float64))
    valid = labels != -100
    assert torch.equal(got.argmax(-1)[valid], labels[valid])
    with pytest.raises(ScheduleError, match="labels"):
        probability_shift(logits, labels[:, :2])


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(-50, 50, allow_nan=False), min_size=3, max_size=3, unique=True), min_size=1, max_size=5
    ),
    data=st.data(),
)
def test_probability_shift_properties(rows, data):
    logits = torch.tensor(rows, dtype=torch.float64)
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=len(rows), max_size=len(rows))))
    got = probability_shift(logits, labels)
    assert torch.equal(got.argmax(-1), labels)
    assert torch.equal(got.sort(-1).values, logits.sort(-1).values)  # only a swap: same values


# --------------------------------------------------------------------------- multi-teacher


def test_combine_teachers_logits_weighted_mean():
    a, b = _randn(3, 4, seed=8), _randn(3, 4, seed=9)
    torch.testing.assert_close(combine_teachers([a, b]), (a + b) / 2)
    torch.testing.assert_close(combine_teachers([a, b], [3.0, 1.0]), 0.75 * a + 0.25 * b)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_combine_teachers_probs_returns_logits_of_the_mean_distribution(temperature):
    a, b, c = _randn(2, 5, 4, seed=10), _randn(2, 5, 4, seed=11) * 5, _randn(2, 5, 4, seed=12)
    weights = [0.5, 0.3, 0.0]
    out = combine_teachers([a, b, c], weights, mode="probs", temperature=temperature)
    want = [[[0.0] * 4 for _ in range(5)] for _ in range(2)]
    for w, z in zip(weights, (a, b, c)):
        for i in range(2):
            for j in range(5):
                m = max(x / temperature for x in z[i, j].tolist())
                e = [math.exp(x / temperature - m) for x in z[i, j].tolist()]
                for k in range(4):
                    want[i][j][k] += w / sum(weights) * e[k] / sum(e)
    got = torch.softmax(out / temperature, dim=-1)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # Fed to kd_loss at the same temperature, the mean distribution is the target: T^2 * KL(mean || student at T),
    # averaged over the positions, for a student unlike the target ...
    s = _randn(2, 5, 4, seed=13)
    kl = []
    for i in range(2):
        for j in range(5):
            z = [x / temperature for x in s[i, j].tolist()]
            log_z = max(z) + math.log(sum(math.exp(x - max(z)) for x in z))
            kl.append(sum(p * (math.log(p) - (x - log_z)) for p, x in zip(want[i][j], z)))
    expected = temperature**2 * sum(kl) / len(kl)
    assert expected > 0.1
    assert kd_loss(s, out, temperature).item() == pytest.approx(expected, rel=1e-9)
    # ... and zero for a student whose logits are the target's own
    assert kd_loss(out.clone(), out, temperature).item() == pytest.approx(0.0, abs=1e-12)


def test_combine_teachers_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ScheduleError, match="at least one"):
        combine_teachers([])
    with pytest.raises(ScheduleError, match="shape"):
        combine_teachers([a, torch.zeros(2, 4)])
    with pytest.raises(ScheduleError, match="weights"):
        combine_teachers([a, a], [1.0])
    with pytest.raises(ScheduleError, match="weights"):
        combine_teachers([a, a], [1.0, -1.0])
    with pytest.raises(ScheduleError, match="valid: logits, probs"):
        combine_teachers([a, a], mode="max")
