"""Causal-LM losses against naive float64 formulas written out here, on small random tensors (CPU)."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch

from cache_format import KDError
from stages.losses import LMLossInputError, align_by_offsets, chunked_loss, dense_kl, forward_kl, generalized_jsd, next_token_ce, reverse_kl, sampled_kl, topk_kl, uld_loss

N, V = 7, 23


def _logits(seed: int, n: int = N, v: int = V, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def _probs(z: torch.Tensor, temperature: float = 1.0) -> list[list[float]]:
    """Softmax written out in float64 Python."""
    out = []
    for row in z.double().tolist():
        e = [math.exp(x / temperature - max(row) / temperature) for x in row]
        out.append([x / sum(e) for x in e])
    return out


def _kl_ref(p: list[list[float]], q: list[list[float]]) -> torch.Tensor:
    return torch.tensor([sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr) if pi > 0) for pr, qr in zip(p, q)])


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- values vs naive formulas


def test_next_token_ce_matches_naive_and_ignores_minus_100():
    z = _logits(0)
    labels = torch.tensor([3, 0, 22, -100, 5, -100, 1])
    s = _probs(z)
    ref = torch.tensor([0.0 if y < 0 else -math.log(s[i][y]) for i, y in enumerate(labels.tolist())])
    out = next_token_ce(z, labels)
    assert out.dtype == torch.float32 and out.shape == (N,)
    _close(out, ref)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_kl_matches_teacher_softmax_at_temperature(temperature):
    z_s, z_t = _logits(1), _logits(2)
    logprobs = torch.log_softmax(z_t, dim=-1)  # what the cache holds: temperature 1
    ref = _kl_ref(_probs(z_t, temperature), _probs(z_s, temperature))
    _close(dense_kl(z_s, logprobs, temperature), ref)
    _close(dense_kl(z_s, logprobs.half(), temperature), ref, rtol=2e-2, atol=2e-3)  # float16 cache
    assert dense_kl(z_t, logprobs, temperature).abs().max() < 1e-5


def _topk_teacher(z_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.log_softmax(z_t, dim=-1).topk(k, dim=-1)
    return top.indices, top.values


@pytest.mark.parametrize("k", [1, 5, 12])
def test_topk_kl_bucket_is_exact_kl_of_k_ids_plus_tail(k):
    z_s, z_t = _logits(3), _logits(4)
    ids, lp = _topk_teacher(z_t, k)
    p, s = _probs(z_t), _probs(z_s)
    ref = []
    for i, row in enumerate(ids.tolist()):
        head = sum(p[i][j] * math.log(p[i][j] / s[i][j]) for j in row)
        p_tail = sum(p[i][j] for j in range(V) if j not in row)
        s_tail = sum(s[i][j] for j in range(V) if j not in row)
        ref.append(head + p_tail * math.log(p_tail / s_tail))
    _close(topk_kl(z_s, ids, lp, tail="bucket"), torch.tensor(ref))


@pytest.mark.parametrize("k", [1, 5, 12])
def test_topk_kl_renormalize_is_kl_restricted_to_the_ids(k):
    z_s, z_t = _logits(5), _logits(6)
    ids, lp = _topk_teacher(z_t, k)
    p, s = _probs(z_t), _probs(z_s)
    ref = []
    for i, row in enumerate(ids.tolist()):
        zp, zs = sum(p[i][j] for j in row), sum(s[i][j] for j in row)
        ref.append(sum(p[i][j] / zp * math.log((p[i][j] / zp) / (s[i][j] / zs)) for j in row))
    out = topk_kl(z_s, ids, lp, tail="renormalize")
    _close(out, torch.tensor(ref))
    if k == 1:  # one id renormalised is certainty on both sides
        assert (out.abs() < 1e-6).all()


def test_topk_kl_with_k_equal_to_vocab_is_full_forward_kl():
    z_s, z_t = _logits(7), _logits(8)
    ids, lp = _topk_teacher(z_t, V)
    full = forward_kl(z_s, z_t)
    _close(topk_kl(z_s, ids, lp, tail="bucket"), full)
    _close(topk_kl(z_s, ids, lp, tail="renormalize"), full)


def test_topk_kl_bucket_float16_teacher_summing_past_one_stays_finite():
    z_s, z_t = _logits(9), _logits(10, scale=8.0)  # peaked: top 3 hold almost all the mass
    ids, lp = _topk_teacher(z_t, V)
    lp = (lp + 1e-3).half()  # rounded cache values whose probabilities sum past 1
    z_s.requires_grad_(True)
    out = topk_kl(z_s, ids, lp)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z_s.grad).all()
    _close(out, forward_kl(z_s, z_t), rtol=0, atol=5e-2)


def test_forward_reverse_kl_and_jsd_match_naive():
    z_s, z_t = _logits(11), _logits(12)
    for t in (1.0, 2.0):
        p, s = _probs(z_t, t), _probs(z_s, t)
        _close(forward_kl(z_s, z_t, t), _kl_ref(p, s))
        _close(reverse_kl(z_s, z_t, t), _kl_ref(s, p))
        for beta in (0.1, 0.5, 0.9):
            m = [[beta * pi + (1 - beta) * si for pi, si in zip(pr, sr)] for pr, sr in zip(p, s)]
            ref = beta * _kl_ref(p, m) + (1 - beta) * _kl_ref(s, m)
            _close(generalized_jsd(z_s, z_t, beta, t), ref)


def test_jsd_endpoints_are_the_limits_forward_and_reverse_kl():
    z_s, z_t = _logits(13), _logits(14)
    _close(generalized_jsd(z_s, z_t, 0.0), forward_kl(z_s, z_t))
    _close(generalized_jsd(z_s, z_t, 1.0), reverse_kl(z_s, z_t))
    # JSD(beta) / beta -> forward KL as beta -> 0, JSD / (1 - beta) -> reverse KL as beta -> 1; the gap is
    # about beta * chi^2 / 2, so milder logits
    z_s, z_t, eps = _logits(13, scale=1.0), _logits(14, scale=1.0), 1e-3
    _close(generalized_jsd(z_s, z_t, eps) / eps, forward_kl(z_s, z_t), rtol=1e-2, atol=1e-4)
    _close(generalized_jsd(z_s, z_t, 1 - eps) / eps, reverse_kl(z_s, z_t), rtol=1e-2, atol=1e-4)
    _close(generalized_jsd(z_s, z_t, 0.5), generalized_jsd(z_t, z_s, 0.5))  # symmetric at 0.5


def test_uld_matches_naive_and_is_zero_for_a_permuted_vocabulary():
    z_t = _logits(15)
    k = 6
    _, lp = _topk_teacher(z_t, k)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    assert uld_loss(z_t[:, perm], lp).abs().max() < 1e-6
    # a student with another (smaller) vocabulary: sorted L1 over the k largest probabilities
    z_s = _logits(16, v=V - 5)
    s, p = _probs(z_s), _probs(z_t)
    ref = torch.tensor([sum(abs(a - b) for a, b in zip(sorted(sr, reverse=True)[:k], sorted(pr, reverse=True)[:k]))
                        for sr, pr in zip(s, p)])
    _close(uld_loss(z_s, lp), ref)
    assert (ref > 1e-2).all()
    # a vocabulary smaller than k is padded with zero probabilities
    _close(uld_loss(z_s[:, :4], lp), torch.tensor(
        [sum(abs(a - b) for a, b in zip(sorted(sr, reverse=True) + [0.0, 0.0], sorted(pr, reverse=True)[:k]))
         for sr, pr in zip(_probs(z_s[:, :4]), p)]))


# --------------------------------------------------------------------------- sampled: unbiased


def _sample_fields(z_t: torch.Tensor, draws: int, samples: int, tau: float, seed: int):
    """`draws` independent cache rows per position: `samples` ids from q ~ p^(1/tau), as unique ids + counts."""
    log_p = torch.log_softmax(z_t.double(), dim=-1)
    lognorm = torch.logsumexp(log_p / tau, dim=-1)
    q = torch.exp(log_p / tau - lognorm[:, None]).repeat(draws, 1)  # row d * n + i: draw d of position i
    ids = torch.multinomial(q, samples, replacement=True, generator=torch.Generator().manual_seed(seed))
    counts_full = torch.zeros_like(q).scatter_add_(1, ids, torch.ones_like(ids, dtype=q.dtype))
    counts, uniq = counts_full.topk(samples, dim=-1)  # every drawn id (<= samples of them), then empty slots
    uniq = torch.where(counts > 0, uniq, torch.zeros_like(uniq))
    rows_lp = log_p.repeat(draws, 1).gather(1, uniq)
    return uniq, counts.to(torch.uint8), rows_lp.half(), lognorm.float().repeat(draws)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_kl_mean_over_draws_approaches_full_kl(tau):
    draws, samples, n, v = 4000, 12, 4, 40
    z_s, z_t = _logits(17, n, v, scale=2.0), _logits(18, n, v, scale=2.0)
    # the estimator's log p comes from the float16 cache; compare with the KL of that same rounded teacher
    z_t = torch.log_softmax(z_t, dim=-1).half().float()
    full = forward_kl(z_s, z_t).double()
    ids, counts, lp, lognorm = _sample_fields(z_t, draws, samples, tau, seed=int(tau))
    est = sampled_kl(z_s.repeat(draws, 1), ids, counts, lp, lognorm, tau, samples=samples).double().view(draws, n)
    mean, std = est.mean(0), est.std(0)
    tol = 4 * std / math.sqrt(draws)  # 4 standard errors of the mean: deterministic here (fixed seeds)
    assert (std > 0).all() and ((mean - full).abs() < tol).all(), (mean, full, tol)
    if tau != 1.0:  # without the importance weights p/q the same draws are biased: the test can fail
        naive = sampled_kl(z_s.repeat(draws, 1), ids, counts, lp, lognorm * 0, 1.0, samples=samples)
        assert ((naive.double().view(draws, n).mean(0) - full).abs() > tol).any()


def test_sampled_kl_empty_slots_count_zero():
    z_s = _logits(19, 2, 5)
    ids = torch.tensor([[1, 0, 0], [4, 2, 0]])
    counts = torch.tensor([[3, 0, 0], [1, 2, 0]], dtype=torch.uint8)
    lp = torch.tensor([[-0.5, -math.inf, 0.0], [-1.0, -2.0, -math.inf]]).half()
    z_s.requires_grad_(True)
    out = sampled_kl(z_s, ids, counts, lp, torch.zeros(2), samples=3)
    out.sum().backward()
    ls = torch.log_softmax(z_s, dim=-1).detach()
    ref = torch.tensor([-0.5 - ls[0, 1], (-1.0 - ls[1, 4]) / 3 + 2 * (-2.0 - ls[1, 2]) / 3])
    assert torch.isfinite(z_s.grad).all()
    _close(out, ref)


def test_teacher_zero_probabilities_count_zero_in_value_and_gradient():
    z_s, z_t = _logits(21), _logits(22)
    z_t[:, :5] = -math.inf  # ids the teacher rules out
    z_s.requires_grad_(True)
    for loss in (forward_kl(z_s, z_t), generalized_jsd(z_s, z_t, 0.3), dense_kl(z_s, torch.log_softmax(z_t, -1))):
        z_s.grad = None
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(z_s.grad).all()
    p, s = _probs(z_t), _probs(z_s.detach())
    _close(forward_kl(z_s, z_t), _kl_ref(p, s))


# --------------------------------------------------------------------------- chunked == unchunked


def _fns(n: int, v: int):
    g = torch.Generator().manual_seed(20)
    z_t = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    ids, lp = _topk_teacher(z_t, 8)
    s_ids, s_counts, s_lp, s_norm = _sample_fields(z_t, 1, 6, 2.0, seed=3)
    return {
        "ce": (next_token_ce, {"labels": labels}),
        "dense": (partial(dense_kl, temperature=2.0), {"logprobs": torch.log_softmax(z_t, -1).half()}),
        "topk-bucket": (topk_kl, {"topk_ids": ids, "topk_logprobs": lp.half()}),
        "topk-renorm": (partial(topk_kl, tail="renormalize"), {"topk_ids": ids, "topk_logprobs": lp}),
        "sampled": (partial(sampled_kl, proposal_temperature=2.0, samples=6),
                    {"sample_ids": s_ids, "sample_counts": s_counts, "sample_logprobs": s_lp,
                     "proposal_lognorm": s_norm}),
        "jsd": (partial(generalized_jsd, beta=0.3), {"teacher_logits": z_t}),
        "uld": (uld_loss, {"topk_logprobs": lp}),
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
    lambda: dense_kl(torch.zeros(3, 5), torch.zeros(3, 6)),
    lambda: dense_kl(torch.zeros(3, 5), torch.zeros(3, 5), temperature=0.0),
    lambda: next_token_ce(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)),
    lambda: topk_kl(torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), tail="drop"),
    lambda: topk_kl(torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3)),
    lambda: sampled_kl(torch.zeros(3, 5), *[torch.zeros(3, 2)] * 3, torch.zeros(3), samples=0),
    lambda: generalized_jsd(torch.zeros(3, 5), torch.zeros(3, 5), beta=1.5),
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


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_normalized_inputs_give_the_same_kd_values_and_gradients(tail):
    """The distill loop passes log-probabilities (one log-softmax shared with the CE term): same result."""
    z_s, z_t = _logits(30), _logits(31)
    ids, lp = _topk_teacher(z_t, 5)
    s_ids, counts, s_lp, lognorm = _sample_fields(torch.log_softmax(z_t, dim=-1), 3, 6, 1.5, seed=3)
    for fn in (partial(topk_kl, topk_ids=ids, topk_logprobs=lp, tail=tail),
               partial(sampled_kl, sample_ids=s_ids, sample_counts=counts, sample_logprobs=s_lp,
                       proposal_lognorm=lognorm, proposal_temperature=1.5, samples=6)):
        a = z_s.repeat(3, 1) if fn.func is sampled_kl else z_s.clone()
        b = a.clone()
        a.requires_grad_(True)
        b.requires_grad_(True)
        ref = fn(a)
        out = fn(torch.log_softmax(b, dim=-1), normalized=True)
        ref.sum().backward()
        out.sum().backward()
        _close(out, ref)
        _close(b.grad, a.grad)


# --------------------------------------------------------------------------- the names come from stages/kinds.py


def test_every_lm_loss_and_codec_name_has_its_function_and_setting():
    """stages/kinds.py names the codecs and KD losses; losses/lm.py attaches a function to each name and the
    settings accept exactly those names."""
    from typing import get_args

    from stages.config import LMCacheConfig, LMDistillConfig
    from stages.kinds import LM_CODECS, LM_LOSSES, TOPK_TAILS
    from stages.losses import CODEC_LOSSES, LM_LOSS_FUNCTIONS

    assert list(LM_LOSS_FUNCTIONS) == list(LM_LOSSES) == ["forward_kl", "reverse_kl", "jsd"]
    assert list(CODEC_LOSSES) == list(LM_CODECS) == ["dense", "topk", "sampled"]
    assert LM_LOSS_FUNCTIONS["jsd"] is generalized_jsd and CODEC_LOSSES["topk"] is topk_kl
    assert get_args(LMCacheConfig.model_fields["codec"].annotation) == tuple(LM_CODECS)
    assert get_args(LMDistillConfig.model_fields["loss"].annotation) == tuple(LM_LOSSES)
    assert get_args(LMDistillConfig.model_fields["topk_tail"].annotation) == TOPK_TAILS == ("bucket", "renormalize")
    options = [k for c in LM_CODECS.values() for k in c.options] + [k for x in LM_LOSSES.values() for k in x.options]
    assert set(options) <= set(LMCacheConfig.model_fields) | set(LMDistillConfig.model_fields)
    with pytest.raises(LMLossInputError, match="valid: bucket, renormalize"):
        topk_kl(_logits(0), torch.zeros(N, 2, dtype=torch.long), torch.zeros(N, 2), tail="other")
