"""TextBrewer 0.2.1 parity: the head-summed/averaged attention losses, the remaining presets, `gram`/`nst`,
per-projection learning rates, and the places where our formulas deliberately differ.

TextBrewer is not a test dependency: each of its formulas is written out below from its `losses.py` /
`schedulers.py` (0.2.1.post1 on PyPI) in plain torch, and our functions are checked against them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.distill import distill
from stages.precompute import precompute
from stages.config import ConfigError, config_from_dict, config_to_dict
from stages.train import ResumeError
from stages.methods import DistillObjective
from stages.losses import (
    LossInputError,
    Match,
    MatchError,
    Projection,
    attention_ce,
    attention_ce_mean,
    attention_mse,
    attention_mse_sum,
    build_projections,
    check_matches,
    mmd_loss,
    preset_matches,
)
from stages.losses import cwsm_temperature, weight_at
from tests.helpers import stage_params

B, T = 3, 7
LENGTHS = [7, 5, 2]


def _mask() -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()


def _probs(heads: int, seed: int, *, padded: float = -30.0) -> torch.Tensor:
    """Attention probabilities [B, heads, T, T] from random scores with an additive key mask.

    `padded` -30 leaves padded keys a tiny, finite probability (so TextBrewer's formula, fed logs, stays
    finite); -inf gives exact zeros, as Hugging Face models return.
    """
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, heads, T, T, generator=g, dtype=torch.float64)
    scores = scores + (1 - _mask())[:, None, None, :].double() * padded if padded != float("-inf") else \
        scores.masked_fill(_mask()[:, None, None, :] == 0, float("-inf"))
    return scores.softmax(dim=-1)


# --------------------------------------------------------------------------- TextBrewer's formulas, written out


def tb_att_mse_sum(att_s, att_t, mask=None):
    """att_mse_sum_loss: sum the heads, then MSE; masked: over valid (query, key) pairs / sum_b len_b^2."""
    s, t = att_s.sum(dim=1), att_t.sum(dim=1)
    if mask is None:
        s = torch.where(s <= -1e-3, torch.zeros_like(s), s)
        t = torch.where(t <= -1e-3, torch.zeros_like(t), t)
        return F.mse_loss(s, t)
    m = mask.to(s.dtype)
    per_pair = F.mse_loss(s, t, reduction="none") * m[:, :, None] * m[:, None, :]
    return per_pair.sum() / (m.sum(dim=1) ** 2).sum()


def tb_att_ce_mean(scores_s, scores_t, mask=None):
    """att_ce_mean_loss: average the heads' *scores*, softmax, cross-entropy; masked: mean over valid queries."""
    if scores_s.dim() == 4:
        scores_s, scores_t = scores_s.mean(dim=1), scores_t.mean(dim=1)
    p_t = scores_t.softmax(dim=-1)
    log_s = scores_s.log_softmax(dim=-1)
    if mask is None:
        p_t = torch.where(scores_t <= -1e-3, torch.zeros_like(p_t), p_t)
        return -(p_t * log_s).sum(dim=-1).mean()
    m = mask.to(scores_s.dtype)
    return -(((p_t * log_s * m[:, None, :]).sum(dim=-1)) * m).sum() / m.sum()


def tb_att_ce(scores_s, scores_t, mask):
    """att_ce_loss with a mask: softmax of the scores, cross-entropy per head, mean over heads x valid queries."""
    m = mask.to(scores_s.dtype)[:, None, :].expand(-1, scores_s.shape[1], -1)  # [B, heads, T]
    prod = scores_t.softmax(dim=-1) * scores_s.log_softmax(dim=-1) * m[:, :, None, :]
    return -(prod.sum(dim=-1) * m).sum() / m.sum()


def tb_mmd_masked(s_a, s_b, t_a, t_b, mask, divide_by: str):
    """mmd_loss with a mask. 0.2.1 divides the [B, T, T] similarities by the padded length T ("length");
    TextBrewer's later source divides by the width, as its unmasked branch always did ("width")."""
    axis = 1 if divide_by == "length" else 2
    g_s = torch.bmm(s_a, s_b.transpose(1, 2)) / s_b.shape[axis]
    g_t = torch.bmm(t_a, t_b.transpose(1, 2)) / t_b.shape[axis]
    m = mask.to(s_a.dtype)
    per_pair = F.mse_loss(g_s, g_t, reduction="none") * m[:, :, None] * m[:, None, :]
    return per_pair.sum() / (m.sum(dim=1) ** 2).sum()


def tb_cwsm(logits_s, base, beta):
    """cwsm_temperature_scheduler: tau = T + beta * (mean(w) - w), w = 1 / (max softmax + 1e-3); no clamp."""
    w = 1 / (logits_s.softmax(dim=-1).max(dim=-1)[0] + 1e-3)
    return base + (w.mean() - w) * beta


# --------------------------------------------------------------------------- the new losses


@pytest.mark.parametrize("heads_s", [2, 4])
def test_attention_mse_sum_is_textbrewers_formula(heads_s):
    p_s, p_t = _probs(heads_s, seed=1), _probs(4, seed=2)
    mask = _mask()
    torch.testing.assert_close(attention_mse_sum(p_s, p_t, mask), tb_att_mse_sum(p_s, p_t, mask))
    torch.testing.assert_close(attention_mse_sum(p_s, p_t), tb_att_mse_sum(p_s, p_t))
    assert attention_mse_sum(p_t, p_t, mask).item() == 0.0
    # Padded pairs are out: changing them changes nothing.
    noisy = p_s.clone()
    noisy[2, :, 3:, :] = 5.0
    torch.testing.assert_close(attention_mse_sum(noisy, p_t, mask), attention_mse_sum(p_s, p_t, mask))


@pytest.mark.parametrize("heads_s", [2, 4])
def test_attention_ce_mean_is_textbrewers_formula_on_the_log_of_the_head_mean(heads_s):
    # We take probabilities and average them over heads; TextBrewer's formula applied to the log of that mean
    # (a [B, T, T] input: it skips its own head averaging) is the same number.
    p_s, p_t = _probs(heads_s, seed=3), _probs(4, seed=4)
    mask = _mask()
    log_mean_s, log_mean_t = p_s.mean(dim=1).log(), p_t.mean(dim=1).log()
    torch.testing.assert_close(attention_ce_mean(p_s, p_t, mask), tb_att_ce_mean(log_mean_s, log_mean_t, mask))
    # Without a mask TextBrewer drops every key whose *score* is <= -1e-3 (meant for raw scores with an additive
    # mask; on logs it drops them all): ours is the plain cross-entropy, i.e. its masked branch with no padding.
    ones = torch.ones_like(mask)
    torch.testing.assert_close(attention_ce_mean(p_s, p_t), tb_att_ce_mean(log_mean_s, log_mean_t, ones))
    # At p_S == p_T it is the teacher's entropy, the minimum over p_S.
    assert attention_ce_mean(p_t, p_t, mask) < attention_ce_mean(p_s, p_t, mask)


def test_attention_ce_mean_with_exact_zeros_for_padded_keys_stays_finite():
    p_s = _probs(2, seed=5, padded=float("-inf")).requires_grad_(True)
    p_t = _probs(4, seed=6, padded=float("-inf"))
    loss = attention_ce_mean(p_s, p_t, _mask())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p_s.grad).all()
    # ... and equals the value with near-zero padded probabilities.
    near = attention_ce_mean(_probs(2, seed=5), _probs(4, seed=6), _mask())
    assert loss.item() == pytest.approx(near.item(), rel=1e-9)


def test_attention_ce_is_textbrewers_formula_on_log_probabilities():
    # attention_ce (already shipped) takes probabilities; TextBrewer's takes scores and applies softmax itself.
    # Fed the log-probabilities, whose softmax is the probabilities again, TextBrewer's gives our number.
    p_s, p_t = _probs(4, seed=7), _probs(4, seed=8)
    mask = _mask()
    torch.testing.assert_close(attention_ce(p_s, p_t, mask), tb_att_ce(p_s.log(), p_t.log(), mask))


def test_head_counts_may_differ_only_for_the_summed_and_averaged_kinds():
    p_s, p_t = _probs(2, seed=9), _probs(4, seed=10)
    with pytest.raises(LossInputError, match="attention_mse_sum / attention_ce_mean"):
        attention_mse(p_s, p_t, _mask())
    with pytest.raises(LossInputError, match="equal lengths"):
        attention_ce_mean(p_s[:, :, :5, :5], p_t, None)
    check_matches([Match("attention_ce_mean", 3, 1), Match("attention_mse_sum", 0, 0)], 4, 2)


# --------------------------------------------------------------------------- where we differ, precisely


def test_masked_mmd_divides_by_the_width_not_the_padded_length():
    g = torch.Generator().manual_seed(11)
    s_a, s_b, t_a, t_b = (torch.randn(B, T, 8, generator=g, dtype=torch.float64) for _ in range(4))
    mask = _mask()
    ours = mmd_loss(s_a, s_b, t_a, t_b, mask)
    torch.testing.assert_close(ours, tb_mmd_masked(s_a, s_b, t_a, t_b, mask, "width"))
    # 0.2.1 with equal widths H: the same up to (H / T)^2, a factor that depends on the batch's padded length.
    torch.testing.assert_close(ours, tb_mmd_masked(s_a, s_b, t_a, t_b, mask, "length") * (T / 8) ** 2)
    # Ours does not: a batch without padding gives the unmasked value, however long it is.
    full = torch.ones_like(mask)
    torch.testing.assert_close(mmd_loss(s_a, s_b, t_a, t_b, full), mmd_loss(s_a, s_b, t_a, t_b))


def test_cwsm_is_textbrewers_temperature_clamped_at_min_temperature():
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.1, 0.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    mild, wild = tb_cwsm(logits, 4.0, 0.5), tb_cwsm(logits, 4.0, 10.0)
    torch.testing.assert_close(cwsm_temperature(logits, logits, 4.0, 0.5), mild)
    assert (wild <= 0).any()  # TextBrewer: a zero or negative temperature (divides by zero / inverts the softmax)
    ours = cwsm_temperature(logits, logits, 4.0, 10.0)
    torch.testing.assert_close(ours, wild.clamp_min(1e-2))
    assert ours.min().item() == pytest.approx(1e-2)


def test_weight_schedules_scale_the_base_weight_instead_of_replacing_it():
    # TextBrewer sets kd_loss_weight = scheduler(step / total), so a configured 0.5 becomes 1 -> 0.
    tb_kd_weight = 1 - 25 / 100
    assert weight_at("linear_decay", 0.5, 25, 100) == pytest.approx(0.5 * tb_kd_weight)
    assert weight_at("linear_growth", 2.0, 25, 100) == pytest.approx(2.0 * 0.25)


# --------------------------------------------------------------------------- presets


def _pairs(name: str, teacher_layers: int, student_layers: int) -> list:
    return [(m.teacher_layer, m.student_layer) for m in preset_matches(name, teacher_layers, student_layers)]


# TextBrewer's examples/matches/matches.py numbers attention blocks from 1 (layer_T 4 = the 4th block); ours are
# Hugging Face's 0-based `attentions[i]`, hence the -1.
TB_L3_ATTENTION = [(4, 1), (8, 2), (12, 3)]
TB_L4_ATTENTION = [(3, 1), (6, 2), (9, 3), (12, 4)]


@pytest.mark.parametrize("loss", ["mse_sum", "ce_mean"])
def test_attention_sum_and_mean_presets(loss):
    assert _pairs(f"L3_attention_{loss}", 12, 3) == [(t - 1, s - 1) for t, s in TB_L3_ATTENTION]
    assert _pairs(f"L4_attention_{loss}", 12, 4) == [(t - 1, s - 1) for t, s in TB_L4_ATTENTION]
    assert _pairs(f"L6_attention_{loss}", 12, 6) == [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4), (11, 5)]
    assert _pairs(f"L3_attention_{loss}", 6, 3) == [(1, 0), (3, 1), (5, 2)]
    assert {m.kind for m in preset_matches(f"L4_attention_{loss}", 12, 4)} == {f"attention_{loss}"}


def test_l4t_hidden_sgram_is_gram_on_layer_pairs_with_a_projection():
    matches = preset_matches("L4t_hidden_sgram", 12, 4)
    assert _pairs("L4t_hidden_sgram", 12, 4) == [((t, t), (s, s)) for t, s in [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)]]
    assert all(m.kind == "fsp" and m.projection == "linear" for m in matches)
    assert _pairs("L4t_hidden_sgram", 6, 3) == [((0, 0), (0, 0)), ((2, 2), (1, 1)), ((4, 4), (2, 2)), ((6, 6), (3, 3))]


def test_small_presets_match_every_second_layer():
    # TextBrewer's ELECTRA-small presets: a 12-layer, narrower student, every second layer.
    every_second = [(i, i) for i in range(0, 13, 2)]
    assert _pairs("small_hidden_mse", 12, 12) == every_second
    assert all(m.kind == "hidden_mse" and m.projection == "linear" for m in preset_matches("small_hidden_mse", 12, 12))
    assert _pairs("small_hidden_smmd", 12, 12) == [((t, t), (s, s)) for t, s in every_second]
    assert all(m.kind == "mmd" and m.projection is None for m in preset_matches("small_hidden_smmd", 12, 12))
    # Other depths: every second student layer and always the last, teacher layers spread as for L* presets.
    assert _pairs("small_hidden_mse", 12, 3) == [(0, 0), (8, 2), (12, 3)]
    assert _pairs("small_hidden_mse", 12, 4) == [(0, 0), (6, 2), (12, 4)]
    assert _pairs("small_hidden_mse", 6, 3) == [(0, 0), (4, 2), (6, 3)]


# --------------------------------------------------------------------------- aliases and settings


def _online(matches: list[dict]) -> dict:
    return {"distill": {"teacher_signal": "online", "matches": matches}}


def test_gram_and_nst_resolve_to_one_name_on_load():
    pair = {"teacher_layer": [2, 2], "student_layer": [1, 1]}
    cfg = config_from_dict(_online([{"kind": "gram", **pair, "projection": "linear"}, {"kind": "nst", **pair}]))
    assert [m.kind for m in cfg.distill.matches] == ["fsp", "mmd"]
    assert [m["kind"] for m in config_to_dict(cfg)["distill"]["matches"]] == ["fsp", "mmd"]
    with pytest.raises(ConfigError) as err:
        config_from_dict(_online([{"kind": "grams", **pair}]))
    [line] = str(err.value).splitlines()[1:]
    assert line.strip().startswith("distill.matches[0].kind: 'grams' is not one of 'hidden_mse', ")
    assert line.endswith(" or 'attention_ce_mean' (aliases: 'gram' = 'fsp', 'nst' = 'mmd')")


def test_projection_lr_settings_are_checked():
    base = {"kind": "hidden_mse", "teacher_layer": 2, "student_layer": 1}
    cfg = config_from_dict(_online([{**base, "projection": "linear", "projection_lr": "1e-3"}]))
    assert cfg.distill.matches[0].projection_lr == 1e-3
    for bad, says in [({"projection_lr": 1e-3}, "only applies with a projection"),
                      ({"projection": "linear", "projection_lr": 0.0}, "must be > 0")]:
        with pytest.raises(ConfigError) as err:
            config_from_dict(_online([{**base, **bad}]))
        [line] = [x for x in str(err.value).splitlines()[1:]]
        assert "distill.matches[0].projection_lr" in line and says in line
    with pytest.raises(MatchError, match="needs a projection"):
        Match("hidden_mse", 2, 1, projection_lr=1e-3)
    with pytest.raises(MatchError, match="> 0"):
        Match("hidden_mse", 2, 1, projection="linear", projection_lr=-1.0)
    [proj, ident] = build_projections([Match("hidden_mse", 2, 1, projection="tanh", projection_lr=0.02),
                                       Match("hidden_mse", 2, 1)], 16, 32)
    assert isinstance(proj, Projection) and proj.lr == 0.02 and not hasattr(ident, "lr")


# --------------------------------------------------------------------------- end to end on tiny models


def test_tiny_distill_with_a_new_preset_and_a_projection_lr_resumes_exactly(tmp_path: Path, tiny_data_dir,
                                                                             tiny_teacher_dir, monkeypatch):
    files = {split: str(tiny_data_dir / f"{split}.csv") for split in ("train", "dev", "test")}
    # A narrower student with half the teacher's heads (4 blocks, 64 wide, 4 heads): attention_ce_mean
    # compares head-averaged maps, mmd ([T, T] similarities) needs no projection, hidden_mse does, trained
    # at its own lr.
    student = {"config": str(tiny_teacher_dir), "num_layers": 2, "hidden_size": 32, "intermediate_size": 64,
               "num_heads": 2}
    hidden = {"kind": "hidden_mse", "teacher_layer": 4, "student_layer": 2, "projection": "linear",
              "projection_lr": 0.02}

    def params(name: str, resume: bool = False, lr: float = 0.02) -> dict:
        hidden["projection_lr"] = lr
        return stage_params(tmp_path, tiny_teacher_dir, files,
                            precompute={"hidden_layers": [0, 4], "attention_layers": [1, 3]},
                            distill={"student": student, "match_preset": "L3_attention_ce_mean+small_hidden_smmd", "matches": [hidden],
                                     "epochs": 2, "checkpoint_every": 3, "output": str(tmp_path / name),
                                     "resume": resume})

    precompute(config_from_dict(params("full")))
    orig = DistillObjective.losses
    terms: list[dict[str, float]] = []
    crash_at = {"call": None}

    def spy(self, *args):
        if crash_at["call"] is not None and len(terms) + 1 == crash_at["call"]:
            raise KeyboardInterrupt
        out = orig(self, *args)
        terms.append({k: float(v.detach()) for k, v in out.items()})
        return out

    monkeypatch.setattr(DistillObjective, "losses", spy)
    distill(config_from_dict(params("full")))
    assert len(terms) == 26
    assert set(terms[0]) == {"kd", "hard", "hidden_mse.t4.s2", "attention_ce_mean.t1.s0", "attention_ce_mean.t3.s1",
                             "mmd.t0-0.s0-0", "mmd.t4-4.s2-2"}
    assert all(math.isfinite(v) and v > 0 for t in terms for v in t.values())

    terms.clear()
    crash_at["call"] = 20  # the last checkpoint is at step 18
    with pytest.raises(KeyboardInterrupt):
        distill(config_from_dict(params("part")))
    state = torch.load(tmp_path / "part" / "checkpoint" / "state.pt", map_location="cpu", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    # The student's two groups (decayed, not decayed) at distill.lr, then the projection's weight and bias at 0.02.
    assert [g["initial_lr"] for g in groups] == [1e-3, 1e-3, 0.02, 0.02]
    assert [len(g["params"]) for g in groups[2:]] == [1, 1] and groups[2]["weight_decay"] == 0.01
    assert groups[2]["lr"] == pytest.approx(0.02 * groups[0]["lr"] / 1e-3)  # the same warm-up/decay schedule

    crash_at["call"] = None
    with pytest.raises(ResumeError, match=r"'projection_lr': 0\.02}\] -> .*'projection_lr': 0\.03}\]"):
        distill(config_from_dict(params("part", resume=True, lr=0.03)))
    distill(config_from_dict(params("part", resume=True)))
    for name in ("model.safetensors", "projections.pt"):
        a, b = (_state(tmp_path / run / name) for run in ("full", "part"))
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, name


def _state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu")
    from safetensors.torch import load_file

    return load_file(path)


# --------------------------------------------------------------------------- on the real bundled model (opt in)

from tests.test_slow import cfg, prepared, teacher  # noqa: E402,F401  (module-scoped stage fixtures)


@pytest.mark.slow
def test_bundled_model_new_presets_aliases_and_a_projection_lr(cfg, teacher, tmp_path, monkeypatch):
    """The fine-tuned bundled MiniLM (6 blocks, 384 wide, 12 heads) live, into the demo's 2 x 192 student with
    3 heads, on the 320 training sentences: the new presets adapt to those counts, `nst` is mmd, and the
    projection with its own lr trains in its own optimizer group."""
    params = config_to_dict(cfg)
    params["data"]["transfer"] = None
    params["distill"].update({
        "teacher_signal": "online", "output": str(tmp_path / "student"), "log_dir": str(tmp_path / "live"),
        "metrics": str(tmp_path / "m.json"),
        "match_preset": "small_hidden_mse+L3_attention_ce_mean+L3_attention_mse_sum+L4t_hidden_sgram",
        "matches": [{"kind": "nst", "teacher_layer": [3, 6], "student_layer": [1, 2]},
                    {"kind": "hidden_mse", "teacher_layer": 4, "student_layer": 1, "projection": "linear",
                     "projection_lr": 2e-3}]})
    run_cfg = config_from_dict(params)
    assert run_cfg.distill.student.config == str(teacher.output)
    orig, terms, made = DistillObjective.losses, [], []

    class AdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def spy(self, *args):
        out = orig(self, *args)
        terms.append({k: float(v.detach()) for k, v in out.items()})
        return out

    monkeypatch.setattr(DistillObjective, "losses", spy)
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    res = distill(run_cfg)
    d = run_cfg.distill
    assert res.teacher_signal == "online" and len(terms) == res.fit.steps > 5
    # small_*: student hidden 0 and 2 (every second and the last) -> teacher round(i * 6 / 2); attention
    # presets: student block j -> the teacher's last block of its group; sgram: (i, i) pairs at every layer.
    assert set(terms[0]) == {
        "kd", "hard", "hidden_mse.t0.s0", "hidden_mse.t6.s2", "hidden_mse.t4.s1",
        "attention_ce_mean.t2.s0", "attention_ce_mean.t5.s1", "attention_mse_sum.t2.s0", "attention_mse_sum.t5.s1",
        "fsp.t0-0.s0-0", "fsp.t3-3.s1-1", "fsp.t6-6.s2-2", "mmd.t3-6.s1-2"}
    assert all(math.isfinite(v) and v >= 0 for t in terms for v in t.values())
    # The summed maps of 3 student heads cannot equal 12 teacher heads' (rows add up to 3 vs 12): bounded below.
    assert min(t["attention_mse_sum.t5.s1"] for t in terms) > 0
    # The student's two groups (decayed, not decayed) and the preset projections at distill.lr, then the
    # explicit projection's weight and bias at its projection_lr.
    assert [g["initial_lr"] for g in made[0].param_groups] == [d.lr, d.lr, 2e-3, 2e-3]
    proj = _state(tmp_path / "student" / "projections.pt")
    # Linear 192 -> 384 maps: small_hidden_mse (2), L4t_hidden_sgram (3) and the explicit match (1).
    assert sorted(v.shape for k, v in proj.items() if k.endswith("weight")) == [torch.Size([384, 192])] * 6
