"""The one registry of distillation loss kinds: what each needs, without torch.

`stages/config.py` validates settings against these tables without importing torch, and
`stages/losses.py` attaches a loss function to every match kind (`losses.MATCH_LOSSES`), so
adding a kind is one entry here plus its function there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["KD_KINDS", "MatchKind", "MATCH_KINDS", "PROJECTIONS", "PRESETS"]

# Soft-label losses on logits (`kd_loss(kind=...)`, setting distill.kd.loss).
KD_KINDS = ("kl", "ce", "mse")


@dataclass(frozen=True)
class MatchKind:
    """What an intermediate match kind reads from the teacher and student.

    feature: which model output it compares ("hidden" states or "attention" maps).
    pair: True if it takes a pair of layers (a, b) on each side, False for one layer.
    tokens: "all" if it compares every token (so the teacher cache must keep all tokens and the
        student must tokenise like the teacher), "first" if it reads token 0 ([CLS]) only.
    """

    feature: Literal["hidden", "attention"]
    pair: bool
    tokens: Literal["all", "first"]


MATCH_KINDS: dict[str, MatchKind] = {
    "hidden_mse": MatchKind("hidden", pair=False, tokens="all"),
    "hidden_cosine": MatchKind("hidden", pair=False, tokens="all"),
    "pkd": MatchKind("hidden", pair=False, tokens="first"),
    "mmd": MatchKind("hidden", pair=True, tokens="all"),
    "fsp": MatchKind("hidden", pair=True, tokens="all"),
    "attention_mse": MatchKind("attention", pair=False, tokens="all"),
    "attention_ce": MatchKind("attention", pair=False, tokens="all"),
}

# Activations of the learned student -> teacher width map (`Match.projection`).
PROJECTIONS = ("linear", "relu", "tanh")

# TextBrewer's preset names -> (match kind, student depth named, projection). The depth is
# informational: `losses.preset_matches` adapts the pairs to the real layer counts.
PRESETS: dict[str, tuple[str, int, str | None]] = {
    "L3_hidden_mse": ("hidden_mse", 3, None),
    "L3n_hidden_mse": ("hidden_mse", 3, "linear"),
    "L3_hidden_smmd": ("mmd", 3, None),
    "L3_attention_mse": ("attention_mse", 3, None),
    "L3_attention_ce": ("attention_ce", 3, None),
    "L4_hidden_mse": ("hidden_mse", 4, None),
    "L4t_hidden_mse": ("hidden_mse", 4, "linear"),
    "L4_hidden_smmd": ("mmd", 4, None),
    "L4_attention_mse": ("attention_mse", 4, None),
    "L4_attention_ce": ("attention_ce", 4, None),
    "L6_hidden_mse": ("hidden_mse", 6, None),
    "L6_hidden_smmd": ("mmd", 6, None),
    "L6_attention_mse": ("attention_mse", 6, None),
    "L6_attention_ce": ("attention_ce", 6, None),
}
