"""Causal-LM distillation losses, per token, and a chunked driver that never holds the full [N, V] logits.

Every per-token function takes the student's logits ``[n, V]`` (any float dtype; computed in float32) and
returns ``[n]`` float32 losses, one per position. ``chunked_loss`` sums one of them over all positions,
``chunk_tokens`` rows of hidden states at a time, recomputing each chunk's logits in backward
(activation checkpointing, as Liger's and torchtune's chunked losses avoid materialising ``[B, T, V]``).
The mean over tokens and any temperature-squared factor are the caller's business.

Notation: p = teacher distribution, s = student distribution, KL(p || s) = sum_x p(x) (log p(x) - log s(x));
terms with p(x) = 0 count 0. Temperature T: a cache holds the teacher's log-probabilities at the temperature it
was captured at (its logits divided by T before the log-softmax), so the cached losses never rescale them and put
only the student at T, s = softmax(logits / T); the online losses put both at T.

Pure torch: no I/O, no imports from ``stages`` but the loss and codec names of ``stages/kinds.py``; the
tables at the end attach a function to each name there.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cache_format import KDError
from stages.kinds import LM_LOSSES, TOPK_TAILS

__all__ = [
    "auto_chunk_tokens",
    "LMLossInputError",
    "align_by_offsets",
    "chunked_loss",
    "divergence",
    "dense_loss",
    "forward_kl",
    "generalized_jsd",
    "next_token_ce",
    "reverse_kl",
    "sampled_kl",
    "topk_loss",
    "uld_loss",
    "LM_LOSS_FUNCTIONS",
    "CODEC_LOSSES",
]

# 1 - sum(probs) is only resolved to float32's epsilon near 1: a smaller tail mass is rounding noise.
_TAIL_FLOOR = torch.finfo(torch.float32).eps
_LN2 = math.log(2.0)
_NEG_INF = -math.inf


class LMLossInputError(KDError, ValueError):
    """Tensors or settings given to a language-model loss do not fit together."""


# --------------------------------------------------------------------------- helpers


def _check_logits(logits: Tensor, what: str, **per_token: Tensor) -> None:
    """``logits`` is [n, V] and every other tensor has n rows."""
    if logits.dim() != 2:
        raise LMLossInputError(f"{what}: logits have shape {tuple(logits.shape)}; pass [tokens, vocab] "
                               "(flatten batch and time first)")
    for name, t in per_token.items():
        if t.shape[:1] != logits.shape[:1]:
            raise LMLossInputError(f"{what}: {name} has shape {tuple(t.shape)} but logits have "
                                   f"{logits.shape[0]} rows; pass one row per token")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise LMLossInputError(f"temperature must be a finite number > 0, got {temperature}; "
                               "set distill.kd.temperature to e.g. 1.0")
    return t


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_x a (log a - log b) over the last axis.

    Terms with a = 0 count 0 whatever b is (0 too), with finite gradients: the outer where gives them 0, and
    log a reaches the product only through a where too (a where's backward selects rather than multiplies, so
    the unused branch's 0 * inf = NaN is dropped before it reaches log a or b). Where a > 0 and b = 0 the value
    is inf, as it should be.
    """
    zero = log_a == _NEG_INF
    safe_a = torch.where(zero, torch.zeros_like(log_a), log_a)
    return torch.where(zero, torch.zeros_like(log_a), safe_a.exp() * (safe_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b), elementwise, w in [0, 1]; -inf where both weighted terms are 0.

    torch.logaddexp of two -inf is -inf with a NaN gradient (even times 0): an id both sides rule out (-inf
    logits, as a padded vocabulary has) would carry it into every logit's gradient through the log-softmax.
    """
    x = log_a + (math.log(w) if w > 0 else _NEG_INF)
    y = log_b + (math.log1p(-w) if w < 1 else _NEG_INF)
    empty = (x == _NEG_INF) & (y == _NEG_INF)
    zeros = torch.zeros_like(x)
    mixed = torch.logaddexp(torch.where(empty, zeros, x), torch.where(empty, zeros, y))
    return torch.where(empty, torch.full_like(x, _NEG_INF), mixed)


def _check_weight(value: float, name: str, setting: str) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise LMLossInputError(f"{name} must be in [0, 1], got {value}; set {setting}")
    return v


def divergence(name: str, log_p: Tensor, log_s: Tensor, *, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """Divergence ``name`` (a key of ``stages.kinds.LM_LOSSES``) per row between two normalised
    log-distributions on the same support (last axis): ``log_p`` the teacher's, ``log_s`` the student's.

    - forward_kl: KL(p || s).  reverse_kl: KL(s || p).
    - jsd: generalised JSD (GKD, Agarwal et al. 2024; TRL's GKDTrainer): m = beta p + (1 - beta) s,
      beta KL(p || m) + (1 - beta) KL(s || m). It tends to 0 at both ends of beta, so beta = 0 returns its limit
      JSD / beta = KL(p || s) and beta = 1 its limit JSD / (1 - beta) = KL(s || p), as TRL does.
    - tvd: 0.5 sum |p - s|.
    - skew_kl: KL(p || alpha p + (1 - alpha) s); skew_reverse_kl: KL(s || alpha s + (1 - alpha) p): the skew KL
      and skew reverse KL of DistiLLM (Ko et al., ICML 2024, arXiv 2402.03898, Definition 1; alpha 0.1 there).
      Its reference code (distillm/losses.py) drops the teacher's entropy from skew_kl, a constant that changes
      the value, not the gradient: here it is the divergence, 0 when s = p.

    Zero probabilities count 0 on either side, with finite gradients. Returns [rows] float32.
    """
    if name not in LM_LOSSES:
        raise LMLossInputError(f"unknown loss {name!r}; valid: {', '.join(LM_LOSSES)}")
    if log_p.shape != log_s.shape:
        raise LMLossInputError(f"divergence: teacher {tuple(log_p.shape)} and student {tuple(log_s.shape)} "
                               "log-probabilities differ in shape; pass both over the same support")
    log_p, log_s = log_p.float(), log_s.float()
    if name == "forward_kl":
        return _kl(log_p, log_s)
    if name == "reverse_kl":
        return _kl(log_s, log_p)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_s.exp()).abs().sum(-1)
    if name == "jsd":
        beta = _check_weight(beta, "jsd beta", "distill.lm.jsd_beta")
        if beta == 0.0:
            return _kl(log_p, log_s)
        if beta == 1.0:
            return _kl(log_s, log_p)
        log_m = _log_mix(log_p, log_s, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    alpha = _check_weight(alpha, "skew alpha", "distill.lm.skew_alpha")
    if name == "skew_kl":
        return _kl(log_p, _log_mix(log_p, log_s, alpha))
    return _kl(log_s, _log_mix(log_s, log_p, alpha))  # skew_reverse_kl


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate near 0 and near -inf (Maechler 2012), a clamped to the tail floor.

    The clamp keeps both branches finite (so their gradients are too) and floors the tail mass at
    float32's epsilon, below which 1 - sum(probs) is rounding noise.
    """
    a = a.clamp(max=math.log1p(-_TAIL_FLOOR))
    return torch.where(a > -_LN2, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


# --------------------------------------------------------------------------- chunking


def _log_probs(logits: Tensor, normalized: bool, temperature: float = 1.0) -> Tensor:
    """The student's log-probabilities at ``temperature``; ``normalized``: ``logits`` already are."""
    if normalized:
        return logits.float()
    return F.log_softmax(logits.float() / temperature, dim=-1)


def auto_chunk_tokens(vocab_size: int, elements: int = 1 << 23) -> int:
    """Tokens per chunk so that one chunk's float32 logits hold `elements` values (32 MiB by default): the
    peak memory of `chunked_loss` then stays flat as the vocabulary grows."""
    return max(1, elements // max(1, vocab_size))


def chunked_loss(hidden: Tensor, head: nn.Module, fn: Callable[..., Tensor], targets: dict[str, Tensor],
                 chunk_tokens: int = 1024) -> Tensor:
    """Sum over tokens of ``fn(logits_chunk [n, V] float32, **{k: v[chunk]})`` -> [n] per-token losses.

    ``hidden`` [N, H] (already gathered to the positions that count); each chunk's logits =
    ``head(hidden_chunk)``, recomputed in backward (``torch.utils.checkpoint``), so peak memory is one
    chunk's [n, V], not [N, V]. Value and gradients equal the unchunked computation. Bind settings such as
    ``temperature`` or ``tail`` with ``functools.partial``; every tensor in ``targets`` is cut by rows.
    Returns a float32 scalar.
    """
    if chunk_tokens < 1:
        raise LMLossInputError(f"chunk_tokens must be >= 1, got {chunk_tokens}; set distill.lm.chunk_tokens "
                               "to e.g. 1024")
    if hidden.dim() != 2:
        raise LMLossInputError(f"chunked_loss: hidden has shape {tuple(hidden.shape)}; pass [tokens, hidden] "
                               "gathered to the positions that count")
    n = hidden.shape[0]
    for name, t in targets.items():
        if t.shape[:1] != (n,):
            raise LMLossInputError(f"chunked_loss: target {name} has shape {tuple(t.shape)} but hidden has "
                                   f"{n} rows; pass one row per token")

    def chunk_sum(h: Tensor, chunk_targets: dict[str, Tensor]) -> Tensor:
        per_token = fn(head(h).float(), **chunk_targets)
        if per_token.shape != h.shape[:1]:
            raise LMLossInputError(f"chunked_loss: the loss returned shape {tuple(per_token.shape)}; a "
                                   f"per-token loss must return [{h.shape[0]}]")
        return per_token.float().sum()

    parts = []
    for start in range(0, n, chunk_tokens):
        h = hidden[start:start + chunk_tokens]
        chunk_targets = {k: v[start:start + chunk_tokens] for k, v in targets.items()}
        if not torch.is_grad_enabled():
            parts.append(chunk_sum(h, chunk_targets))
            continue
        try:
            parts.append(checkpoint(chunk_sum, h, chunk_targets, use_reentrant=False))
        except BaseException as e:
            # torch before 2.13 (2.11 seen) leaves the chunk's saved-tensor hooks installed for as long as the
            # traceback lives, which breaks every later backward; clearing its frames removes them.
            traceback.clear_frames(e.__traceback__)
            raise
    if not parts:  # no tokens: 0, still attached to the graph
        return hidden.float().sum()
    return torch.stack(parts).sum()


# --------------------------------------------------------------------------- losses on labels and cached teachers


def next_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each position's next token ``labels`` [n]; labels -100 are ignored (loss 0 there)."""
    _check_logits(logits, "next_token_ce", labels=labels)
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=-100, reduction="none")


def _teacher_tail(topk_logprobs: Tensor, tail_logprob: Tensor | None) -> Tensor:
    """The teacher's log mass outside its k ids: the cached ``tail_logprob``, or else log(1 - sum exp(topk)).

    The fallback floors the tail at float32's epsilon, also where rounded (float16) top-k probabilities sum past
    1: below it 1 - sum is rounding noise, and an empty tail would make reverse KL infinite.
    """
    if tail_logprob is not None:
        return tail_logprob.float()
    return _log1mexp(torch.logsumexp(topk_logprobs.float(), dim=-1))


def dense_loss(logits: Tensor, logprobs: Tensor, *, loss: str = "forward_kl", temperature: float = 1.0,
               beta: float = 0.5, alpha: float = 0.1, normalized: bool = False) -> Tensor:
    """Divergence ``loss`` per token against a dense cache: the teacher's log-probabilities ``logprobs`` [n, V],
    already at the cache's temperature T, so only the student is put at T: s = softmax(logits / T).

    The cached values are float16-rounded: one log-softmax renormalises them. ``normalized=True``: ``logits``
    are already the student's log-probabilities at T (one log-softmax shared with the cross-entropy term).
    """
    _check_logits(logits, "dense_loss", logprobs=logprobs)
    if logprobs.shape != logits.shape:
        raise LMLossInputError(f"dense_loss: teacher logprobs {tuple(logprobs.shape)} and student logits "
                               f"{tuple(logits.shape)} differ; teacher and student need the same vocabulary")
    t = _check_temperature(temperature)
    log_p = F.log_softmax(logprobs.float(), dim=-1)
    return divergence(loss, log_p, _log_probs(logits, normalized, t), beta=beta, alpha=alpha)


def topk_loss(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor | None = None, *,
              loss: str = "forward_kl", tail: str = "bucket", temperature: float = 1.0, beta: float = 0.5,
              alpha: float = 0.1, normalized: bool = False) -> Tensor:
    """Divergence ``loss`` per token against a cached top-k teacher: ``topk_ids`` [n, k], their log-probabilities
    ``topk_logprobs`` [n, k] (normalised over the full vocabulary, at the cache's temperature T) and
    ``tail_logprob`` [n], the teacher's exact log mass outside its k ids (None: log(1 - sum exp(topk_logprobs)),
    floored at float32's epsilon). The student is put at T: s = softmax(logits / T).

    ``tail="bucket"``: the divergence between the two distributions coarsened to the k ids + one bucket for every
    other id: teacher [topk, tail] (renormalised once, for the float16 rounding), student [s(ids), S_tail], with
    log S_tail a logsumexp of the student's log-probabilities over the other ids (never 1 - sum s(ids), which
    loses a tail below float32's epsilon and its gradient). It is the exact divergence of the coarsened
    distributions; coarsening never increases an f-divergence (data processing inequality), so it is a lower
    bound on the full divergence for every loss here (forward/reverse KL, JSD, TVD and both skews are
    f-divergences), equal to it at k = V. On an id j outside the k the gradient w.r.t. logits / T is
    s_j (g_tail - sum_c s_c g_c), with g = dD/d(coarse student probabilities): the bucket's gradient shared in
    proportion to the student's own tail (forward KL: s_j - p_tail s_j / S_tail), so the loss moves the student's
    tail mass towards the teacher's but leaves the shape of the tail alone.
    ``tail="renormalize"``: the divergence between the teacher's top k renormalised and the student's softmax
    restricted to the same ids and renormalised (the tail is ignored).
    ``normalized=True``: ``logits`` are already the student's log-probabilities at T.
    """
    _check_logits(logits, "topk_loss", topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 2:
        raise LMLossInputError(f"topk_loss: topk_ids {tuple(topk_ids.shape)} and topk_logprobs "
                               f"{tuple(topk_logprobs.shape)} must both be [tokens, k]")
    if tail_logprob is not None and tail_logprob.shape != topk_ids.shape[:1]:
        raise LMLossInputError(f"topk_loss: tail_logprob has shape {tuple(tail_logprob.shape)}; pass "
                               f"[{topk_ids.shape[0]}], one tail mass per token")
    if tail not in TOPK_TAILS:
        raise LMLossInputError(f"topk_loss: unknown tail {tail!r}; valid: {', '.join(TOPK_TAILS)}")
    t = _check_temperature(temperature)
    ids = topk_ids.long()
    log_s_all = _log_probs(logits, normalized, t)
    log_s = log_s_all.gather(-1, ids)
    if tail == "renormalize":
        return divergence(loss, F.log_softmax(topk_logprobs.float(), dim=-1), F.log_softmax(log_s, dim=-1),
                          beta=beta, alpha=alpha)
    in_topk = torch.zeros_like(log_s_all, dtype=torch.bool).scatter_(-1, ids, True)
    # -inf where the k ids are the whole vocabulary; the NaN gradient of a logsumexp of only -inf never gets
    # through: masked_fill's backward zeroes every filled entry
    s_tail = torch.logsumexp(log_s_all.masked_fill(in_topk, _NEG_INF), dim=-1)
    # A bucket that holds no id (k = V) is empty for the teacher too, whatever rounding left in its tail.
    p_tail = torch.where(s_tail == _NEG_INF, s_tail, _teacher_tail(topk_logprobs, tail_logprob))
    log_p = F.log_softmax(torch.cat([topk_logprobs.float(), p_tail.unsqueeze(-1)], dim=-1), dim=-1)
    return divergence(loss, log_p, torch.cat([log_s, s_tail.unsqueeze(-1)], dim=-1), beta=beta, alpha=alpha)


def sampled_kl(logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, sample_logprobs: Tensor,
               proposal_lognorm: Tensor, proposal_temperature: float = 1.0, *, samples: int,
               temperature: float = 1.0, normalized: bool = False) -> Tensor:
    """Unbiased importance-weighted estimate of KL(p || s) per token from ids sampled from the teacher.

    Each position holds ``samples`` draws from the proposal q = p^(1/tau) / Z (tau = ``proposal_temperature``,
    log Z = ``proposal_lognorm`` [n]), stored as unique ``sample_ids`` [n, m] with ``sample_counts`` [n, m]
    (0 = empty slot, which counts 0) and log p(id) ``sample_logprobs`` [n, m], p at the cache's temperature T.
    Estimate: sum_i (c_i / samples) * (p_i / q_i) * (log p_i - log s_i), with log q_i = log p_i / tau - log Z
    (tau = 1: p_i / q_i = 1) and s = softmax(logits / T). Its expectation over the draws is KL(p || s), and so is
    that of its gradient; single values may be negative. Forward KL only.
    ``normalized=True``: ``logits`` are already the student's log-probabilities at T.
    """
    _check_logits(logits, "sampled_kl", sample_ids=sample_ids, sample_counts=sample_counts,
                  sample_logprobs=sample_logprobs, proposal_lognorm=proposal_lognorm)
    if not (sample_ids.shape == sample_counts.shape == sample_logprobs.shape) or sample_ids.dim() != 2:
        raise LMLossInputError(f"sampled_kl: sample_ids {tuple(sample_ids.shape)}, sample_counts "
                               f"{tuple(sample_counts.shape)} and sample_logprobs {tuple(sample_logprobs.shape)} "
                               "must all be [tokens, slots]")
    if samples < 1:
        raise LMLossInputError(f"sampled_kl: samples must be >= 1, got {samples}; pass precompute.lm.samples")
    tau = _check_temperature(proposal_temperature)
    t = _check_temperature(temperature)
    log_s = _log_probs(logits, normalized, t).gather(-1, sample_ids.long())
    # empty slots may hold any log-probability (-inf too): 0 keeps their zero terms finite, gradients too
    log_p = torch.where(sample_counts > 0, sample_logprobs.float(), torch.zeros((), device=logits.device))
    # log(p/q) = log p - (log p / tau - log Z)
    log_w = log_p * (1.0 - 1.0 / tau) + proposal_lognorm.float().unsqueeze(-1)
    return (sample_counts.float() / samples * log_w.exp() * (log_p - log_s)).sum(-1)


# --------------------------------------------------------------------------- online (the teacher's full logits)


def _online(name: str, logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float,
            alpha: float) -> Tensor:
    _check_pair(logits, teacher_logits, name)
    t = _check_temperature(temperature)
    return divergence(name, F.log_softmax(teacher_logits.float() / t, dim=-1),
                      F.log_softmax(logits.float() / t, dim=-1), beta=beta, alpha=alpha)


def _online_loss(name: str) -> Callable[..., Tensor]:
    def loss(logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5,
             alpha: float = 0.1) -> Tensor:
        return _online(name, logits, teacher_logits, temperature, beta, alpha)

    loss.__name__ = loss.__qualname__ = name
    loss.__doc__ = (f"`divergence('{name}')` per token over the teacher's full ``teacher_logits`` [n, V], both "
                    "softmaxes at ``temperature``.")
    return loss


def forward_kl(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p || s) per token over the full vocabulary, both softmaxes at ``temperature``."""
    return _online("forward_kl", logits, teacher_logits, temperature, 0.5, 0.1)


def reverse_kl(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(s || p) per token over the full vocabulary (mode-seeking), both softmaxes at ``temperature``."""
    return _online("reverse_kl", logits, teacher_logits, temperature, 0.5, 0.1)


def generalized_jsd(logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence JSD(beta) per token (`divergence("jsd")`), both softmaxes at
    ``temperature``."""
    return _online("jsd", logits, teacher_logits, temperature, beta, 0.1)


def _check_pair(logits: Tensor, teacher_logits: Tensor, what: str) -> None:
    _check_logits(logits, what, teacher_logits=teacher_logits)
    if teacher_logits.shape != logits.shape:
        raise LMLossInputError(f"{what}: teacher logits {tuple(teacher_logits.shape)} and student logits "
                               f"{tuple(logits.shape)} differ; teacher and student need the same vocabulary")


# --------------------------------------------------------------------------- cross-tokenizer (ULD)


def uld_loss(logits: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor | None = None, *,
             temperature: float = 1.0) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030) per token, against a cached top k.

    The paper's loss is sum_i |s_(i) - p_(i)| over both full distributions sorted descending, the smaller
    vocabulary padded with zero probabilities (its reference code, llm-recipes models/distillation_model.py:
    softmax at a student and a teacher temperature, both 1 by default, sort, zero-pad, L1; here both are the
    cache's T). Sorting makes it independent of which id is which, so the vocabularies need not match.
    The cache holds the teacher's k largest log-probabilities ``topk_logprobs`` [n, k] (at T) and
    ``tail_logprob`` [n], its log mass outside them (None: log(1 - sum exp(topk_logprobs)), floored at float32's
    epsilon), not its sorted values beyond k. So the student's full distribution s = softmax(logits / T), sorted,
    is compared as sum_{i <= k} |s_(i) - p_(i)| + |sum_{i > k} s_(i) - p_tail|: by the triangle inequality a
    lower bound on the paper's loss, equal to it when the teacher's sorted tail is proportional to the student's
    (in particular at k = the teacher's vocabulary size: p_tail = 0 and the teacher's padded tail is 0). A
    student vocabulary smaller than k is padded with zeros (its tail is then empty).
    """
    _check_logits(logits, "uld_loss", topk_logprobs=topk_logprobs)
    if topk_logprobs.dim() != 2:
        raise LMLossInputError(f"uld_loss: topk_logprobs has shape {tuple(topk_logprobs.shape)}; pass [tokens, k]")
    if tail_logprob is not None and tail_logprob.shape != topk_logprobs.shape[:1]:
        raise LMLossInputError(f"uld_loss: tail_logprob has shape {tuple(tail_logprob.shape)}; pass "
                               f"[{topk_logprobs.shape[0]}], one tail mass per token")
    t = _check_temperature(temperature)
    k = topk_logprobs.shape[1]
    teacher = topk_logprobs.float().exp().sort(dim=-1, descending=True).values
    p_tail = _teacher_tail(topk_logprobs, tail_logprob).exp()
    student = F.softmax(logits.float() / t, dim=-1).sort(dim=-1, descending=True).values
    if student.shape[1] < k:
        student = F.pad(student, (0, k - student.shape[1]))
    # the student's tail summed directly: 1 - sum(head) would lose a tail below float32's epsilon
    s_tail = student[:, k:].sum(-1)
    return (student[:, :k] - teacher).abs().sum(-1) + (s_tail - p_tail).abs()


def align_by_offsets(student_offsets: Tensor, teacher_offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Pair the student and teacher positions that predict a token starting at the same character.

    ``*_offsets`` [T, 2] are (start, end) characters of each token in the same text. Position t predicts
    token t + 1, so positions 0..T-2 are paired by ``offsets[t + 1, 0]``; positions with no partner are
    dropped, and where several positions of one side share that start (zero-width tokens such as EOS),
    only the first is paired. Returns (student_positions, teacher_positions), int64, in text order.
    """
    for name, off in (("student_offsets", student_offsets), ("teacher_offsets", teacher_offsets)):
        if off.dim() != 2 or off.shape[1] != 2:
            raise LMLossInputError(f"align_by_offsets: {name} has shape {tuple(off.shape)}; pass [tokens, 2] "
                                   "(start, end) character offsets")
    s_next = student_offsets[1:, 0].long().contiguous()
    t_next = teacher_offsets[1:, 0].long().contiguous().to(s_next.device)
    for name, starts in (("student_offsets", s_next), ("teacher_offsets", t_next)):
        if starts.numel() > 1 and bool((starts[1:] < starts[:-1]).any()):
            raise LMLossInputError(f"align_by_offsets: {name} starts go backwards; pass the offsets of one "
                                   "tokenization in token order")
    if t_next.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=s_next.device)
        return empty, empty
    first = torch.ones_like(s_next, dtype=torch.bool)
    first[1:] = s_next[1:] != s_next[:-1]
    t_pos = torch.searchsorted(t_next, s_next)  # leftmost: the first teacher position with that start
    keep = first & (t_next[t_pos.clamp(max=t_next.numel() - 1)] == s_next)
    return keep.nonzero().squeeze(-1), t_pos[keep]


# --------------------------------------------------------------------------- the torch half of stages/kinds.py

# The per-token function of each KD loss (distill.lm.loss) over the teacher's full logits (online).
LM_LOSS_FUNCTIONS: dict[str, Callable[..., Tensor]] = {name: _online_loss(name) for name in LM_LOSSES}

# The per-token KD term of each cache codec (precompute.lm.codec), against its cached fields.
CODEC_LOSSES: dict[str, Callable[..., Tensor]] = {
    "dense": dense_loss,
    "topk": topk_loss,
    "sampled": sampled_kl,
}
