"""Causal-LM distillation losses, per token, and a chunked driver that never holds the full [N, V] logits.

Every per-token function takes the student's logits ``[n, V]`` (any float dtype; computed in float32) and
returns ``[n]`` float32 losses, one per position. ``chunked_loss`` sums one of them over all positions,
``chunk_tokens`` rows of hidden states at a time, recomputing each chunk's logits in backward
(activation checkpointing, as Liger's and torchtune's chunked losses avoid materialising ``[B, T, V]``).
Temperature-squared scaling and the mean over tokens are the caller's business.

Notation: p = teacher distribution, s = student distribution (softmax of ``logits``), KL(p || s) =
sum_x p(x) (log p(x) - log s(x)); terms with p(x) = 0 count 0.

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
from stages.kinds import TOPK_TAILS

__all__ = [
    "auto_chunk_tokens",
    "LMLossInputError",
    "align_by_offsets",
    "chunked_loss",
    "dense_kl",
    "forward_kl",
    "generalized_jsd",
    "next_token_ce",
    "reverse_kl",
    "sampled_kl",
    "topk_kl",
    "uld_loss",
    "LM_LOSS_FUNCTIONS",
    "CODEC_LOSSES",
]

# 1 - sum(probs) is only resolved to float32's epsilon near 1: a smaller tail mass is rounding noise.
_TAIL_FLOOR = torch.finfo(torch.float32).eps
_LOG_TAIL_FLOOR = math.log(_TAIL_FLOOR)
_LN2 = math.log(2.0)


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


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_x p (log p - log q) over the last axis; p = 0 terms count 0 (no 0 * -inf = NaN, in value or grad)."""
    finite_log_p = torch.where(log_p > -math.inf, log_p, torch.zeros_like(log_p))
    return (log_p.exp() * (finite_log_p - log_q)).sum(-1)


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate near 0 and near -inf (Maechler 2012), a clamped to the tail floor.

    The clamp keeps both branches finite (so their gradients are too) and floors the tail mass at
    float32's epsilon, below which 1 - sum(probs) is rounding noise.
    """
    a = a.clamp(max=math.log1p(-_TAIL_FLOOR))
    return torch.where(a > -_LN2, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


# --------------------------------------------------------------------------- chunking


def _log_probs(logits: Tensor, normalized: bool) -> Tensor:
    return logits.float() if normalized else F.log_softmax(logits.float(), dim=-1)


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


def dense_kl(logits: Tensor, logprobs: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p || s) per token from cached teacher log-probabilities ``logprobs`` [n, V] (temperature 1).

    At temperature T: s = softmax(logits / T) and p = softmax(logprobs / T) (the cached log-probabilities
    divided by T and renormalised, which equals the teacher's softmax of its logits / T).
    """
    _check_logits(logits, "dense_kl", logprobs=logprobs)
    if logprobs.shape != logits.shape:
        raise LMLossInputError(f"dense_kl: teacher logprobs {tuple(logprobs.shape)} and student logits "
                               f"{tuple(logits.shape)} differ; teacher and student need the same vocabulary")
    t = _check_temperature(temperature)
    log_p = F.log_softmax(logprobs.float() / t, dim=-1)
    log_s = F.log_softmax(logits.float() / t, dim=-1)
    return _kl(log_p, log_s)


def topk_kl(logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail: str = "bucket", *,
            normalized: bool = False) -> Tensor:
    """KL(p || s) per token against a cached top-k teacher: ``topk_ids`` [n, k] and their log-probabilities
    ``topk_logprobs`` [n, k] (normalised over the full vocabulary).

    ``tail="bucket"``: exact KL between the two distributions coarsened to k ids + one bucket for every
    other id, with p_tail = 1 - sum p_topk and s_tail = 1 - sum s(topk ids) (computed as -expm1 of a
    logsumexp, floored at float32's epsilon). With k = V it is the full forward KL.
    ``tail="renormalize"``: KL between the teacher's top-k renormalised to sum to 1 and the student's softmax
    restricted to the same ids (the tail is ignored).
    ``normalized=True``: ``logits`` are already the student's log-probabilities (one log-softmax shared with
    the cross-entropy term saves a pass over the vocabulary).
    """
    _check_logits(logits, "topk_kl", topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.dim() != 2:
        raise LMLossInputError(f"topk_kl: topk_ids {tuple(topk_ids.shape)} and topk_logprobs "
                               f"{tuple(topk_logprobs.shape)} must both be [tokens, k]")
    if tail not in TOPK_TAILS:
        raise LMLossInputError(f"topk_kl: unknown tail {tail!r}; valid: {', '.join(TOPK_TAILS)}")
    log_s = _log_probs(logits, normalized).gather(-1, topk_ids.long())
    log_p = topk_logprobs.float()
    if tail == "renormalize":
        return _kl(F.log_softmax(log_p, dim=-1), F.log_softmax(log_s, dim=-1))
    head = _kl(log_p, log_s)
    a_p = torch.logsumexp(log_p, dim=-1)
    # Rounded (float16) teacher log-probabilities may sum past 1: that tail is empty, not negative.
    p_tail = (-torch.expm1(a_p)).clamp_min(0.0)
    tail_terms = p_tail * (_log1mexp(a_p) - _log1mexp(torch.logsumexp(log_s, dim=-1)))
    return head + torch.where(p_tail > 0, tail_terms, torch.zeros_like(tail_terms))


def sampled_kl(logits: Tensor, sample_ids: Tensor, sample_counts: Tensor, sample_logprobs: Tensor,
               proposal_lognorm: Tensor, proposal_temperature: float = 1.0, *, samples: int,
               normalized: bool = False) -> Tensor:
    """Unbiased importance-weighted estimate of KL(p || s) per token from ids sampled from the teacher.

    Each position holds ``samples`` draws from the proposal q = p^(1/tau) / Z (tau = ``proposal_temperature``,
    log Z = ``proposal_lognorm`` [n]), stored as unique ``sample_ids`` [n, m] with ``sample_counts`` [n, m]
    (0 = empty slot, which counts 0) and log p(id) ``sample_logprobs`` [n, m]. Estimate:
    sum_i (c_i / samples) * (p_i / q_i) * (log p_i - log s_i), with log q_i = log p_i / tau - log Z
    (tau = 1: p_i / q_i = 1). Its expectation over the draws is KL(p || s); single values may be negative.
    ``normalized=True``: ``logits`` are already log-probabilities, as for ``topk_kl``.
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
    log_s = _log_probs(logits, normalized).gather(-1, sample_ids.long())
    # empty slots may hold any log-probability (-inf too): 0 keeps their zero terms finite, gradients too
    log_p = torch.where(sample_counts > 0, sample_logprobs.float(), torch.zeros((), device=logits.device))
    # log(p/q) = log p - (log p / tau - log Z)
    log_w = log_p * (1.0 - 1.0 / tau) + proposal_lognorm.float().unsqueeze(-1)
    return (sample_counts.float() / samples * log_w.exp() * (log_p - log_s)).sum(-1)


# --------------------------------------------------------------------------- online references (full vocabulary)


def forward_kl(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p || s) per token over the full vocabulary, both softmaxes at ``temperature``."""
    _check_pair(logits, teacher_logits, "forward_kl")
    t = _check_temperature(temperature)
    return _kl(F.log_softmax(teacher_logits.float() / t, dim=-1), F.log_softmax(logits.float() / t, dim=-1))


def reverse_kl(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(s || p) per token over the full vocabulary (mode-seeking), both softmaxes at ``temperature``."""
    _check_pair(logits, teacher_logits, "reverse_kl")
    t = _check_temperature(temperature)
    return _kl(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1))


def generalized_jsd(logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence JSD(beta) per token (Agarwal et al. 2024).

    m = beta * p + (1 - beta) * s, JSD = beta * KL(p || m) + (1 - beta) * KL(s || m), both softmaxes at
    ``temperature``. JSD(beta) itself tends to 0 at both ends; as TRL's GKDTrainer does, beta = 0 returns
    its limit JSD / beta = forward KL(p || s) and beta = 1 its limit JSD / (1 - beta) = reverse KL(s || p).
    """
    _check_pair(logits, teacher_logits, "generalized_jsd")
    if not 0.0 <= beta <= 1.0:
        raise LMLossInputError(f"generalized_jsd: beta must be in [0, 1], got {beta}; set distill.lm.jsd_beta")
    t = _check_temperature(temperature)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_s = F.log_softmax(logits.float() / t, dim=-1)
    if beta == 0.0:
        return _kl(log_p, log_s)
    if beta == 1.0:
        return _kl(log_s, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _check_pair(logits: Tensor, teacher_logits: Tensor, what: str) -> None:
    _check_logits(logits, what, teacher_logits=teacher_logits)
    if teacher_logits.shape != logits.shape:
        raise LMLossInputError(f"{what}: teacher logits {tuple(teacher_logits.shape)} and student logits "
                               f"{tuple(logits.shape)} differ; teacher and student need the same vocabulary")


# --------------------------------------------------------------------------- cross-tokenizer (ULD)


def uld_loss(logits: Tensor, topk_logprobs: Tensor) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) per token, over the teacher's cached top k.

    L1 distance between the student's k largest probabilities (softmax of ``logits``, sorted descending) and
    the teacher's top-k probabilities ``exp(topk_logprobs)`` [n, k] (sorted descending). Sorting makes it
    independent of which id is which, so the vocabularies need not match. A student vocabulary smaller than
    k is padded with zero probabilities, as the paper pads the smaller vocabulary.
    """
    _check_logits(logits, "uld_loss", topk_logprobs=topk_logprobs)
    if topk_logprobs.dim() != 2:
        raise LMLossInputError(f"uld_loss: topk_logprobs has shape {tuple(topk_logprobs.shape)}; pass [tokens, k]")
    k = topk_logprobs.shape[1]
    teacher = topk_logprobs.float().exp().sort(dim=-1, descending=True).values
    student = F.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[1]), dim=-1).values
    student = F.pad(student, (0, k - student.shape[1]))
    return (student - teacher).abs().sum(-1)


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
LM_LOSS_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
}

# The per-token KL term of each cache codec (precompute.lm.codec), against its cached fields.
CODEC_LOSSES: dict[str, Callable[..., Tensor]] = {
    "dense": dense_kl,
    "topk": topk_kl,
    "sampled": sampled_kl,
}
