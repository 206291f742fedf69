"""Losses, matches and presets, each checked against an independent loop-based reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format import KDError
from stages import kinds
from stages.config import KDConfig, MatchConfig
from stages.losses import (
    MATCH_LOSSES,
    PRESET_NAMES,
    LossInputError,
    Match,
    MatchError,
    Projection,
    attention_ce,
    attention_mse,
    build_projections,
    check_matches,
    feature_map,
    fsp_loss,
    hard_ce_loss,
    hidden_cosine,
    hidden_mse,
    kd_loss,
    match_loss,
    mmd_loss,
    needed_teacher_layers,
    pkd_loss,
    preset_matches,
)

ATOL = 1e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (t - n) for n in lengths])


def _attn(b: int, h: int, t: int, lengths: list[int], seed: int) -> torch.Tensor:
    """Attention probabilities like HF's: padded keys get probability 0."""
    scores = _randn(b, h, t, t, seed=seed)
    key_mask = _mask(lengths, t).bool()[:, None, None, :]
    return torch.softmax(scores.masked_fill(~key_mask, float("-inf")), dim=-1)


# --------------------------------------------------------------------------- references


def _softmax_row(z: list[float], temp: float) -> list[float]:
    m = max(x / temp for x in z)
    e = [math.exp(x / temp - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def _ref_kd_row(zs: list[float], zt: list[float], temp: float, kind: str, squared: bool) -> float:
    if kind == "mse":
        val = sum((a / temp - b / temp) ** 2 for a, b in zip(zs, zt)) / len(zs)
    else:
        ps, pt = _softmax_row(zs, temp), _softmax_row(zt, temp)
        val = -sum(q * math.log(p) for p, q in zip(ps, pt))
        if kind == "kl":
            val = sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    return val * temp**2 if squared else val


def _ref_kd(student, teacher, temps, kind, squared, mask=None) -> float:
    """Loop over every position; temps is a function (b, t) -> temperature."""
    total, count = 0.0, 0
    if student.dim() == 2:
        student, teacher = student[:, None], teacher[:, None]
        mask = None if mask is None else mask[:, None]
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask is not None and not mask[b, t]:
                continue
            total += _ref_kd_row(student[b, t].tolist(), teacher[b, t].tolist(), temps(b, t), kind, squared)
            count += 1
    return total / count


# --------------------------------------------------------------------------- kd_loss


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
@pytest.mark.parametrize("squared", [True, False])
def test_kd_loss_matches_reference_scalar_temperature(kind, squared):
    s, t = _randn(5, 4, seed=1), _randn(5, 4, seed=2) * 3
    got = kd_loss(s, t, 2.5, kind=kind, temperature_squared=squared)
    want = _ref_kd(s, t, lambda b, i: 2.5, kind, squared)
    assert got.item() == pytest.approx(want, abs=ATOL)


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_kd_loss_per_example_temperature(kind):
    s, t = _randn(4, 3, seed=3), _randn(4, 3, seed=4)
    temps = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    got = kd_loss(s, t, temps, kind=kind)
    want = _ref_kd(s, t, lambda b, i: temps[b].item(), kind, True)
    assert got.item() == pytest.approx(want, abs=ATOL)


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_kd_loss_token_level_masked_with_token_temperature(kind):
    s, t = _randn(3, 5, 4, seed=5), _randn(3, 5, 4, seed=6)
    mask = _mask([5, 2, 3], 5)
    temps = 1.0 + torch.rand(3, 5, generator=_gen(7), dtype=torch.float64)
    got = kd_loss(s, t, temps, kind=kind, mask=mask)
    want = _ref_kd(s, t, lambda b, i: temps[b, i].item(), kind, True, mask)
    assert got.item() == pytest.approx(want, abs=ATOL)
    # a [B] temperature is broadcast over the tokens of each example
    temps_b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    got_b = kd_loss(s, t, temps_b, kind=kind, mask=mask)
    want_b = _ref_kd(s, t, lambda b, i: temps_b[b].item(), kind, True, mask)
    assert got_b.item() == pytest.approx(want_b, abs=ATOL)


def test_kd_ce_equals_textbrewer_formula_without_t_squared():
    s, t = _randn(6, 5, seed=8), _randn(6, 5, seed=9)
    temp = 4.0
    textbrewer = -(torch.softmax(t / temp, -1) * torch.log_softmax(s / temp, -1)).sum(-1).mean()
    assert kd_loss(s, t, temp, kind="ce", temperature_squared=False).item() == pytest.approx(textbrewer.item())
    textbrewer_mse = torch.nn.functional.mse_loss(s / temp, t / temp)
    assert kd_loss(s, t, temp, kind="mse", temperature_squared=False).item() == pytest.approx(textbrewer_mse.item())


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_kd_loss_zero_when_student_equals_teacher(kind):
    z = _randn(4, 6, 3, seed=10)
    assert kd_loss(z.clone(), z, 3.0, kind=kind).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_kl_and_ce_differ_by_teacher_entropy_and_share_gradients():
    t = _randn(4, 5, seed=12)
    s1 = _randn(4, 5, seed=11).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    kl = kd_loss(s1, t, 2.0, kind="kl")
    ce = kd_loss(s2, t, 2.0, kind="ce")
    entropy = kd_loss(t, t, 2.0, kind="ce")
    assert (ce - kl).item() == pytest.approx(entropy.item(), abs=ATOL)
    kl.backward()
    ce.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_kd_loss_ignores_padded_tokens_and_grad_flows(kind):
    s = _randn(2, 4, 3, seed=13).requires_grad_()
    t = _randn(2, 4, 3, seed=14)
    mask = _mask([4, 2], 4)
    loss = kd_loss(s, t, 2.0, kind=kind, mask=mask)
    t_changed = t.clone()
    t_changed[1, 2:] = 100.0
    assert kd_loss(s, t_changed, 2.0, kind=kind, mask=mask).item() == pytest.approx(loss.item())
    loss.backward()
    assert torch.all(s.grad[1, 2:] == 0)
    assert s.grad[0].abs().sum() > 0 and torch.isfinite(s.grad).all()


def test_kd_loss_rejects_bad_inputs():
    s = torch.zeros(2, 3)
    with pytest.raises(LossInputError, match="same shape"):
        kd_loss(s, torch.zeros(2, 4), 1.0)
    with pytest.raises(LossInputError, match="temperature"):
        kd_loss(s, s, 0.0)
    with pytest.raises(LossInputError, match="temperature"):
        kd_loss(s, s, torch.ones(3))
    with pytest.raises(LossInputError, match="kind"):
        kd_loss(s, s, 1.0, kind="js")
    with pytest.raises(LossInputError, match="mask"):
        kd_loss(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), 1.0, mask=torch.ones(2, 5))
    assert issubclass(LossInputError, KDError) and issubclass(LossInputError, ValueError)


# --------------------------------------------------------------------------- hard CE


def test_hard_ce_matches_reference_with_ignored_labels():
    logits = _randn(2, 3, 4, seed=15)
    labels = torch.tensor([[0, 3, -100], [-100, 1, 2]])
    total, n = 0.0, 0
    for b in range(2):
        for i in range(3):
            y = labels[b, i].item()
            if y == -100:
                continue
            total += -math.log(_softmax_row(logits[b, i].tolist(), 1.0)[y])
            n += 1
    assert hard_ce_loss(logits, labels).item() == pytest.approx(total / n)
    flat = _randn(4, 3, seed=16)
    y = torch.tensor([0, 2, 1, 1])
    want = sum(-math.log(_softmax_row(flat[i].tolist(), 1.0)[y[i]]) for i in range(4)) / 4
    assert hard_ce_loss(flat, y).item() == pytest.approx(want)


def test_hard_ce_all_ignored_is_zero_not_nan():
    logits = _randn(2, 3, seed=17).requires_grad_()
    loss = hard_ce_loss(logits, torch.full((2,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- hidden states


def test_hidden_mse_and_cosine_match_reference():
    s, t = _randn(3, 4, 5, seed=18), _randn(3, 4, 5, seed=19)
    mask = _mask([4, 1, 3], 4)
    se, ce, n = 0.0, 0.0, 0
    for b in range(3):
        for i in range(4):
            if not mask[b, i]:
                continue
            sv, tv = s[b, i].tolist(), t[b, i].tolist()
            se += sum((x - y) ** 2 for x, y in zip(sv, tv)) / len(sv)
            dot = sum(x * y for x, y in zip(sv, tv))
            ce += 1 - dot / (math.sqrt(sum(x * x for x in sv)) * math.sqrt(sum(y * y for y in tv)))
            n += 1
    assert hidden_mse(s, t, mask).item() == pytest.approx(se / n)
    assert hidden_cosine(s, t, mask).item() == pytest.approx(ce / n)
    assert hidden_mse(s, t).item() == pytest.approx(((s - t) ** 2).mean().item())


@pytest.mark.parametrize("fn", [hidden_mse, hidden_cosine])
def test_hidden_losses_zero_when_equal_mask_and_grad(fn):
    s = _randn(2, 3, 4, seed=20).requires_grad_()
    t = _randn(2, 3, 4, seed=21)
    mask = _mask([3, 1], 3)
    assert fn(t.clone(), t, mask).item() == pytest.approx(0.0, abs=1e-12)
    loss = fn(s, t, mask)
    t2 = t.clone()
    t2[1, 1:] = -7.0
    assert fn(s, t2, mask).item() == pytest.approx(loss.item())
    loss.backward()
    assert torch.all(s.grad[1, 1:] == 0) and s.grad[0].abs().sum() > 0


def test_pkd_matches_reference_and_ignores_scale():
    s, t = _randn(3, 4, 5, seed=22), _randn(3, 4, 5, seed=23)
    want = 0.0
    for b in range(3):
        sv, tv = s[b, 0].tolist(), t[b, 0].tolist()
        ns, nt = math.sqrt(sum(x * x for x in sv)), math.sqrt(sum(x * x for x in tv))
        want += sum((x / ns - y / nt) ** 2 for x, y in zip(sv, tv))
    want /= 3
    assert pkd_loss(s, t).item() == pytest.approx(want)
    assert pkd_loss(s * 10, t).item() == pytest.approx(want)
    assert pkd_loss(s[:, 0], t[:, 0]).item() == pytest.approx(want)  # [B, H] inputs
    assert pkd_loss(t * 3, t).item() == pytest.approx(0.0, abs=1e-12)


def _ref_gram_mse(s_a, s_b, t_a, t_b, mask, fsp: bool) -> float:
    """Loop reference for mmd (token x token, / width) and fsp (width x width, / length)."""
    total, count = 0.0, 0
    bsz, length = s_a.shape[0], s_a.shape[1]
    for b in range(bsz):
        valid = [i for i in range(length) if mask is None or mask[b, i]]
        if fsp:
            h = s_a.shape[2]
            for p in range(h):
                for q in range(h):
                    gs = sum(s_a[b, i, p].item() * s_b[b, i, q].item() for i in valid) / len(valid)
                    gt = sum(t_a[b, i, p].item() * t_b[b, i, q].item() for i in valid) / len(valid)
                    total += (gs - gt) ** 2
                    count += 1
        else:
            for i in valid:
                for j in valid:
                    gs = (s_a[b, i] * s_b[b, j]).sum().item() / s_a.shape[2]
                    gt = (t_a[b, i] * t_b[b, j]).sum().item() / t_a.shape[2]
                    total += (gs - gt) ** 2
                    count += 1
    return total / count


def test_mmd_matches_reference_with_different_widths():
    s_a, s_b = _randn(2, 4, 3, seed=24), _randn(2, 4, 3, seed=25)
    t_a, t_b = _randn(2, 4, 6, seed=26), _randn(2, 4, 6, seed=27)
    mask = _mask([4, 2], 4)
    assert mmd_loss(s_a, s_b, t_a, t_b, mask).item() == pytest.approx(_ref_gram_mse(s_a, s_b, t_a, t_b, mask, False))
    assert mmd_loss(s_a, s_b, t_a, t_b).item() == pytest.approx(_ref_gram_mse(s_a, s_b, t_a, t_b, None, False))


def test_fsp_matches_reference():
    s_a, s_b, t_a, t_b = (_randn(2, 4, 3, seed=k) for k in (28, 29, 30, 31))
    mask = _mask([3, 4], 4)
    assert fsp_loss(s_a, s_b, t_a, t_b, mask).item() == pytest.approx(_ref_gram_mse(s_a, s_b, t_a, t_b, mask, True))
    assert fsp_loss(s_a, s_b, t_a, t_b).item() == pytest.approx(_ref_gram_mse(s_a, s_b, t_a, t_b, None, True))


@pytest.mark.parametrize("fn", [mmd_loss, fsp_loss])
def test_gram_losses_zero_when_equal_masked_and_grad(fn):
    a = _randn(2, 4, 3, seed=32).requires_grad_()
    b = _randn(2, 4, 3, seed=33)
    ta, tb = _randn(2, 4, 3, seed=34), _randn(2, 4, 3, seed=35)
    mask = _mask([4, 2], 4)
    assert fn(ta.clone(), tb.clone(), ta, tb, mask).item() == pytest.approx(0.0, abs=1e-12)
    loss = fn(a, b, ta, tb, mask)
    ta2 = ta.clone()
    ta2[1, 2:] = 50.0
    assert fn(a, b, ta2, tb, mask).item() == pytest.approx(loss.item())
    loss.backward()
    assert torch.all(a.grad[1, 2:] == 0) and a.grad.abs().sum() > 0


def test_token_level_losses_reject_different_lengths():
    with pytest.raises(LossInputError, match="tokenizer"):
        hidden_mse(torch.zeros(2, 5, 4), torch.zeros(2, 6, 4))
    with pytest.raises(LossInputError, match="projection"):
        fsp_loss(*(torch.zeros(1, 3, 4),) * 2, *(torch.zeros(1, 3, 8),) * 2)


# --------------------------------------------------------------------------- attention


def test_attention_mse_matches_reference():
    lengths = [4, 2]
    s, t = _attn(2, 3, 4, lengths, 36), _attn(2, 3, 4, lengths, 37)
    mask = _mask(lengths, 4)
    total, n = 0.0, 0
    for b in range(2):
        for h in range(3):
            for i in range(lengths[b]):
                for j in range(lengths[b]):
                    total += (s[b, h, i, j].item() - t[b, h, i, j].item()) ** 2
                    n += 1
    assert attention_mse(s, t, mask).item() == pytest.approx(total / n)
    assert attention_mse(s, t).item() == pytest.approx(((s - t) ** 2).mean().item())


def test_attention_mse_zeroes_negative_scores_like_textbrewer():
    s = torch.tensor([[[[0.5, -10000.0], [0.2, float("-inf")]]]])
    t = torch.tensor([[[[0.1, -10000.0], [0.3, float("-inf")]]]])
    want = ((0.5 - 0.1) ** 2 + (0.2 - 0.3) ** 2) / 4
    assert attention_mse(s, t).item() == pytest.approx(want)
    assert math.isfinite(attention_mse(s, t, torch.tensor([[1, 0]])).item())


def test_attention_ce_matches_reference_on_probabilities():
    lengths = [3, 2]
    s, t = _attn(2, 2, 3, lengths, 38), _attn(2, 2, 3, lengths, 39)
    mask = _mask(lengths, 3)
    total, n = 0.0, 0
    for b in range(2):
        for h in range(2):
            for i in range(lengths[b]):
                total += -sum(t[b, h, i, j].item() * math.log(s[b, h, i, j].item()) for j in range(lengths[b]))
                n += 1
    assert attention_ce(s, t, mask).item() == pytest.approx(total / n)


def test_attention_ce_properties():
    lengths = [3, 1]
    t = _attn(2, 2, 3, lengths, 40)
    s = _attn(2, 2, 3, lengths, 41).requires_grad_()
    mask = _mask(lengths, 3)
    # at student == teacher the cross-entropy is the teacher's entropy (its minimum)
    entropy = attention_ce(t, t, mask)
    assert attention_ce(s, t, mask).item() > entropy.item()
    loss = attention_ce(s, t, mask)
    assert math.isfinite(loss.item())  # padded keys have p == 0: no 0 * log 0 NaN
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[1, :, 1:] == 0)
    with pytest.raises(LossInputError, match="heads"):
        attention_ce(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))


# --------------------------------------------------------------------------- projection


def test_projection_shapes_init_and_determinism():
    torch.manual_seed(0)
    a = Projection(8, 16)
    torch.manual_seed(0)
    b = Projection(8, 16)
    torch.testing.assert_close(a.linear.weight, b.linear.weight)
    assert torch.all(a.linear.bias == 0)
    assert 0.01 < a.linear.weight.std().item() < 0.03
    x = torch.randn(2, 3, 8)
    assert a(x).shape == (2, 3, 16)
    assert torch.all(Projection(8, 4, "relu")(x) >= 0)
    torch.manual_seed(1)
    linear = Projection(8, 4, "linear")
    torch.manual_seed(1)
    torch.testing.assert_close(linear(x), Projection(8, 4, "none")(x))
    assert (linear(x) < 0).any()  # no activation
    assert torch.all(Projection(8, 4, "tanh")(x).abs() < 1)
    with pytest.raises(LossInputError, match="activation"):
        Projection(8, 4, "gelu")


# --------------------------------------------------------------------------- matches


def test_match_validation():
    with pytest.raises(MatchError, match="kind"):
        Match("hidden_l1", 1, 1)
    with pytest.raises(MatchError, match="pair"):
        Match("mmd", 1, 1)
    with pytest.raises(MatchError, match="one layer"):
        Match("hidden_mse", (1, 1), 1)
    with pytest.raises(MatchError, match="projection"):
        Match("attention_mse", 1, 1, projection="linear")
    with pytest.raises(MatchError, match="projection"):
        Match("hidden_mse", 1, 1, projection="gelu")
    with pytest.raises(MatchError, match="weight"):
        Match("hidden_mse", 1, 1, weight=float("nan"))
    assert Match("mmd", (4, 4), (1, 1)).label == "mmd.t4-4.s1-1"
    assert issubclass(MatchError, KDError) and issubclass(MatchError, ValueError)


def test_check_matches_names_layer_count_and_range():
    check_matches([Match("hidden_mse", 12, 3), Match("attention_ce", 11, 2)], 12, 3)
    with pytest.raises(MatchError, match=r"teacher hidden layer 13 .* 12 layers.* 0\.\.12"):
        check_matches([Match("hidden_mse", 13, 3)], 12, 3)
    with pytest.raises(MatchError, match=r"student attention layer 3 .* 3 layers.* 0\.\.2"):
        check_matches([Match("attention_mse", 3, 3)], 12, 3)


def _tiny_bert(layers: int, hidden: int, seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    return BertModel(config).eval()


def test_match_loss_on_tiny_hf_models_layer_convention_and_projection():
    teacher, student = _tiny_bert(4, 32, 0), _tiny_bert(2, 16, 1)
    ids = torch.randint(1, 50, (2, 6), generator=_gen(42))
    mask = _mask([6, 4], 6)
    with torch.no_grad():
        t_out = teacher(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    s_out = student(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    t_feat = feature_map(t_out.hidden_states, t_out.attentions)
    s_feat = feature_map(s_out.hidden_states, s_out.attentions)
    assert len(t_out.hidden_states) == 5 and len(t_out.attentions) == 4
    torch.testing.assert_close(t_feat["hidden.4"], t_out.last_hidden_state)

    matches = preset_matches("L3n_hidden_mse+L3_hidden_smmd+L3_attention_ce", 4, 2)
    check_matches(matches, 4, 2)
    torch.manual_seed(0)
    projections = build_projections(matches, 16, 32)
    total = sum(match_loss(m, s_feat, t_feat, mask, p) for m, p in zip(matches, projections))
    assert torch.isfinite(total)
    total.backward()
    assert next(iter(student.parameters())).grad is not None
    assert all(p.linear.weight.grad is not None for p in projections if isinstance(p, Projection))

    # cached "first token only" teacher hidden state compares with the student's token 0
    proj = build_projections([Match("hidden_mse", 4, 2, projection="linear")], 16, 32)[0]
    first = {"hidden.4": t_feat["hidden.4"][:, 0]}
    got = match_loss(Match("hidden_mse", 4, 2, weight=0.5), s_feat, first, mask, proj)
    want = ((proj(s_feat["hidden.2"][:, 0]) - first["hidden.4"]) ** 2).mean()  # weight left to the caller
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(MatchError, match="all tokens"):
        match_loss(Match("mmd", (4, 4), (2, 2)), s_feat, first, mask)


def test_match_loss_missing_layer_names_it():
    feats = feature_map([torch.zeros(1, 2, 4)] * 3)
    with pytest.raises(MatchError, match=r"teacher hidden layer 7 .*hidden\.0, hidden\.1, hidden\.2"):
        match_loss(Match("hidden_mse", 7, 1), feats, feats)


def test_match_loss_weight_and_dispatch():
    s, t = _randn(2, 3, 4, seed=43), _randn(2, 3, 4, seed=44)
    feats_s, feats_t = {"hidden.1": s, "hidden.2": s * 2}, {"hidden.5": t, "hidden.6": t + 1}
    mask = _mask([3, 2], 3)
    assert match_loss(Match("hidden_cosine", 5, 1, weight=2.0), feats_s, feats_t, mask).item() == pytest.approx(
        hidden_cosine(s, t, mask).item()
    )
    assert match_loss(Match("pkd", 5, 1), feats_s, feats_t).item() == pytest.approx(pkd_loss(s, t).item())
    assert match_loss(Match("fsp", (5, 6), (1, 2)), feats_s, feats_t, mask).item() == pytest.approx(
        fsp_loss(s, s * 2, t, t + 1, mask).item()
    )


# --------------------------------------------------------------------------- registry


def test_one_registry_drives_config_losses_and_presets():
    assert MATCH_LOSSES.keys() == kinds.MATCH_KINDS.keys()
    assert MatchConfig.model_fields["kind"].annotation.__args__ == tuple(kinds.MATCH_KINDS)
    assert KDConfig.model_fields["loss"].annotation.__args__ == kinds.KD_KINDS
    assert {p.kind for p in kinds.PRESETS.values()} <= kinds.MATCH_KINDS.keys()
    assert set(kinds.MATCH_ALIASES.values()) <= kinds.MATCH_KINDS.keys()
    for name, spec in kinds.MATCH_KINDS.items():
        layer = (1, 1) if spec.pair else 1
        m = Match(name, layer, layer)
        assert (m.feature, m.token_level) == (spec.feature, spec.tokens == "all")


def test_a_new_kind_is_one_registry_entry_plus_its_function(monkeypatch):
    monkeypatch.setitem(kinds.MATCH_KINDS, "hidden_l1", kinds.MatchKind("hidden", pair=False, tokens="all"))
    monkeypatch.setitem(MATCH_LOSSES, "hidden_l1", lambda s, t, mask=None: (s - t).abs().mean())
    m = Match("hidden_l1", 3, 1)
    s, t = _randn(2, 3, 4, seed=45), _randn(2, 3, 4, seed=46)
    got = match_loss(m, {"hidden.1": s}, {"hidden.3": t})
    assert got.item() == pytest.approx((s - t).abs().mean().item())
    assert needed_teacher_layers([m]) == ({3}, set())
    with pytest.raises(MatchError, match="teacher hidden layer 3 is out of range"):
        check_matches([m], 2, 1)


# --------------------------------------------------------------------------- presets


def _pairs(matches):
    return [(m.teacher_layer, m.student_layer) for m in matches]


def test_presets_reproduce_textbrewer_for_12_layer_teacher():
    assert _pairs(preset_matches("L3_hidden_mse", 12, 3)) == [(0, 0), (4, 1), (8, 2), (12, 3)]
    assert _pairs(preset_matches("L3_hidden_smmd", 12, 3)) == [((0, 0), (0, 0)), ((4, 4), (1, 1)),
                                                                ((8, 8), (2, 2)), ((12, 12), (3, 3))]
    assert _pairs(preset_matches("L4_hidden_mse", 12, 4)) == [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)]
    assert _pairs(preset_matches("L6_hidden_smmd", 12, 6))[3] == ((6, 6), (3, 3))
    assert [m.kind for m in preset_matches("L4_hidden_smmd", 12, 4)] == ["mmd"] * 5
    # attention j (block j + 1) pairs with the last teacher block of its group
    assert _pairs(preset_matches("L3_attention_mse", 12, 3)) == [(3, 0), (7, 1), (11, 2)]
    assert all(m.projection == "linear" for m in preset_matches("L4t_hidden_mse", 12, 4))


def test_presets_adapt_to_real_depths_and_compose():
    assert _pairs(preset_matches("L3_hidden_mse", 6, 2)) == [(0, 0), (3, 1), (6, 2)]
    combo = preset_matches(" L3_hidden_mse + L3_hidden_smmd ", 6, 2)
    assert [m.kind for m in combo] == ["hidden_mse"] * 3 + ["mmd"] * 3
    hidden, attention = needed_teacher_layers(combo + preset_matches("L3_attention_ce", 6, 2))
    assert hidden == {0, 3, 6} and attention == {2, 5}
    with pytest.raises(MatchError, match="valid presets: .*L3_hidden_mse"):
        preset_matches("L3_hidden_mse+L5_hidden_mse", 12, 3)
    with pytest.raises(MatchError, match=">= 1"):
        preset_matches("L3_hidden_mse", 12, 0)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(PRESET_NAMES),
    teacher_layers=st.integers(1, 48),
    student_layers=st.integers(1, 24),
)
def test_presets_always_in_range_and_monotonic(name, teacher_layers, student_layers):
    matches = preset_matches(name, teacher_layers, student_layers)
    check_matches(matches, teacher_layers, student_layers)
    teacher = [m.teacher_layer if isinstance(m.teacher_layer, int) else m.teacher_layer[0] for m in matches]
    assert teacher == sorted(teacher)
    if matches[0].feature == "hidden":
        assert teacher[0] == 0 and teacher[-1] == teacher_layers  # embeddings and last layer always matched
