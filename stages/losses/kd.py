"""Distillation losses, intermediate-layer matches and their presets (pure torch, no I/O).

Names and semantics follow TextBrewer (airaria/TextBrewer, ``losses.py``, ``presets.py``,
``examples/matches/matches.py``). Deliberate differences, each for a reason:

* ``kd_loss`` has an explicit ``temperature_squared`` switch (Hinton et al. multiply by T^2 so
  the soft-target gradients keep their scale as T grows; TextBrewer does not). It also offers
  ``kind="kl"``, which differs from TextBrewer's ``"ce"`` only by the teacher's entropy (a
  constant for the student), so it has the same gradients but reads 0 when student == teacher.
* Token-level logits are masked inside the loss (mean over valid tokens) instead of being
  gathered first (TextBrewer's ``select_logits_with_mask``); the value is the same.
* ``attention_ce`` takes attention *probabilities*, which is what Hugging Face models return
  with ``output_attentions=True``. TextBrewer's ``att_ce_loss`` takes pre-softmax scores and
  applies softmax itself; a softmax of probabilities would be a different, flattened target.
* ``attention_ce_mean`` likewise averages the heads' *probabilities* and takes the log of that
  mean; TextBrewer's ``att_ce_mean_loss`` averages raw scores over heads and applies softmax.
* ``mmd`` divides each token-similarity matrix by the width with or without a mask; TextBrewer
  0.2.1 divides by the padded sequence length when given a mask (and by the width without one).
* ``attention_mse`` zeroes values <= -1e-3 (TextBrewer's trick for additive -inf/-10000 masks in
  raw scores) with or without a mask; TextBrewer does it only without one, and with a mask its
  ``-inf - -inf`` gives NaN. For probabilities (our case) the step changes nothing.
* ``pkd_loss`` and the cosine loss normalise with an epsilon, so an all-zero vector gives a
  finite loss rather than NaN.
* Presets adapt to the real layer counts instead of hard-coding 12 -> 3 (see ``preset_matches``).

Match kinds live in one registry: ``stages/kinds.py`` says what each kind reads (feature, one
layer or a pair, all tokens or the first) without torch, so the settings can check it, and
``MATCH_LOSSES`` below attaches the loss function. ``Match``, ``match_loss``, ``check_matches``,
``needed_teacher_layers`` and the presets read those two tables only.

Layer-index conventions (shared by ``Match``, the cache keys and ``needed_teacher_layers``):

* hidden layer ``i``: Hugging Face ``hidden_states[i]``; 0 is the embeddings output, ``i`` the
  output of transformer block ``i``; valid range ``0..num_layers``. Feature key ``"hidden.{i}"``.
* attention layer ``i``: Hugging Face ``attentions[i]`` (0-based, block ``i + 1``); valid range
  ``0..num_layers - 1``. Feature key ``"attention.{i}"``. Tensors are ``[B, heads, T, T]``.

Masks are ``[B, T]`` with 1 (or True) for real tokens and 0 for padding. Every loss returns a
scalar: a mean over examples, or over valid tokens for token-level inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache_format import KDError
from stages.kinds import KD_KINDS, MATCH_KINDS, PRESETS, PROJECTIONS, MatchKind

__all__ = ["MatchError", "LossInputError", "kd_loss", "hard_ce_loss", "hidden_mse", "hidden_cosine", "pkd_loss", "mmd_loss", "fsp_loss", "attention_mse", "attention_ce", "attention_mse_sum", "attention_ce_mean", "Projection", "Match", "MATCH_LOSSES", "feature_map", "match_loss", "build_projections", "check_matches", "preset_matches", "PRESET_NAMES", "needed_teacher_layers"]

logger = logging.getLogger(__name__)


class MatchError(KDError, ValueError):
    """An intermediate match is invalid: unknown kind or preset, or a layer out of range."""


class LossInputError(KDError, ValueError):
    """Tensors given to a loss do not fit together (shapes, temperature, widths)."""



# TextBrewer's "attention score" convention: additive masks make padded scores very negative.
_NEG_SCORE = -1e-3


# --------------------------------------------------------------------------- logits


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is set (all positions when None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    # clamp: an all-padding batch gives 0 rather than 0/0 = NaN.
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _check_mask(mask: Tensor | None, shape: torch.Size, what: str) -> None:
    if mask is not None and mask.shape != shape:
        raise LossInputError(
            f"{what}: mask has shape {tuple(mask.shape)} but the inputs need {tuple(shape)}; "
            "pass the [batch, tokens] attention mask of the same batch"
        )


def _temperature_tensor(temperature: float | Tensor, positions: torch.Size) -> Tensor | float:
    """Return ``temperature`` broadcastable to ``positions + (1,)`` (the class axis)."""
    if not isinstance(temperature, Tensor) or temperature.dim() == 0:
        value = float(temperature)
        if not value > 0 or math.isinf(value):
            raise LossInputError(
                f"temperature must be a finite number > 0, got {value}; set distill.temperature "
                "to a positive value such as 1.0 to 8.0"
            )
        return value
    if temperature.shape != positions[: temperature.dim()]:
        raise LossInputError(
            f"temperature has shape {tuple(temperature.shape)} but the logits need a scalar, "
            f"[batch] or [batch, tokens] = {tuple(positions)}; pass one temperature per example or token"
        )
    extra = len(positions) - temperature.dim() + 1
    return temperature.reshape(tuple(temperature.shape) + (1,) * extra)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor,
    *,
    kind: str = "kl",
    temperature_squared: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft-label distillation loss between logits ``[B, C]`` or ``[B, T, C]``.

    ``kind``: ``"kl"`` = KL(p_T || p_S), ``"ce"`` = -sum p_T log p_S (TextBrewer's
    ``kd_ce_loss``), ``"mse"`` = mean over classes of (z_S/T - z_T/T)^2 (TextBrewer's
    ``kd_mse_loss``), with p = softmax(z / T). ``temperature`` is a scalar, ``[B]`` or
    ``[B, T]``. ``temperature_squared`` multiplies each position's loss by its T^2 (Hinton).
    The result is the mean over examples, or over valid tokens (``mask`` ``[B, T]``).
    The teacher is not detached: pass cached or ``no_grad`` teacher logits.
    """
    if kind not in KD_KINDS:
        raise LossInputError(f"unknown kd loss kind {kind!r}; valid kinds: {', '.join(KD_KINDS)}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() not in (2, 3):
        raise LossInputError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [batch, classes] or "
            "[batch, tokens, classes]; check that both models have the same number of labels"
        )
    positions = student_logits.shape[:-1]
    _check_mask(mask, positions, "kd_loss")
    temp = _temperature_tensor(temperature, positions)
    scaled_s = student_logits / temp
    scaled_t = teacher_logits / temp
    if kind == "mse":
        per_position = (scaled_s - scaled_t).pow(2).mean(dim=-1)
    else:
        log_p_s = F.log_softmax(scaled_s, dim=-1)
        log_p_t = F.log_softmax(scaled_t, dim=-1)
        p_t = log_p_t.exp()
        per_position = -(p_t * log_p_s).sum(dim=-1)
        if kind == "kl":
            per_position = per_position + (p_t * log_p_t).sum(dim=-1)
    if temperature_squared:
        t2 = temp**2 if isinstance(temp, float) else temp.squeeze(-1) ** 2
        per_position = per_position * t2
    return _masked_mean(per_position, mask)


def hard_ce_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy with gold labels, mean over non-ignored labels (0 when all are ignored).

    ``logits`` ``[B, C]`` or ``[B, T, C]``; ``labels`` ``[B]`` or ``[B, T]``.
    """
    if logits.shape[:-1] != labels.shape:
        raise LossInputError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not fit: labels "
            "must be the logits' shape without the class axis"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    # torch's "mean" returns NaN when every label is ignored; a clamped count gives 0 instead.
    count = (flat_labels != ignore_index).sum().clamp_min(1)
    return total / count


# --------------------------------------------------------------------------- hidden states


def _check_pair(student: Tensor, teacher: Tensor, what: str, same_width: bool = True) -> None:
    end = None if same_width else -1
    if student.shape[:end] != teacher.shape[:end]:
        width = "" if same_width else " (widths may differ)"
        raise LossInputError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ{width}; "
            "token-level matches need the same tokenizer and max length for student and teacher, "
            "and equal widths need a projection (Match.projection='linear')"
        )


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between hidden states ``[B, T, H]`` over valid tokens (TextBrewer's ``hid_mse_loss``)."""
    _check_pair(student, teacher, "hidden_mse")
    _check_mask(mask, student.shape[:-1], "hidden_mse")
    return _masked_mean((student - teacher).pow(2).mean(dim=-1), mask)


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of 1 - cos(student, teacher) over valid tokens (DistilBERT; TextBrewer's ``cos_loss``)."""
    _check_pair(student, teacher, "hidden_cosine")
    _check_mask(mask, student.shape[:-1], "hidden_cosine")
    return _masked_mean(1.0 - F.cosine_similarity(student, teacher, dim=-1), mask)


def pkd_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared distance of L2-normalised first-token vectors, mean over examples (BERT-PKD).

    Accepts ``[B, T, H]`` (token 0 is used) or ``[B, H]``. ``mask`` is ignored: token 0
    ([CLS]) is never padding.
    """
    cls_s = student[:, 0] if student.dim() == 3 else student
    cls_t = teacher[:, 0] if teacher.dim() == 3 else teacher
    _check_pair(cls_s, cls_t, "pkd")
    diff = F.normalize(cls_s, dim=-1) - F.normalize(cls_t, dim=-1)
    return diff.pow(2).sum(dim=-1).mean()


def mmd_loss(
    student_a: Tensor,
    student_b: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """NST / MMD variant on token-similarity matrices (TextBrewer's ``mmd_loss``).

    For each model, G = a b^T / H over tokens (``[B, T, T]``; student and teacher widths may
    differ); the loss is the MSE between the two G, over pairs of valid tokens.
    """
    _check_pair(student_a, student_b, "mmd (student pair)")
    _check_pair(teacher_a, teacher_b, "mmd (teacher pair)")
    _check_pair(student_a, teacher_a, "mmd", same_width=False)
    _check_mask(mask, student_a.shape[:-1], "mmd")
    gram_s = torch.bmm(student_a, student_b.transpose(1, 2)) / student_a.shape[-1]
    gram_t = torch.bmm(teacher_a, teacher_b.transpose(1, 2)) / teacher_a.shape[-1]
    sq = (gram_s - gram_t).pow(2)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    pair_mask = m.unsqueeze(-1) * m.unsqueeze(1)
    return (sq * pair_mask).sum() / pair_mask.sum().clamp_min(1.0)


def fsp_loss(
    student_a: Tensor,
    student_b: Tensor,
    teacher_a: Tensor,
    teacher_b: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """FSP / Gram loss between two layers (TextBrewer's ``fsp_loss``).

    For each model, G = a^T b / n_tokens (``[B, H, H]``, padded tokens zeroed and not counted);
    the loss is the MSE between student and teacher G. Widths must match (use a projection).
    """
    _check_pair(student_a, student_b, "fsp (student pair)")
    _check_pair(teacher_a, teacher_b, "fsp (teacher pair)")
    _check_pair(student_a, teacher_a, "fsp")
    _check_mask(mask, student_a.shape[:-1], "fsp")
    if mask is None:
        lengths: Tensor | float = float(student_a.shape[1])
    else:
        m = mask.to(student_a.dtype).unsqueeze(-1)
        student_a, student_b, teacher_a, teacher_b = (x * m for x in (student_a, student_b, teacher_a, teacher_b))
        lengths = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    gram_s = torch.bmm(student_a.transpose(1, 2), student_b) / lengths
    gram_t = torch.bmm(teacher_a.transpose(1, 2), teacher_b) / lengths
    return F.mse_loss(gram_s, gram_t)


# --------------------------------------------------------------------------- attention


def _check_attention(student: Tensor, teacher: Tensor, mask: Tensor | None, what: str, any_heads: bool = False) -> None:
    s_shape, t_shape = student.shape, teacher.shape
    if any_heads and student.dim() == teacher.dim() == 4:
        s_shape, t_shape = s_shape[:1] + s_shape[2:], t_shape[:1] + t_shape[2:]
    if student.dim() != 4 or s_shape != t_shape:
        heads = "" if any_heads else " with equal head counts"
        raise LossInputError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} attention maps "
            f"must both be [batch, heads, tokens, tokens]{heads} and equal lengths; "
            "pick layers from models with the same tokenizer"
            + ("" if any_heads else " and number of heads (or use attention_mse_sum / attention_ce_mean)")
        )
    if mask is not None:
        _check_mask(mask, torch.Size((student.shape[0], student.shape[2])), what)


def attention_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between attention maps ``[B, heads, T, T]`` over valid (query, key) pairs.

    TextBrewer's ``att_mse_loss``. Values <= -1e-3 (padded raw scores) are zeroed first; our
    inputs are probabilities from Hugging Face ``output_attentions``, where this is a no-op.
    """
    _check_attention(student, teacher, mask, "attention_mse")
    student = torch.where(student <= _NEG_SCORE, torch.zeros_like(student), student)
    teacher = torch.where(teacher <= _NEG_SCORE, torch.zeros_like(teacher), teacher)
    sq = (student - teacher).pow(2)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    pair_mask = (m.unsqueeze(-1) * m.unsqueeze(1)).unsqueeze(1)  # [B, 1, T, T]
    return (sq * pair_mask).sum() / (pair_mask.sum() * sq.shape[1]).clamp_min(1.0)


def attention_ce(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy -sum_k p_T[q, k] log p_S[q, k], mean over heads and valid queries.

    Like TextBrewer's ``att_ce_loss`` but on attention probabilities (see the module docstring);
    padded keys are left out of the sum and padded queries out of the mean.
    """
    _check_attention(student, teacher, mask, "attention_ce")
    # clamp: padded keys have p_S == 0 and 0 * log 0 must stay 0, not NaN.
    log_s = student.clamp_min(torch.finfo(student.dtype).tiny).log()
    prod = teacher * log_s
    if mask is None:
        return -prod.sum(dim=-1).mean()
    m = mask.to(prod.dtype)
    per_query = (prod * m[:, None, None, :]).sum(dim=-1)  # [B, heads, T]
    total = (per_query * m[:, None, :]).sum()
    return -total / (m.sum() * prod.shape[1]).clamp_min(1.0)


def attention_mse_sum(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between attention maps summed over heads, over valid (query, key) pairs.

    TextBrewer's ``att_mse_sum_loss``: each ``[B, heads, T, T]`` map is summed over its heads to
    ``[B, T, T]`` first, so the head counts may differ (but each row then sums to the head
    count, so with unequal counts the loss cannot reach 0; ``attention_ce_mean`` has no such
    offset). The normaliser is the number of valid pairs, sum over examples of n_valid^2.
    """
    _check_attention(student, teacher, mask, "attention_mse_sum", any_heads=True)
    student, teacher = student.sum(dim=1), teacher.sum(dim=1)
    student = torch.where(student <= _NEG_SCORE, torch.zeros_like(student), student)
    teacher = torch.where(teacher <= _NEG_SCORE, torch.zeros_like(teacher), teacher)
    sq = (student - teacher).pow(2)
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    pair_mask = m.unsqueeze(-1) * m.unsqueeze(1)  # [B, T, T]
    return (sq * pair_mask).sum() / pair_mask.sum().clamp_min(1.0)


def attention_ce_mean(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy between head-averaged attention distributions, mean over valid queries.

    With p = mean over heads of the attention probabilities (still a distribution over keys,
    so the head counts may differ): -sum_k p_T[q, k] log p_S[q, k]. TextBrewer's
    ``att_ce_mean_loss`` on probabilities (see the module docstring); padded keys are left out
    of the sum and padded queries out of the mean.
    """
    _check_attention(student, teacher, mask, "attention_ce_mean", any_heads=True)
    student, teacher = student.mean(dim=1), teacher.mean(dim=1)
    # clamp: padded keys have p_S == 0 and 0 * log 0 must stay 0, not NaN.
    prod = teacher * student.clamp_min(torch.finfo(student.dtype).tiny).log()
    if mask is None:
        return -prod.sum(dim=-1).mean()
    m = mask.to(prod.dtype)
    per_query = (prod * m[:, None, :]).sum(dim=-1)  # [B, T]
    return -(per_query * m).sum() / m.sum().clamp_min(1.0)


# The torch half of the registry in stages/kinds.py: the loss function of each match kind.
# Single-layer kinds are called as fn(student, teacher, mask), pair kinds (MatchKind.pair) as
# fn(student_a, student_b, teacher_a, teacher_b, mask).
MATCH_LOSSES: dict[str, Callable[..., Tensor]] = {
    "hidden_mse": hidden_mse,
    "hidden_cosine": hidden_cosine,
    "pkd": pkd_loss,
    "mmd": mmd_loss,
    "fsp": fsp_loss,
    "attention_mse": attention_mse,
    "attention_ce": attention_ce,
    "attention_mse_sum": attention_mse_sum,
    "attention_ce_mean": attention_ce_mean,
}


# --------------------------------------------------------------------------- projections


class Projection(nn.Module):
    """Learned map from the student's width to the teacher's (TextBrewer's proj kinds).

    ``activation``: ``"none"`` or ``"linear"`` (no activation), ``"relu"`` or ``"tanh"``, so a
    ``Match.projection`` value can be passed as is. Weights
    are drawn N(0, 0.02) and biases zeroed, as TextBrewer does, from torch's global RNG (seed it
    for reproducible runs). ``lr``: this module's own learning rate (TextBrewer's ``proj[3]``
    optimizer settings); None trains it at the optimizer's lr.
    """

    _ACTIVATIONS = ("none", "linear", "relu", "tanh")

    def __init__(self, in_dim: int, out_dim: int, activation: str = "none", lr: float | None = None) -> None:
        super().__init__()
        if activation not in self._ACTIVATIONS:
            raise LossInputError(
                f"unknown projection activation {activation!r}; valid: {', '.join(self._ACTIVATIONS)}"
            )
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.linear.bias)
        self.activation = activation
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        if self.activation == "relu":
            return torch.relu(y)
        if self.activation == "tanh":
            return torch.tanh(y)
        return y


# --------------------------------------------------------------------------- matches


@dataclass(frozen=True)
class Match:
    """One intermediate match between a teacher layer and a student layer.

    ``mmd`` and ``fsp`` take layer pairs ``(a, b)``; the other kinds take one layer index
    (conventions in the module docstring). ``projection`` maps the student's features to the
    teacher's width before the loss: TextBrewer projects the student side too, and a learned
    map on the teacher side could shrink the teacher's features to make the loss trivially small.
    ``projection_lr`` is the projection's own learning rate (None: the student's).
    """

    kind: str
    teacher_layer: int | tuple[int, int]
    student_layer: int | tuple[int, int]
    weight: float = 1.0
    projection: str | None = None
    projection_lr: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in MATCH_KINDS:
            raise MatchError(f"unknown match kind {self.kind!r}; valid kinds: {', '.join(MATCH_KINDS)}")
        for side, layer in (("teacher_layer", self.teacher_layer), ("student_layer", self.student_layer)):
            if self.spec.pair:
                ok = isinstance(layer, tuple) and len(layer) == 2 and all(_is_index(x) for x in layer)
                need = "a pair of layer indices (a, b)"
            else:
                ok = _is_index(layer)
                need = "one layer index"
            if not ok:
                raise MatchError(f"match {self.kind!r}: {side}={layer!r} must be {need}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise MatchError(f"match {self.kind!r}: weight={self.weight} must be a finite number >= 0")
        if self.projection is not None:
            if self.projection not in PROJECTIONS:
                raise MatchError(
                    f"match {self.kind!r}: unknown projection {self.projection!r}; "
                    f"valid: {', '.join(PROJECTIONS)} or none"
                )
            if self.feature == "attention":
                raise MatchError(
                    f"match {self.kind!r}: attention maps have no width to project; remove projection"
                )
        if self.projection_lr is not None:
            if self.projection is None:
                raise MatchError(f"match {self.kind!r}: projection_lr={self.projection_lr} needs a projection to "
                                 "train; set projection: linear (or relu/tanh) or remove projection_lr")
            if not (math.isfinite(self.projection_lr) and self.projection_lr > 0):
                raise MatchError(f"match {self.kind!r}: projection_lr={self.projection_lr} must be a finite "
                                 "number > 0, or null for the student's lr")

    @property
    def spec(self) -> MatchKind:
        """The kind's registry entry (``stages.kinds.MATCH_KINDS``)."""
        return MATCH_KINDS[self.kind]

    @property
    def feature(self) -> str:
        """``"hidden"`` or ``"attention"``: which model output the match reads."""
        return self.spec.feature

    @property
    def token_level(self) -> bool:
        """True if the match compares every token (teacher and student must tokenise alike)."""
        return self.spec.tokens == "all"

    @property
    def label(self) -> str:
        """Short stable name for logs, e.g. ``hidden_mse.t4.s1`` or ``mmd.t4-4.s1-1``."""
        return f"{self.kind}.t{_layer_text(self.teacher_layer)}.s{_layer_text(self.student_layer)}"


def _is_index(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _layer_text(layer: int | tuple[int, int]) -> str:
    return "-".join(str(x) for x in layer) if isinstance(layer, tuple) else str(layer)


def _layers(layer: int | tuple[int, int]) -> tuple[int, ...]:
    return layer if isinstance(layer, tuple) else (layer,)


def feature_map(hidden_states: Sequence[Tensor] = (), attentions: Sequence[Tensor] = ()) -> dict[str, Tensor]:
    """Key a model's Hugging Face outputs as ``"hidden.{i}"`` / ``"attention.{i}"`` (cache naming)."""
    features = {f"hidden.{i}": h for i, h in enumerate(hidden_states)}
    features.update({f"attention.{i}": a for i, a in enumerate(attentions)})
    return features


def _feature(features: Mapping[str, Tensor], feature: str, layer: int, side: str) -> Tensor:
    key = f"{feature}.{layer}"
    if key not in features:
        have = sorted(k for k in features if k.startswith(feature + "."))
        raise MatchError(
            f"{side} {feature} layer {layer} is not available (have: {', '.join(have) or 'none'}); "
            f"precompute or output that layer, or change the match"
        )
    return features[key]


def match_loss(
    match: Match,
    student: Mapping[str, Tensor],
    teacher: Mapping[str, Tensor],
    mask: Tensor | None = None,
    projection: nn.Module | None = None,
) -> Tensor:
    """Loss of one match, *not* multiplied by ``match.weight`` (the caller applies the weight
    and any schedule, so per-term logs can show either).

    ``student`` and ``teacher`` map ``"hidden.{i}"`` / ``"attention.{i}"`` to tensors (see
    ``feature_map``), so live outputs and cached arrays work alike. A teacher hidden state of
    shape ``[B, H]`` (cached "first token only") is compared with the student's token 0.
    ``projection`` (if any) is applied to the student's hidden states.
    """
    fn = MATCH_LOSSES[match.kind]
    if match.feature == "attention":
        s = _feature(student, "attention", match.student_layer, "student")
        t = _feature(teacher, "attention", match.teacher_layer, "teacher")
        return fn(s, t, mask)

    s_layers = [_feature(student, "hidden", i, "student") for i in _layers(match.student_layer)]
    t_layers = [_feature(teacher, "hidden", i, "teacher") for i in _layers(match.teacher_layer)]
    if projection is not None:
        s_layers = [projection(s) for s in s_layers]
    if match.spec.pair:
        if any(t.dim() != 3 for t in t_layers):
            raise MatchError(
                f"match {match.label} needs teacher hidden states for all tokens, but the cache holds "
                "the first token only; precompute with all tokens kept for these layers"
            )
        return fn(s_layers[0], s_layers[1], t_layers[0], t_layers[1], mask)

    s, t = s_layers[0], t_layers[0]
    if t.dim() == 2 and s.dim() == 3:
        s, mask = s[:, 0], None  # cached first token only: compare [CLS] vectors
    return fn(s, t, mask)


def build_projections(matches: Sequence[Match], student_dim: int, teacher_dim: int) -> nn.ModuleList:
    """One module per match: a ``Projection`` (student_dim -> teacher_dim) or ``nn.Identity``.

    Built in match order from torch's RNG, so the same seed gives the same weights. Each carries
    its match's ``projection_lr`` (the training loop gives it its own optimizer group).
    """
    return nn.ModuleList(
        nn.Identity() if m.projection is None else Projection(student_dim, teacher_dim, m.projection, m.projection_lr)
        for m in matches
    )


def _valid_range(feature: str, num_layers: int) -> tuple[int, int]:
    return (0, num_layers) if feature == "hidden" else (0, num_layers - 1)


def check_matches(matches: Sequence[Match], teacher_layers: int, student_layers: int) -> None:
    """Raise ``MatchError`` for the first layer index outside the model's range.

    ``*_layers`` are transformer block counts (``config.num_hidden_layers``).
    """
    for m in matches:
        for side, layer, count in (
            ("teacher", m.teacher_layer, teacher_layers),
            ("student", m.student_layer, student_layers),
        ):
            low, high = _valid_range(m.feature, count)
            for i in _layers(layer):
                if not low <= i <= high:
                    raise MatchError(
                        f"match {m.label}: {side} {m.feature} layer {i} is out of range; the {side} has "
                        f"{count} layers, so valid {m.feature} layers are {low}..{high}"
                    )


def needed_teacher_layers(matches: Sequence[Match]) -> tuple[set[int], set[int]]:
    """The teacher's (hidden, attention) layer indices the matches read, for precompute."""
    hidden: set[int] = set()
    attention: set[int] = set()
    for m in matches:
        (attention if m.feature == "attention" else hidden).update(_layers(m.teacher_layer))
    return hidden, attention


# --------------------------------------------------------------------------- presets

PRESET_NAMES = tuple(PRESETS)


def _teacher_for(i: int, teacher_layers: int, student_layers: int) -> int:
    # half-up rounding; Python's round() rounds halves to even, which would skew pairs.
    return math.floor(i * teacher_layers / student_layers + 0.5)


def preset_matches(name: str, teacher_layers: int, student_layers: int) -> list[Match]:
    """Matches of a named preset (or several joined with ``+``) for the real layer counts.

    TextBrewer hard-codes 12 -> N (e.g. ``L3_hidden_mse`` pairs hidden (0,0), (4,1), (8,2),
    (12,3)). Here every student hidden layer i in 0..Ls pairs with teacher layer
    round(i * Lt / Ls), which gives TextBrewer's pairs for 12 -> 3 and still works when the
    student's real depth differs from the name's (the name's depth is then ignored).
    ``smmd`` uses ``mmd`` and ``sgram`` ``fsp`` on (i, i) pairs; ``n``/``t`` variants and
    ``small_hidden_mse`` add a linear projection. Attention presets pair student attention j
    (block j + 1) with the teacher's last block of its group: attention max(round((j + 1) * Lt / Ls), 1) - 1.
    ``small_*`` presets (``Preset.every == 2``) match every second student layer and the last:
    TextBrewer's (0, 0), (2, 2), ..., (12, 12) for 12 -> 12.
    """
    if teacher_layers < 1 or student_layers < 1:
        raise MatchError(
            f"layer counts must be >= 1, got teacher={teacher_layers}, student={student_layers}; "
            "check the models' num_hidden_layers"
        )
    matches: list[Match] = []
    for part in name.split("+"):
        part = part.strip()
        if part not in PRESETS:
            raise MatchError(f"unknown match preset {part!r}; valid presets: {', '.join(PRESET_NAMES)}")
        kind, depth, projection, every = PRESETS[part]
        if depth != student_layers:
            logger.info("preset %s names %d student layers; adapting to %d", part, depth, student_layers)
        # Student hidden layers (0 = embeddings) or blocks (attention) to match: every n-th and the last.
        picked = sorted(set(range(0, student_layers + 1, every)) | {student_layers})
        if MATCH_KINDS[kind].feature == "attention":
            for block in picked[1:]:
                # max: a student deeper than its teacher would otherwise map block 1 to "block 0".
                t = max(_teacher_for(block, teacher_layers, student_layers), 1) - 1
                matches.append(Match(kind, t, block - 1))
            continue
        for i in picked:
            t = _teacher_for(i, teacher_layers, student_layers)
            if MATCH_KINDS[kind].pair:
                matches.append(Match(kind, (t, t), (i, i), projection=projection))
            else:
                matches.append(Match(kind, t, i, projection=projection))
    return matches
