"""Causal-LM losses against independent references: scipy / numpy float64 formulas for values, float64 autograd
of the definitions written out on probabilities for gradients (small seeded tensors, CPU)."""

from __future__ import annotations

import copy
import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr

from cache_format import KDError
from stages.kinds import LM_LOSSES
from stages.losses import (
    CODEC_LOSSES,
    LM_LOSS_FUNCTIONS,
    LMLossInputError,
    align_by_offsets,
    chunked_loss,
    dense_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    next_token_ce,
    reverse_kl,
    sampled_kl,
    topk_loss,
    uld_loss,
)
from stages.tasks.lm_codecs import _encode_chunk

N, V = 7, 23
LOSSES = list(LM_LOSSES)
# beta 0.3 rather than 0.5: JSD(0.5) is symmetric, so a swap of p and s would go unseen
KW = {"beta": 0.3, "alpha": 0.2}


def _logits(seed: int, n: int = N, v: int = V, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def _softmax(z, temperature: float = 1.0) -> np.ndarray:
    """Softmax in float64 numpy."""
    x = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _definition(name: str, p, s, kl, beta: float, alpha: float):
    """Each divergence per row, from its definition, on numpy arrays or torch tensors alike (`kl` sums rows)."""
    if name == "forward_kl":
        return kl(p, s)
    if name == "reverse_kl":
        return kl(s, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * s
        return beta * kl(p, m) + (1 - beta) * kl(s, m)
    if name == "tvd":
        return 0.5 * abs(p - s).sum(-1)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * s)
    assert name == "skew_reverse_kl"
    return kl(s, alpha * s + (1 - alpha) * p)


def _np_div(name: str, p: np.ndarray, s: np.ndarray, beta: float = 0.3, alpha: float = 0.2) -> np.ndarray:
    """The definitions with scipy's rel_entr (x log(x / y), 0 at x = 0)."""
    return _definition(name, p, s, lambda a, b: rel_entr(a, b).sum(-1), beta, alpha)


def _t_div(name: str, p: torch.Tensor, s: torch.Tensor, beta: float = 0.3, alpha: float = 0.2) -> torch.Tensor:
    """The same definitions on float64 probabilities (all > 0), for float64 autograd."""
    return _definition(name, p, s, lambda a, b: (a * torch.log(a / b)).sum(-1), beta, alpha)


def _ref_grad(z_s: torch.Tensor, loss_of_probs) -> torch.Tensor:
    """d/dz of sum_rows loss_of_probs(softmax(z)) in float64 (the caller puts the temperature in)."""
    z = z_s.detach().double().requires_grad_(True)
    loss_of_probs(z).sum().backward()
    return z.grad


def _value_and_grad(fn, z_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z_s.detach().clone().requires_grad_(True)
    out = fn(z)
    out.sum().backward()
    return out.detach(), z.grad


def _close(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- each divergence, online and dense


def test_next_token_ce_matches_naive_and_ignores_minus_100():
    z = _logits(0)
    labels = torch.tensor([3, 0, 22, -100, 5, -100, 1])
    s = _softmax(z)
    ref = [0.0 if y < 0 else -math.log(s[i, y]) for i, y in enumerate(labels.tolist())]
    out = next_token_ce(z, labels)
    assert out.dtype == torch.float32 and out.shape == (N,)
    _close(out, ref)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", LOSSES)
def test_each_divergence_online_and_dense_matches_its_definition(name, temperature):
    """Value vs scipy, gradient vs float64 autograd of the definition; the dense cache holds the teacher's
    log-probabilities at T already, the student is put at T."""
    z_s, z_t = _logits(1), _logits(2)
    p, s = _softmax(z_t, temperature), _softmax(z_s, temperature)
    ref = _np_div(name, p, s)
    p_t = torch.from_numpy(p)
    ref_grad = _ref_grad(z_s, lambda z: _t_div(name, p_t, torch.softmax(z / temperature, -1)))
    cached = torch.log_softmax(z_t / temperature, dim=-1)  # what a cache captured at T holds
    for fn in (partial(LM_LOSS_FUNCTIONS[name], teacher_logits=z_t, temperature=temperature, **KW),
               partial(dense_loss, logprobs=cached, loss=name, temperature=temperature, **KW)):
        out, grad = _value_and_grad(fn, z_s)
        assert out.dtype == torch.float32 and out.shape == (N,)
        _close(out, ref)
        _close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # a float16 cache (what precompute writes) is close, renormalised once
    _close(dense_loss(z_s, cached.half(), loss=name, temperature=temperature, **KW), ref, rtol=2e-2, atol=3e-3)
    assert (ref > 1e-2).all()


def test_jsd_at_one_half_is_scipys_jensen_shannon_distance_squared():
    z_s, z_t = _logits(3), _logits(4)
    ref = jensenshannon(_softmax(z_t), _softmax(z_s), axis=-1) ** 2  # base e
    _close(generalized_jsd(z_s, z_t, 0.5), ref)
    _close(LM_LOSS_FUNCTIONS["jsd"](z_s, z_t, beta=0.5), ref)
    _close(divergence("jsd", torch.log_softmax(z_t, -1), torch.log_softmax(z_s, -1), beta=0.5), ref)


def test_old_online_names_keep_their_signatures():
    z_s, z_t = _logits(5), _logits(6)
    p, s = _softmax(z_t, 2.0), _softmax(z_s, 2.0)
    _close(forward_kl(z_s, z_t, 2.0), rel_entr(p, s).sum(-1))
    _close(reverse_kl(z_s, z_t, 2.0), rel_entr(s, p).sum(-1))
    _close(generalized_jsd(z_s, z_t, 0.3, 2.0), _np_div("jsd", p, s, beta=0.3))


def test_jsd_endpoints_are_the_limits_forward_and_reverse_kl():
    z_s, z_t = _logits(13), _logits(14)
    p, s = _softmax(z_t), _softmax(z_s)
    _close(generalized_jsd(z_s, z_t, 0.0), rel_entr(p, s).sum(-1))
    _close(generalized_jsd(z_s, z_t, 1.0), rel_entr(s, p).sum(-1))
    # JSD(beta) / beta -> forward KL as beta -> 0, JSD / (1 - beta) -> reverse KL as beta -> 1; the gap is
    # about beta * chi^2 / 2, so milder logits
    z_s, z_t, eps = _logits(13, scale=1.0), _logits(14, scale=1.0), 1e-3
    p, s = _softmax(z_t), _softmax(z_s)
    _close(generalized_jsd(z_s, z_t, eps) / eps, rel_entr(p, s).sum(-1), rtol=1e-2, atol=1e-4)
    _close(generalized_jsd(z_s, z_t, 1 - eps) / eps, rel_entr(s, p).sum(-1), rtol=1e-2, atol=1e-4)


def test_skew_losses_reach_forward_and_reverse_kl_at_alpha_zero_and_zero_at_one():
    z_s, z_t = _logits(15), _logits(16)
    p, s = _softmax(z_t), _softmax(z_s)
    _close(LM_LOSS_FUNCTIONS["skew_kl"](z_s, z_t, alpha=0.0), rel_entr(p, s).sum(-1))
    _close(LM_LOSS_FUNCTIONS["skew_reverse_kl"](z_s, z_t, alpha=0.0), rel_entr(s, p).sum(-1))
    for name in ("skew_kl", "skew_reverse_kl"):
        assert LM_LOSS_FUNCTIONS[name](z_s, z_t, alpha=1.0).abs().max() < 1e-6


def test_ids_both_sides_rule_out_count_zero_with_finite_gradients():
    """Ids with -inf logits on both sides (a padded vocabulary) add nothing, and every gradient stays finite."""
    z_s, z_t = _logits(17, v=9), _logits(18, v=9)
    z_s[:, 6:], z_t[:, 6:] = -math.inf, -math.inf
    p, s = _softmax(z_t[:, :6]), _softmax(z_s[:, :6])
    for name in LOSSES:
        for fn in (partial(LM_LOSS_FUNCTIONS[name], teacher_logits=z_t, **KW),
                   partial(dense_loss, logprobs=torch.log_softmax(z_t, -1), loss=name, **KW)):
            out, grad = _value_and_grad(fn, z_s)
            assert torch.isfinite(grad).all(), name
            _close(out, _np_div(name, p, s))


@pytest.mark.parametrize("name", LOSSES)
def test_a_student_equal_to_the_float16_cache_scores_zero(name):
    """The cache's float16 log-probabilities do not sum to exactly 1: renormalised once, a student equal to
    them scores 0 (unrenormalised, about 1e-4)."""
    z_t = _logits(29)
    cached = torch.log_softmax(z_t, -1).half()
    assert abs(cached.float().exp().sum(-1) - 1).max() > 1e-5
    assert dense_loss(cached.float(), cached, loss=name, **KW).abs().max() < 1e-6
    ids, lp, tail = _topk_cache(z_t, 5)
    lp = lp.half()
    # the student: the cached top k, the cached tail spread evenly over the other ids
    z_s = (tail[:, None] - math.log(V - 5)).expand(N, V).scatter(-1, ids, lp.float())
    assert topk_loss(z_s, ids, lp, tail, loss=name, **KW).abs().max() < 1e-6


def test_teacher_zero_probabilities_count_zero_in_value_and_gradient():
    z_s, z_t = _logits(21), _logits(22)
    z_t[:, :5] = -math.inf  # ids the teacher rules out
    p, s = _softmax(z_t), _softmax(z_s)
    for name in LOSSES:
        out, grad = _value_and_grad(partial(LM_LOSS_FUNCTIONS[name], teacher_logits=z_t, **KW), z_s)
        if name == "reverse_kl":  # the student puts mass where the teacher has none: KL(s || p) is infinite
            assert torch.isinf(out).all()
            continue
        assert torch.isfinite(grad).all(), name
        _close(out, _np_div(name, p, s))


# --------------------------------------------------------------------------- cached top-k


def _topk_cache(z_t: torch.Tensor, k: int, temperature: float = 1.0):
    """What a top-k cache captured at `temperature` holds: ids, their log-probabilities, the exact tail mass."""
    log_p = torch.log_softmax(z_t.double() / temperature, dim=-1)
    top = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, top.indices, -math.inf)
    return top.indices, top.values.float(), torch.logsumexp(rest, dim=-1).float()


@pytest.mark.parametrize("name", LOSSES)
def test_topk_with_k_equal_to_vocab_is_the_dense_loss(name):
    z_s, z_t, t = _logits(7), _logits(8), 2.0
    ids, lp, tail = _topk_cache(z_t, V, t)
    assert torch.isneginf(tail).all()
    dense = partial(dense_loss, logprobs=torch.log_softmax(z_t / t, -1), loss=name, temperature=t, **KW)
    ref, ref_grad = _value_and_grad(dense, z_s)
    for kwargs in ({"tail_logprob": tail}, {"tail_logprob": None}, {"tail": "renormalize"},
                   {"tail_logprob": torch.full((N,), -3.0)}):  # a bucket with no id is empty, whatever is cached
        out, grad = _value_and_grad(partial(topk_loss, topk_ids=ids, topk_logprobs=lp, loss=name, temperature=t,
                                            **kwargs, **KW), z_s)
        _close(out, ref)
        _close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_topk_bucket_is_the_divergence_of_the_coarsened_distributions_and_a_lower_bound(name):
    z_s, z_t = _logits(9), _logits(10)
    for t in (1.0, 2.0):
        p_full, s_full = _softmax(z_t, t), _softmax(z_s, t)
        full = _np_div(name, p_full, s_full)
        for k in (1, 5, 12):
            ids, lp, tail = _topk_cache(z_t, k, t)
            rows, cols = np.arange(N)[:, None], ids.numpy()
            rest = np.ones_like(p_full, dtype=bool)
            rest[rows, cols] = False
            p_coarse, s_coarse = ([x[rows, cols], (x * rest).sum(-1, keepdims=True)] for x in (p_full, s_full))
            ref = _np_div(name, np.concatenate(p_coarse, -1), np.concatenate(s_coarse, -1))
            out = topk_loss(z_s, ids, lp, tail, loss=name, temperature=t, **KW)
            _close(out, ref)
            assert (out.double().numpy() <= full + 1e-6).all()
            # the float16 values a cache stores, and no cached tail (1 - sum, as older caches): close
            _close(topk_loss(z_s, ids, lp.half(), tail, loss=name, temperature=t, **KW), ref, rtol=1e-2, atol=2e-3)
            _close(topk_loss(z_s, ids, lp, None, loss=name, temperature=t, **KW), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_topk_renormalize_is_the_divergence_restricted_to_the_ids(name):
    z_s, z_t, t = _logits(11), _logits(12), 2.0
    for k in (1, 5, 12):
        ids, lp, tail = _topk_cache(z_t, k, t)
        rows = np.arange(N)[:, None]
        p, s = _softmax(z_t, t)[rows, ids.numpy()], _softmax(z_s, t)[rows, ids.numpy()]
        ref = _np_div(name, p / p.sum(-1, keepdims=True), s / s.sum(-1, keepdims=True))
        out = topk_loss(z_s, ids, lp, tail, loss=name, tail="renormalize", temperature=t, **KW)
        _close(out, ref)
        if k == 1:  # one id renormalised is certainty on both sides
            assert (out.abs() < 1e-6).all()


def _student_with_tail(ids: torch.Tensor, tail_mass: float, v: int = V) -> torch.Tensor:
    """Student logits with softmax mass `tail_mass` spread evenly outside `ids`, the rest on `ids`."""
    g = torch.Generator().manual_seed(40)
    z = torch.full((ids.shape[0], v), math.log(tail_mass / (v - ids.shape[1])))
    head = torch.softmax(torch.randn(ids.shape, generator=g), -1) * (1 - tail_mass)
    return z.scatter(-1, ids, head.log())


@pytest.mark.parametrize(("student_tail", "teacher_tail"), [(1e-9, 0.24), (1e-8, 1e-9)])
@pytest.mark.parametrize("name", LOSSES)
def test_topk_bucket_gradient_on_the_tail_ids_with_tails_below_float32_epsilon(name, student_tail, teacher_tail):
    """A student tail far below float32's epsilon (1 - sum of its top-k probabilities rounds to 0): the tail
    ids' gradient still matches float64 autograd of the coarsened divergence, and for forward KL it sums to
    S_tail - p_tail (about -0.24 for an over-confident student). A tail floored at epsilon would be
    wrong (1e-9 vs 1.2e-7) and give these ids almost no gradient."""
    g = torch.Generator().manual_seed(41)
    k = 5
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    head = torch.softmax(torch.randn(N, k, generator=g, dtype=torch.float64), -1) * (1 - teacher_tail)
    lp, tail = head.log().float(), torch.full((N,), math.log(teacher_tail))
    z_s = _student_with_tail(ids, student_tail)
    out, grad = _value_and_grad(partial(topk_loss, topk_ids=ids, topk_logprobs=lp, tail_logprob=tail, loss=name,
                                        **KW), z_s)
    p_coarse = torch.cat([head, torch.full((N, 1), teacher_tail, dtype=torch.float64)], -1)

    def coarse_loss(z):
        s = torch.softmax(z, -1)
        s_tail = s.scatter(-1, ids, 0.0).sum(-1, keepdim=True)  # summed directly in float64
        return _t_div(name, p_coarse, torch.cat([s.gather(-1, ids), s_tail], -1))

    ref_grad = _ref_grad(z_s, coarse_loss)
    tail_ids = torch.ones(N, V, dtype=torch.bool).scatter(-1, ids, False)
    _close(out, coarse_loss(z_s.double()).detach(), rtol=1e-4, atol=1e-6)
    ref_tail = ref_grad[tail_ids]
    _close(grad[tail_ids], ref_tail, rtol=1e-3, atol=1e-3 * ref_tail.abs().max().item())
    _close(grad, ref_grad, rtol=1e-3, atol=1e-5)
    if name == "forward_kl":
        sums = (grad * tail_ids).sum(-1).double()
        _close(sums, torch.full((N,), student_tail - teacher_tail, dtype=torch.float64), rtol=1e-3, atol=0)


def test_topk_bucket_float16_teacher_summing_past_one_stays_finite():
    z_s, z_t = _logits(19), _logits(20, scale=8.0)  # peaked: top 3 hold almost all the mass
    ids, lp, _ = _topk_cache(z_t, 12)
    lp = (lp + 1e-3).half()  # rounded cache values whose probabilities sum past 1
    for name in LOSSES:
        out, grad = _value_and_grad(partial(topk_loss, topk_ids=ids, topk_logprobs=lp, loss=name, **KW), z_s)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


# --------------------------------------------------------------------------- ULD


def _uld_paper(s: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The paper's loss on full distributions: sort both descending, zero-pad the smaller vocabulary, L1."""
    s, p = -np.sort(-s, -1), -np.sort(-p, -1)
    width = max(s.shape[1], p.shape[1])
    s = np.pad(s, ((0, 0), (0, width - s.shape[1])))
    p = np.pad(p, ((0, 0), (0, width - p.shape[1])))
    return np.abs(s - p).sum(-1)


def _uld_paper_torch(s: torch.Tensor, p_sorted: torch.Tensor) -> torch.Tensor:
    """The same in float64 torch, for autograd."""
    s = s.sort(-1, descending=True).values
    width = max(s.shape[1], p_sorted.shape[1])
    return (torch.nn.functional.pad(s, (0, width - s.shape[1]))
            - torch.nn.functional.pad(p_sorted, (0, width - p_sorted.shape[1]))).abs().sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("student_vocab", [V - 8, V + 9])
def test_uld_with_the_whole_teacher_vocabulary_is_the_papers_loss(student_vocab, temperature):
    z_t, z_s = _logits(23), _logits(24, v=student_vocab)
    _, lp, tail = _topk_cache(z_t, V, temperature)
    ref = _uld_paper(_softmax(z_s, temperature), _softmax(z_t, temperature))
    p_sorted = torch.from_numpy(-np.sort(-_softmax(z_t, temperature), -1))
    ref_grad = _ref_grad(z_s, lambda z: _uld_paper_torch(torch.softmax(z / temperature, -1), p_sorted))
    for t in (tail, None):
        out, grad = _value_and_grad(partial(uld_loss, topk_logprobs=lp, tail_logprob=t, temperature=temperature), z_s)
        _close(out, ref)
        _close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    assert uld_loss(z_t[:, perm] / temperature, lp, tail).abs().max() < 1e-5  # a permuted vocabulary: 0


def test_uld_two_students_with_equal_top_k_terms_and_different_tails():
    """Teacher [0.4, 0.3] + five ids of 0.06 (k = 2, tail 0.3). Both students' top-2 terms are 0.1; A's tail
    mass is the teacher's, B's is 0.2: the paper's loss on full distributions gives 0.1 and 0.2, and so does
    the cached top-k + tail form (exact here: each student's tail is proportional to the teacher's)."""
    p = np.array([[0.4, 0.3] + [0.06] * 5])
    students = np.array([[0.45, 0.25] + [0.06] * 5, [0.5, 0.3] + [0.04] * 5])
    lp = torch.tensor([[math.log(0.4), math.log(0.3)]])
    tail = torch.tensor([math.log(0.3)])
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))  # ids in another order: no matter
    out = torch.cat([uld_loss(torch.tensor(s).log()[None, perm].float(), lp, tail) for s in students])
    ref = np.concatenate([_uld_paper(s[None], p) for s in students])
    _close(ref, [0.1, 0.2], atol=1e-12)
    _close(out, ref)
    # a teacher tail of another shape: the cached form is a lower bound of the paper's loss
    p2 = np.array([[0.4, 0.3, 0.2, 0.1]])
    out2 = torch.cat([uld_loss(torch.tensor(s).log()[None].float(), lp, tail) for s in students])
    assert (out2.double().numpy() <= np.concatenate([_uld_paper(s[None], p2) for s in students]) + 1e-6).all()


def test_uld_student_vocabulary_smaller_than_k_is_padded_with_zeros():
    z_t, z_s = _logits(25), _logits(26, v=4)
    _, lp, tail = _topk_cache(z_t, 6)
    p, s = _softmax(z_t), _softmax(z_s)
    p_sorted = -np.sort(-p, -1)
    ref = np.abs(np.pad(-np.sort(-s, -1), ((0, 0), (0, 2))) - p_sorted[:, :6]).sum(-1) + p_sorted[:, 6:].sum(-1)
    _close(uld_loss(z_s, lp, tail), ref)
    assert (ref <= _uld_paper(s, p) + 1e-9).all()


# --------------------------------------------------------------------------- sampled: unbiased through the codec


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_kl_through_the_codec_is_unbiased_in_value_and_gradient(tau, temperature):
    """Draws by the cache encoder at capture temperature T, averaged over many seeded rows: the mean estimate
    and its mean gradient match the dense forward KL at T within 5 standard errors."""
    draws, samples, n, v = 3000, 12, 4, 40
    # teacher log-probabilities float16 can hold, so the cache's rounding adds no bias to compare against
    lp = torch.log_softmax(_logits(27, n, v, scale=1.5), -1).half().float()
    z_t, z_s = lp * temperature, _logits(28, n, v, scale=1.5)
    lm = SimpleNamespace(codec="sampled", k=8, samples=samples, proposal_temperature=tau, seed=0,
                         temperature=temperature)
    fields = _encode_chunk(z_t.repeat(draws, 1), lm, torch.Generator().manual_seed(int(10 * tau + temperature)))
    z = z_s.repeat(draws, 1).requires_grad_(True)  # row d * n + i: draw d of position i
    est = sampled_kl(z, fields["sample_ids"], fields["sample_counts"], fields["sample_logprobs"],
                     fields["proposal_lognorm"], tau, samples=samples, temperature=temperature)
    est.sum().backward()
    p, s = _softmax(z_t, temperature), _softmax(z_s, temperature)
    checks = [(est.detach().double().view(draws, n), rel_entr(p, s).sum(-1)),
              (z.grad.double().view(draws, n, v), (s - p) / temperature)]
    for per_draw, ref in checks:
        mean, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(draws)
        assert (se > 0).all()
        gap = (mean - torch.from_numpy(ref)).abs()
        assert (gap <= 5 * se).all(), (gap / se).max()
    if tau != 1.0:  # without the importance weights p/q the same draws are biased: the test can fail
        naive = sampled_kl(z_s.repeat(draws, 1), fields["sample_ids"], fields["sample_counts"],
                           fields["sample_logprobs"], fields["proposal_lognorm"] * 0, 1.0, samples=samples,
                           temperature=temperature).double().view(draws, n)
        assert ((naive.mean(0) - torch.from_numpy(checks[0][1])).abs() > 5 * checks[0][0].std(0) / math.sqrt(draws)
                ).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kl_empty_slots_count_zero_and_the_student_is_at_temperature(temperature):
    z_s = _logits(19, 2, 5)
    ids = torch.tensor([[1, 0, 0], [4, 2, 0]])
    counts = torch.tensor([[3, 0, 0], [1, 2, 0]], dtype=torch.uint8)
    lp = torch.tensor([[-0.5, -math.inf, 0.0], [-1.0, -2.0, -math.inf]]).half()
    out, grad = _value_and_grad(partial(sampled_kl, sample_ids=ids, sample_counts=counts, sample_logprobs=lp,
                                        proposal_lognorm=torch.zeros(2), samples=3, temperature=temperature), z_s)
    ls = np.log(_softmax(z_s, temperature))
    ref = [-0.5 - ls[0, 1], (-1.0 - ls[1, 4]) / 3 + 2 * (-2.0 - ls[1, 2]) / 3]
    assert torch.isfinite(grad).all()
    _close(out, ref)


# --------------------------------------------------------------------------- chunked == unchunked


def _fns(n: int, v: int):
    g = torch.Generator().manual_seed(20)
    z_t = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    ids, lp, tail = _topk_cache(z_t, 8, 2.0)
    lm = SimpleNamespace(codec="sampled", k=8, samples=6, proposal_temperature=2.0, seed=0, temperature=1.0)
    sampled = _encode_chunk(z_t, lm, torch.Generator().manual_seed(3))
    return {
        "ce": (next_token_ce, {"labels": labels}),
        "dense": (partial(dense_loss, loss="skew_kl", temperature=2.0),
                  {"logprobs": torch.log_softmax(z_t / 2.0, -1).half()}),
        "topk-bucket": (partial(topk_loss, loss="jsd", temperature=2.0),
                        {"topk_ids": ids, "topk_logprobs": lp.half(), "tail_logprob": tail}),
        "topk-renorm": (partial(topk_loss, tail="renormalize", loss="reverse_kl"),
                        {"topk_ids": ids, "topk_logprobs": lp}),
        "sampled": (partial(sampled_kl, proposal_temperature=2.0, samples=6), sampled),
        "jsd": (partial(LM_LOSS_FUNCTIONS["jsd"], beta=0.3), {"teacher_logits": z_t}),
        "uld": (partial(uld_loss, temperature=2.0), {"topk_logprobs": lp, "tail_logprob": tail}),
    }


@pytest.mark.parametrize("name", ["ce", "dense", "topk-bucket", "topk-renorm", "sampled", "jsd", "uld"])
def test_chunked_loss_equals_unchunked_values_and_grads(name):
    n, h, v = 37, 8, 50
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v)
    hidden = torch.randn(n, h, requires_grad=True)
    fn, targets = _fns(n, v)[name]

    full = fn(head(hidden), **targets).sum()
    g_full = torch.autograd.grad(full, [hidden, head.weight, head.bias])
    chunked = chunked_loss(hidden, head, fn, targets, chunk_tokens=10)  # 37 = 3 x 10 + 7: a short last chunk
    g_chunked = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    assert chunked.dtype == torch.float32 and chunked.shape == ()
    _close(chunked, full)
    for a, b in zip(g_chunked, g_full):
        _close(a, b)
    with torch.no_grad():
        _close(chunked_loss(hidden, head, fn, targets, chunk_tokens=1000), full)


def test_chunked_loss_keeps_no_logits_for_backward():
    """Saved tensors outside the checkpointed chunks: none is [chunk, V] (a plain loop would save several)."""
    n, h, v, chunk = 40, 8, 64, 16
    head = torch.nn.Linear(h, v)
    hidden = torch.randn(n, h, requires_grad=True)
    targets = {"labels": torch.randint(0, v, (n,))}
    widths: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        widths.append(t.shape[-1] if t.dim() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_loss(hidden, head, next_token_ce, targets, chunk_tokens=chunk).backward()
    assert v not in widths and hidden.grad is not None
    widths.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        next_token_ce(head(hidden), targets["labels"]).sum()
    assert v in widths  # the hook does see logits when nothing recomputes them


def test_chunked_loss_no_tokens_is_zero():
    head = torch.nn.Linear(4, 9)
    hidden = torch.zeros(0, 4, requires_grad=True)
    out = chunked_loss(hidden, head, next_token_ce, {"labels": torch.zeros(0, dtype=torch.long)})
    out.backward()
    assert out.item() == 0.0


# --------------------------------------------------------------------------- alignment by character offsets


def test_align_by_offsets_pairs_positions_predicting_the_same_character():
    # "the cat sat." as teacher: the| cat| sat|.   student: th|e| c|at| sat.
    teacher = torch.tensor([[0, 3], [3, 7], [7, 11], [11, 12]])
    student = torch.tensor([[0, 2], [2, 3], [3, 5], [5, 7], [7, 12]])
    s_pos, t_pos = align_by_offsets(student, teacher)
    # teacher next starts 3, 7, 11; student next starts 2, 3, 5, 7: shared 3 and 7
    assert s_pos.tolist() == [1, 3] and t_pos.tolist() == [0, 1]
    assert s_pos.dtype == t_pos.dtype == torch.int64
    s_back, t_back = align_by_offsets(teacher, student)
    assert s_back.tolist() == [0, 1] and t_back.tolist() == [1, 3]


def test_align_by_offsets_with_a_zero_width_eos_pairs_the_first_position_only():
    # "ab\ncd": teacher ab|</s>(2,2)|cd (the "\n" joins documents); student a|b|\n|cd
    teacher = torch.tensor([[0, 2], [2, 2], [3, 5]])
    student = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 5]])
    s_pos, t_pos = align_by_offsets(student, teacher)
    assert list(zip(s_pos.tolist(), t_pos.tolist())) == [(1, 0), (2, 1)]
    # two positions of one side whose next tokens start at 2 ("\n" zero-width EOS then "\n"): the first pairs
    student2 = torch.tensor([[0, 2], [2, 2], [2, 3], [3, 5]])
    s_pos, t_pos = align_by_offsets(student2, teacher)
    assert list(zip(s_pos.tolist(), t_pos.tolist())) == [(0, 0), (2, 1)]
    empty_s, empty_t = align_by_offsets(student, teacher[:1])
    assert empty_s.numel() == empty_t.numel() == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call", [
    lambda: dense_loss(torch.zeros(3, 5), torch.zeros(3, 6)),
    lambda: dense_loss(torch.zeros(3, 5), torch.zeros(3, 5), temperature=0.0),
    lambda: dense_loss(torch.zeros(3, 5), torch.zeros(3, 5), loss="kl"),
    lambda: next_token_ce(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)),
    lambda: topk_loss(torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), tail="drop"),
    lambda: topk_loss(torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3)),
    lambda: topk_loss(torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(3, 1)),
    lambda: sampled_kl(torch.zeros(3, 5), *[torch.zeros(3, 2)] * 3, torch.zeros(3), samples=0),
    lambda: generalized_jsd(torch.zeros(3, 5), torch.zeros(3, 5), beta=1.5),
    lambda: LM_LOSS_FUNCTIONS["skew_kl"](torch.zeros(3, 5), torch.zeros(3, 5), alpha=-0.1),
    lambda: LM_LOSS_FUNCTIONS["tvd"](torch.zeros(3, 5), torch.zeros(3, 4)),
    lambda: divergence("jsd", torch.zeros(3, 5), torch.zeros(3, 4)),
    lambda: uld_loss(torch.zeros(3, 5), torch.zeros(3, 2), torch.zeros(2)),
    lambda: chunked_loss(torch.zeros(4, 2), torch.nn.Linear(2, 3), next_token_ce, {"labels": torch.zeros(4)}, 0),
    lambda: chunked_loss(torch.zeros(4, 2), torch.nn.Linear(2, 3), next_token_ce, {"labels": torch.zeros(3)}),
    lambda: chunked_loss(torch.zeros(4, 2), torch.nn.Linear(2, 3), lambda z: z, {}),
    lambda: align_by_offsets(torch.zeros(4, 3), torch.zeros(4, 2)),
    lambda: align_by_offsets(torch.tensor([[0, 1], [5, 6], [2, 3]]), torch.zeros(4, 2)),
])
def test_bad_input_is_one_line_error(call):
    with pytest.raises(LMLossInputError) as err:
        call()
    assert isinstance(err.value, KDError) and "\n" not in str(err.value)


def test_an_error_inside_a_chunk_leaves_autograd_working():
    with pytest.raises(LMLossInputError) as err:  # keeps the traceback alive, as a notebook or a logger would
        chunked_loss(torch.zeros(4, 2), torch.nn.Linear(2, 3), lambda z: z, {})
    x = torch.randn(3, requires_grad=True)
    (x * x).sum().backward()
    assert torch.equal(x.grad, 2 * x) and "per-token loss" in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunked_loss_on_cuda_matches_cpu():
    n, h, v = 300, 16, 1000
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v)
    hidden = torch.randn(n, h)
    fn, targets = _fns(n, v)["topk-bucket"]
    results = []
    for device in ("cpu", "cuda"):
        hd = hidden.detach().clone().to(device).requires_grad_(True)  # a fresh leaf on each device
        hm = copy.deepcopy(head).to(device)
        out = chunked_loss(hd, hm, fn, {k: t.to(device) for k, t in targets.items()}, chunk_tokens=64)
        out.backward()
        results.append((out.detach().cpu(), hd.grad.cpu(), hm.weight.grad.cpu()))
        hm.weight.grad = None
    for a, b in zip(*results):
        _close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_normalized_inputs_give_the_same_kd_values_and_gradients(temperature):
    """The distill loop may pass the student's log-probabilities at T (one log-softmax shared with the CE term
    when T = 1): same result as the logits."""
    z_s, z_t = _logits(30), _logits(31)
    ids, lp, tail = _topk_cache(z_t, 5, temperature)
    lm = SimpleNamespace(codec="sampled", k=8, samples=6, proposal_temperature=1.5, seed=0, temperature=1.0)
    sampled = _encode_chunk(z_t, lm, torch.Generator().manual_seed(3))
    fns = [partial(topk_loss, topk_ids=ids, topk_logprobs=lp, tail_logprob=tail, tail=tail_kind, loss="jsd")
           for tail_kind in ("bucket", "renormalize")]
    fns += [partial(dense_loss, logprobs=torch.log_softmax(z_t / temperature, -1), loss="skew_reverse_kl"),
            partial(sampled_kl, **sampled, proposal_temperature=1.5, samples=6)]
    for fn in fns:
        ref, ref_grad = _value_and_grad(partial(fn, temperature=temperature), z_s)
        out, grad = _value_and_grad(
            lambda z, fn=fn: fn(torch.log_softmax(z / temperature, dim=-1), normalized=True), z_s)
        _close(out, ref)
        _close(grad, ref_grad)


# --------------------------------------------------------------------------- the names come from stages/kinds.py


def test_every_lm_loss_and_codec_name_has_its_function_and_setting():
    """stages/kinds.py names the codecs and KD losses; losses/lm.py attaches a function to each name and the
    settings accept exactly those names."""
    from typing import get_args

    from stages.config import LMCacheConfig, LMDistillConfig
    from stages.kinds import LM_CODECS, TOPK_TAILS

    assert list(LM_LOSS_FUNCTIONS) == list(LM_LOSSES) == ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl",
                                                           "skew_reverse_kl"]
    assert list(CODEC_LOSSES) == list(LM_CODECS) == ["dense", "topk", "sampled"]
    assert CODEC_LOSSES["dense"] is dense_loss and CODEC_LOSSES["topk"] is topk_loss
    assert CODEC_LOSSES["sampled"] is sampled_kl
    for name, kind in LM_LOSSES.items():  # a dense cache serves every loss, a top-k one too
        assert {"dense", "topk"} <= set(kind.codecs), name
    assert [n for n, kind in LM_LOSSES.items() if "sampled" in kind.codecs] == ["forward_kl"]
    assert get_args(LMCacheConfig.model_fields["codec"].annotation) == tuple(LM_CODECS)
    assert get_args(LMDistillConfig.model_fields["loss"].annotation) == tuple(LM_LOSSES)
    assert get_args(LMDistillConfig.model_fields["topk_tail"].annotation) == TOPK_TAILS == ("bucket", "renormalize")
    options = [k for c in LM_CODECS.values() for k in c.options] + [k for x in LM_LOSSES.values() for k in x.options]
    assert set(options) <= set(LMCacheConfig.model_fields) | set(LMDistillConfig.model_fields)
    with pytest.raises(LMLossInputError, match="valid: bucket, renormalize"):
        topk_loss(_logits(0), torch.zeros(N, 2, dtype=torch.long), torch.zeros(N, 2), tail="other")
    with pytest.raises(LMLossInputError, match="valid: forward_kl, reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl"):
        divergence("other", torch.zeros(N, 2), torch.zeros(N, 2))
