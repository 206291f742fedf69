"""The one registry of distillation loss kinds: what each needs, without torch.

`stages/config.py` validates settings against these tables without importing torch, and
`stages/losses/kd.py` attaches a loss function to every match kind (`losses.MATCH_LOSSES`), so
adding a kind is one entry here plus its function there. Likewise for language models: the cache codecs
(`LM_CODECS`, coded in stages/tasks/lm_codecs.py) and the KD losses (`LM_LOSSES`, functions attached in
stages/losses/lm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = ["KD_KINDS", "MatchKind", "MATCH_KINDS", "MATCH_ALIASES", "PROJECTIONS", "Preset", "PRESETS", "TaskKind",
           "TASK_KINDS", "LMCodec", "LM_CODECS", "LMLoss", "LM_LOSSES", "TOPK_TAILS", "ULD_CODEC"]

# Soft-label losses on logits (`kd_loss(kind=...)`, setting distill.kd.loss).
KD_KINDS = ("kl", "ce", "mse")


@dataclass(frozen=True)
class MatchKind:
    """What an intermediate match kind reads from the teacher and student.

    feature: which model output it compares ("hidden" states or "attention" maps).
    pair: True if it takes a pair of layers (a, b) on each side, False for one layer.
    tokens: "all" if it compares every token (so the teacher cache must keep all tokens and the
        student must tokenise like the teacher), "first" if it reads token 0 ([CLS]) only.
    any_heads: for attention kinds, True if the heads are summed or averaged first, so the
        student and teacher may have different head counts.
    any_width: for hidden kinds, True if the student's and teacher's widths may differ without a
        projection (mmd compares token-by-token similarity matrices, [T, T] on both sides).
    """

    feature: Literal["hidden", "attention"]
    pair: bool
    tokens: Literal["all", "first"]
    any_heads: bool = False
    any_width: bool = False


MATCH_KINDS: dict[str, MatchKind] = {
    "hidden_mse": MatchKind("hidden", pair=False, tokens="all"),
    "hidden_cosine": MatchKind("hidden", pair=False, tokens="all"),
    "pkd": MatchKind("hidden", pair=False, tokens="first"),
    "mmd": MatchKind("hidden", pair=True, tokens="all", any_width=True),
    "fsp": MatchKind("hidden", pair=True, tokens="all"),
    "attention_mse": MatchKind("attention", pair=False, tokens="all"),
    "attention_ce": MatchKind("attention", pair=False, tokens="all"),
    "attention_mse_sum": MatchKind("attention", pair=False, tokens="all", any_heads=True),
    "attention_ce_mean": MatchKind("attention", pair=False, tokens="all", any_heads=True),
}

# TextBrewer's other names for the same losses; the settings resolve them on load, so only the
# names above reach the code.
MATCH_ALIASES: dict[str, str] = {"gram": "fsp", "nst": "mmd"}

# Activations of the learned student -> teacher width map (`Match.projection`).
PROJECTIONS = ("linear", "relu", "tanh")


class Preset(NamedTuple):
    """A TextBrewer preset: `losses.preset_matches` adapts it to the real layer counts.

    kind: the match kind. depth: the student depth the name stands for (informational).
    projection: the student -> teacher width map, if any. every: match every n-th student layer
    (and always the last): TextBrewer's ``small_*`` presets match every second layer of a
    same-depth, narrower student (ELECTRA-small).
    """

    kind: str
    depth: int
    projection: str | None = None
    every: int = 1


PRESETS: dict[str, Preset] = {
    "L3_hidden_mse": Preset("hidden_mse", 3),
    "L3n_hidden_mse": Preset("hidden_mse", 3, "linear"),
    "L3_hidden_smmd": Preset("mmd", 3),
    "L4_hidden_mse": Preset("hidden_mse", 4),
    "L4t_hidden_mse": Preset("hidden_mse", 4, "linear"),
    "L4_hidden_smmd": Preset("mmd", 4),
    "L4t_hidden_sgram": Preset("fsp", 4, "linear"),
    "L6_hidden_mse": Preset("hidden_mse", 6),
    "L6_hidden_smmd": Preset("mmd", 6),
    "small_hidden_mse": Preset("hidden_mse", 12, "linear", every=2),
    "small_hidden_smmd": Preset("mmd", 12, every=2),
    **{f"L{depth}_attention_{loss}": Preset(f"attention_{loss}", depth)
       for depth in (3, 4, 6) for loss in ("mse", "ce", "mse_sum", "ce_mean")},
}


@dataclass(frozen=True)
class TaskKind:
    """What a task kind (setting data.task) reads, for the settings' checks; the code is stages/tasks/<name>.py.

    options: the data.* keys only this kind reads (setting one for another kind is an error).
    token_axis: what the cache's ragged "T" axis counts: "tokens" (the teacher's sub-tokens) or "words".
    sequence_kd: True if teacher logits are one class distribution per example, so the sequence-level
        extras (temperature schedules, probability shift, combining teachers' probabilities) apply.
    transfer: True if an unlabelled transfer set (data.transfer) is supported.
    """

    options: tuple[str, ...] = ()
    token_axis: Literal["tokens", "words"] = "tokens"
    sequence_kd: bool = False
    transfer: bool = False
    regression: bool = False  # one float target: data.num_labels and label_names do not apply
    windows: bool = False  # long inputs are cut into windows of teacher tokens: the student must tokenise alike
    language_model: bool = False  # next-token prediction over packed blocks of text: precompute.lm, distill.lm
    method: str = "kd"  # the stages/methods module that serves distill.method: kd for this kind


TASK_KINDS: dict[str, TaskKind] = {
    "sequence_classification": TaskKind(sequence_kd=True, transfer=True),
    "multi_label": TaskKind(options=("label_delimiter", "threshold")),
    "regression": TaskKind(regression=True),
    "token_classification": TaskKind(options=("tokens_field", "tags_field", "label_all_subwords"),
                                     token_axis="words"),
    "extractive_qa": TaskKind(options=("question_field", "context_field", "answers_field", "doc_stride",
                                       "max_answer_length"), windows=True),
    "causal_lm": TaskKind(language_model=True, method="lm"),
}


@dataclass(frozen=True)
class LMCodec:
    """What a causal-LM cache codec (setting precompute.lm.codec) stores per token; the code is
    stages/tasks/lm_codecs.py.

    fields: the per-token cache fields it writes, in cache order.
    kd_fields: the fields its cached KD term reads (stages/methods/lm.py; also how a cache's codec is recognised).
    options: the precompute.lm keys only this codec reads (setting one for another codec is an error).
    """

    fields: tuple[str, ...]
    kd_fields: tuple[str, ...]
    options: tuple[str, ...] = ()


LM_CODECS: dict[str, LMCodec] = {
    "dense": LMCodec(("logprobs",), ("logprobs",), options=("max_dense_vocab",)),
    "topk": LMCodec(("topk_ids", "topk_logprobs", "tail_logprob"), ("topk_ids", "topk_logprobs", "tail_logprob"),
                    options=("k",)),
    "sampled": LMCodec(("sample_ids", "sample_counts", "sample_logprobs", "proposal_lognorm"),
                       ("sample_ids", "sample_counts", "sample_logprobs", "proposal_lognorm"),
                       options=("samples", "proposal_temperature", "seed")),
}


@dataclass(frozen=True)
class LMLoss:
    """A KD loss of a causal-LM student (setting distill.lm.loss); its function is in stages/losses/lm.py
    (`LM_LOSS_FUNCTIONS`).

    codecs: the cache codecs that serve it (distill.teacher_signal: cached). A dense cache serves every loss
        exactly; a top-k cache serves each loss on the k cached ids plus one bucket for the rest of the
        vocabulary (the loss between the two coarsened distributions); the sampled codec's importance-weighted
        estimate exists for forward KL only. Online (the teacher's full logits at every step) serves every loss.
    options: the distill.lm keys only this loss reads (setting one for another loss is an error).
    """

    codecs: tuple[str, ...]
    options: tuple[str, ...] = ()


LM_LOSSES: dict[str, LMLoss] = {
    "forward_kl": LMLoss(codecs=("dense", "topk", "sampled")),
    "reverse_kl": LMLoss(codecs=("dense", "topk")),
    "jsd": LMLoss(codecs=("dense", "topk"), options=("jsd_beta",)),
    "tvd": LMLoss(codecs=("dense", "topk")),
    "skew_kl": LMLoss(codecs=("dense", "topk"), options=("skew_alpha",)),
    "skew_reverse_kl": LMLoss(codecs=("dense", "topk"), options=("skew_alpha",)),
}

# How a cached top-k serves the mass outside its k ids (distill.lm.topk_tail; `losses.topk_loss`).
TOPK_TAILS = ("bucket", "renormalize")

# Universal Logit Distillation (distill.lm.cross_tokenizer: true; `losses.uld_loss`), the KD term for a teacher
# with another tokenizer: it compares sorted probabilities, read from a cache of this codec.
ULD_CODEC = "topk"
