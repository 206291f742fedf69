"""Loss-weight schedules, dynamic temperatures, probability shift and multi-teacher targets.

Pure functions (no state, no config mutation), following TextBrewer's ``schedulers.py`` and
``distiller_utils.probability_shift_``. Deliberate differences:

* ``weight_at`` returns ``base * factor`` directly; TextBrewer's schedulers return the factor
  and the distiller multiplies. Steps past ``total_steps`` are clamped (no negative weights).
* FLSW/CWSM clamp the temperature to ``min_temperature``: with a large ``beta`` TextBrewer's
  formula can go to zero or below, which divides by zero or inverts the distribution. FLSW
  guards the L2 norm with ``eps`` (an all-zero logit row gives NaN in TextBrewer).
  Token-level logits ``[B, T, C]`` take the batch mean over valid tokens only (``mask``),
  as TextBrewer does after gathering valid tokens.
* ``probability_shift`` returns a new tensor instead of editing in place and leaves positions
  whose label is ``ignore_index`` unchanged, for ``[B, C]`` as well as ``[B, T, C]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cache_format import KDError

__all__ = [
    "ScheduleError",
    "WEIGHT_SCHEDULES",
    "weight_at",
    "flsw_temperature",
    "cwsm_temperature",
    "probability_shift",
    "combine_teachers",
]


class ScheduleError(KDError, ValueError):
    """A schedule, temperature or teacher-combination setting is invalid."""


WEIGHT_SCHEDULES = ("constant", "linear_decay", "linear_growth")
_COMBINE_MODES = ("logits", "probs")


def weight_at(kind: str, base: float, step: int, total_steps: int) -> float:
    """Loss weight at ``step`` of ``total_steps``: constant, ``base -> 0`` or ``0 -> base``."""
    if kind not in WEIGHT_SCHEDULES:
        raise ScheduleError(f"unknown weight schedule {kind!r}; valid: {', '.join(WEIGHT_SCHEDULES)}")
    if total_steps < 1 or step < 0:
        raise ScheduleError(
            f"weight schedule needs step >= 0 and total_steps >= 1, got step={step}, "
            f"total_steps={total_steps}; check the number of epochs and the batch size"
        )
    fraction = min(step / total_steps, 1.0)
    if kind == "linear_decay":
        return base * (1.0 - fraction)
    if kind == "linear_growth":
        return base * fraction
    return base


def _batch_relative(w: Tensor, mask: Tensor | None) -> Tensor:
    """``mean(w) - w``, the mean taken over valid positions."""
    if mask is None:
        mean = w.mean()
    else:
        m = mask.to(w.dtype)
        mean = (w * m).sum() / m.sum().clamp_min(1.0)
    return mean - w


def flsw_temperature(
    student_logits: Tensor,
    teacher_logits: Tensor,
    base_temperature: float,
    beta: float,
    gamma: float,
    eps: float = 1e-4,
    *,
    mask: Tensor | None = None,
    min_temperature: float = 1e-2,
) -> Tensor:
    """Per-example temperature of FLSW (arXiv 1911.07471), as TextBrewer computes it.

    w = (1 - cos(z_S, z_T))^gamma and tau = T + beta * (mean(w) - w): examples where the
    student disagrees with the teacher get a lower (sharper) temperature. Returns ``[B]`` for
    ``[B, C]`` logits or ``[B, T]`` for ``[B, T, C]``; no gradient flows through it.
    """
    with torch.no_grad():
        v = student_logits.detach()
        t = teacher_logits.detach()
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
        t = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
        # clamp: rounding can push the cosine a hair above 1, and a negative base breaks pow.
        w = (1.0 - (v * t).sum(dim=-1)).clamp_min(0.0).pow(gamma)
        tau = base_temperature + beta * _batch_relative(w, mask)
        return tau.clamp_min(min_temperature)


def cwsm_temperature(
    student_logits: Tensor,
    teacher_logits: Tensor,
    base_temperature: float,
    beta: float,
    eps: float = 1e-3,
    *,
    mask: Tensor | None = None,
    min_temperature: float = 1e-2,
) -> Tensor:
    """Per-example temperature of CWSM (arXiv 1911.07471), as TextBrewer computes it.

    w = 1 / (max softmax(z_S) + eps) and tau = T + beta * (mean(w) - w): examples the student
    is unsure of get a lower temperature. ``teacher_logits`` is unused (kept so both schedules
    share a signature, as in TextBrewer). ``eps`` defaults to TextBrewer's 1e-3. Returns
    ``[B]`` or ``[B, T]``; no gradient flows through it.
    """
    del teacher_logits
    with torch.no_grad():
        v_max = torch.softmax(student_logits.detach(), dim=-1).amax(dim=-1)
        w = 1.0 / (v_max + eps)
        tau = base_temperature + beta * _batch_relative(w, mask)
        return tau.clamp_min(min_temperature)


def probability_shift(teacher_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Swap the teacher's top logit with the gold label's logit (TextBrewer's probability shift).

    So the teacher's argmax is always the gold label; a correct teacher is unchanged. Works
    for ``[B, C]`` with labels ``[B]`` and ``[B, T, C]`` with ``[B, T]``; positions labelled
    ``ignore_index`` are left as they are. Returns a new tensor.
    """
    if teacher_logits.shape[:-1] != labels.shape:
        raise ScheduleError(
            f"probability shift: logits {tuple(teacher_logits.shape)} and labels {tuple(labels.shape)} "
            "do not fit; labels must be the logits' shape without the class axis"
        )
    top = teacher_logits.argmax(dim=-1, keepdim=True)
    gold = labels.unsqueeze(-1).long()
    gold = torch.where(gold == ignore_index, top, gold)  # ignored: swap the top with itself
    top_value = teacher_logits.gather(-1, top)
    gold_value = teacher_logits.gather(-1, gold)
    shifted = teacher_logits.clone()
    shifted.scatter_(-1, top, gold_value)
    shifted.scatter_(-1, gold, top_value)
    return shifted


def combine_teachers(
    logits_list: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    mode: str = "logits",
    temperature: float = 1.0,
) -> Tensor:
    """Combine several teachers' logits for one task into one target for ``kd_loss``.

    ``weights`` (default equal) are normalised to sum to 1. ``"logits"``: weighted mean of the
    logits (TextBrewer's multi-teacher averaging). ``"probs"``: the weighted mean p of
    softmax(z_k / temperature), returned as ``temperature * log p``. Softmax ignores an additive
    constant and log p differs from real logits only by one (the log-normaliser), so
    softmax(out / temperature) == p exactly: use the same temperature in ``kd_loss``.
    """
    if not logits_list:
        raise ScheduleError("combine_teachers needs at least one teacher's logits; list the teacher caches")
    shape = logits_list[0].shape
    if any(z.shape != shape for z in logits_list):
        shapes = ", ".join(str(tuple(z.shape)) for z in logits_list)
        raise ScheduleError(f"teachers' logits differ in shape ({shapes}); use teachers for the same task and data")
    if mode not in _COMBINE_MODES:
        raise ScheduleError(f"unknown teacher combination {mode!r}; valid: {', '.join(_COMBINE_MODES)}")
    if not temperature > 0:
        raise ScheduleError(f"combine temperature must be > 0, got {temperature}")
    if weights is None:
        weights = [1.0] * len(logits_list)
    if len(weights) != len(logits_list) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ScheduleError(
            f"teacher weights {list(weights)} must be {len(logits_list)} numbers >= 0 with a positive sum "
            "(one per teacher)"
        )
    stacked = torch.stack(list(logits_list))  # [K, ...]
    w = torch.tensor([float(x) for x in weights], dtype=stacked.dtype, device=stacked.device)
    w = (w / w.sum()).reshape((-1,) + (1,) * (stacked.dim() - 1))
    if mode == "logits":
        return (w * stacked).sum(dim=0)
    log_p = torch.log_softmax(stacked / temperature, dim=-1)
    # log(sum_k w_k p_k) via logsumexp stays finite where some p_k underflow; w_k = 0 gives -inf terms.
    return temperature * torch.logsumexp(torch.log(w) + log_p, dim=0)
