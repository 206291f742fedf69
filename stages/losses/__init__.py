"""Loss functions, torch only: logit and feature KD (`kd`), the language-model losses over cached sparse
distributions (`lm`), and weight/temperature schedules (`schedules`)."""

from __future__ import annotations

from stages.losses.kd import (
    MatchError,
    LossInputError,
    kd_loss,
    hard_ce_loss,
    hidden_mse,
    hidden_cosine,
    pkd_loss,
    mmd_loss,
    fsp_loss,
    attention_mse,
    attention_ce,
    attention_mse_sum,
    attention_ce_mean,
    Projection,
    Match,
    MATCH_LOSSES,
    feature_map,
    match_loss,
    build_projections,
    check_matches,
    preset_matches,
    PRESET_NAMES,
    needed_teacher_layers,
)
from stages.losses.lm import (
    auto_chunk_tokens,
    LMLossInputError,
    align_by_offsets,
    chunked_loss,
    divergence,
    dense_loss,
    forward_kl,
    generalized_jsd,
    next_token_ce,
    reverse_kl,
    sampled_kl,
    topk_loss,
    uld_loss,
    LM_LOSS_FUNCTIONS,
    CODEC_LOSSES,
)
from stages.losses.schedules import (
    ScheduleError,
    WEIGHT_SCHEDULES,
    weight_at,
    flsw_temperature,
    cwsm_temperature,
    probability_shift,
    combine_teachers,
)

__all__ = ["MatchError", "LossInputError", "kd_loss", "hard_ce_loss", "hidden_mse", "hidden_cosine", "pkd_loss", "mmd_loss", "fsp_loss", "attention_mse", "attention_ce", "attention_mse_sum", "attention_ce_mean", "Projection", "Match", "MATCH_LOSSES", "feature_map", "match_loss", "build_projections", "check_matches", "preset_matches", "PRESET_NAMES", "needed_teacher_layers", "auto_chunk_tokens", "LMLossInputError", "align_by_offsets", "chunked_loss", "divergence", "dense_loss", "forward_kl", "generalized_jsd", "next_token_ce", "reverse_kl", "sampled_kl", "topk_loss", "uld_loss", "LM_LOSS_FUNCTIONS", "CODEC_LOSSES", "ScheduleError", "WEIGHT_SCHEDULES", "weight_at", "flsw_temperature", "cwsm_temperature", "probability_shift", "combine_teachers"]
