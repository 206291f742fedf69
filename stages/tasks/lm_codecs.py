"""What a causal-LM teacher's cache stores per token instead of its [T, V] logits (`precompute.lm.codec`).

Every codec first divides the teacher's float32 logits by the capture temperature T_c (`precompute.lm.temperature`,
default 1), so p below is the teacher's softmax(logits / T_c); T_c is recorded in the manifest (settings["lm"]) and
is part of the cache's folder name.

- dense:   `logprobs` [T, V] float16, log p (small vocabularies only).
- topk:    `topk_ids` [T, k], `topk_logprobs` [T, k] float16 (log p over the whole vocabulary, sorted descending)
           and `tail_logprob` [T] float32 = log of the teacher's mass outside its k ids, computed exactly as a
           logsumexp of the other V - k logits (not as 1 - the rounded top-k sum); the float16 floor -65504
           (probability 0) when the k ids hold all the mass.
- sampled: `samples` ids drawn per token from q ~ p^(1/proposal_temperature), stored as unique ids with counts
           in `samples` slots (`sample_ids`, `sample_counts` uint8, 0 = empty slot with id 0), `sample_logprobs`
           float16 = log p(id) and `proposal_lognorm` [T] float32 = log sum_j p_j^(1/tau), so
           log q(id) = log p(id) / tau - proposal_lognorm (what an unbiased importance-weighted KL needs;
           Anshumann et al., ACL 2025, arXiv 2503.16870).

Ids are uint16 when the vocabulary fits (V <= 65536), else int32. Everything is computed per row and per chunk
of tokens from the teacher's last hidden state and its output head, on the teacher's device, with the softmax in
float32: the full [B, T, V] logits never exist at once. A row's draws come from a torch.Generator seeded from
(seed, row id), so a rerun or a resumed cache holds the same samples whatever the batch the row falls in.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import cache_format as cf
from cache_format import KDError
from stages.kinds import LM_CODECS

__all__ = ["CodecError", "CHUNK_ELEMENTS", "id_dtype", "codec_fields", "codec_settings", "check_codec",
           "check_dense_size", "row_seed", "encode_rows"]

# Logits computed at once per chunk (tokens x vocabulary): 64 MiB in float32. The sampled codec's draws depend
# on how a row is cut into chunks, so changing this changes new sampled caches (a resumed one keeps its rows).
CHUNK_ELEMENTS = 1 << 24
_UINT16_VOCAB = 1 << 16
_F16_MIN = torch.finfo(torch.float16).min  # log-probabilities below it (probability < 1e-28000) are clamped


class CodecError(KDError, ValueError):
    """The codec cannot cache this teacher as asked (k above the vocabulary, a dense cache too large)."""


def id_dtype(vocab_size: int) -> str:
    """The narrowest cache dtype for token ids of a vocabulary of `vocab_size`."""
    return "uint16" if vocab_size <= _UINT16_VOCAB else "int32"


def codec_fields(lm: Any, vocab_size: int) -> list[cf.FieldSpec]:
    """The per-token cache fields of codec `lm.codec` (an LMCacheConfig) for a vocabulary of `vocab_size`, named
    and ordered as `LM_CODECS` (stages/kinds.py) lists them."""
    ids = id_dtype(vocab_size)
    types = {  # every codec's fields: (dtype, shape)
        "logprobs": ("float16", ("T", vocab_size)),
        "topk_ids": (ids, ("T", lm.k)), "topk_logprobs": ("float16", ("T", lm.k)),
        "tail_logprob": ("float32", ("T",)),
        "sample_ids": (ids, ("T", lm.samples)), "sample_counts": ("uint8", ("T", lm.samples)),
        "sample_logprobs": ("float16", ("T", lm.samples)), "proposal_lognorm": ("float32", ("T",)),
    }
    return [cf.FieldSpec(name, *types[name]) for name in LM_CODECS[lm.codec].fields]


def codec_settings(lm: Any) -> dict[str, Any]:
    """The settings that change what codec `lm.codec` stores (part of the cache's identity; recorded in the manifest's
    settings["lm"], where distill reads the capture temperature back)."""
    base = {"codec": lm.codec, "temperature": float(lm.temperature)}
    if lm.codec == "topk":
        return {**base, "k": lm.k}
    if lm.codec == "sampled":
        return {**base, "samples": lm.samples, "proposal_temperature": lm.proposal_temperature, "seed": lm.seed,
                "chunk_elements": CHUNK_ELEMENTS}
    return base


def _bytes_per_token(lm: Any, vocab_size: int) -> int:
    return sum(f.size(1) * f.storage_dtype.itemsize for f in codec_fields(lm, vocab_size))


def check_codec(lm: Any, vocab_size: int, teacher: str) -> None:
    """Raise if the codec cannot hold a vocabulary of `vocab_size` (k above it)."""
    if lm.codec == "topk" and lm.k > vocab_size:
        raise CodecError(f"precompute.lm.k is {lm.k} but teacher {teacher} has a vocabulary of {vocab_size} "
                         f"tokens; set k <= {vocab_size}")


def check_dense_size(lm: Any, vocab_size: int, tokens: int, teacher: str) -> None:
    """Raise if a dense cache of `tokens` tokens is refused: a vocabulary above `lm.max_dense_vocab`."""
    if lm.codec != "dense" or vocab_size <= lm.max_dense_vocab:
        return
    per_token = _bytes_per_token(lm, vocab_size)
    raise CodecError(f"a dense cache of teacher {teacher} takes {per_token:,} bytes per token (vocabulary "
                     f"{vocab_size:,} > precompute.lm.max_dense_vocab {lm.max_dense_vocab:,}), "
                     f"{cf.human_bytes(per_token * tokens)} for these {tokens:,} tokens; use codec topk or "
                     "sampled, or raise max_dense_vocab")


def row_seed(seed: int, row_id: str) -> int:
    """The seed of row `row_id`'s draws: a 63-bit hash of (seed, row id)."""
    digest = hashlib.sha256(f"{seed}\0{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


@torch.no_grad()
def encode_rows(hidden: Tensor, head: Callable[[Tensor], Tensor], vocab_size: int, lengths: Tensor,
                ids: Sequence[str], lm: Any, chunk_tokens: int | None = None) -> dict[str, Tensor]:
    """The codec's fields for a batch: `hidden` [B, T, H] last hidden states, `head` maps hidden states [n, H] to
    float32 logits [n, vocab_size] (`lm_models.head_logits`), `lengths` [B] tokens per row, `ids` the row ids
    (they seed the sampled codec).

    Returns padded [B, T, ...] tensors on `hidden`'s device (float16 log-probabilities, int32 ids, uint8 counts,
    float32 tail log-masses and normalisers); positions past a row's length are zeros. `chunk_tokens` (tokens per
    chunk; default CHUNK_ELEMENTS // V) bounds the logits held at once. `lm.temperature` divides the logits first.
    """
    b, t = hidden.shape[:2]
    vocab = vocab_size
    chunk = chunk_tokens or _chunk_tokens(vocab)
    out = {f.name: torch.zeros((b, t, *f.shape[1:]), dtype=_TORCH[f.dtype], device=hidden.device)
           for f in codec_fields(lm, vocab)}
    for r, n in enumerate(lengths.tolist()):
        gen = None
        if lm.codec == "sampled":
            gen = torch.Generator(device=hidden.device)
            gen.manual_seed(row_seed(lm.seed, ids[r]))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = head(hidden[r, start:stop]).float()  # the softmax below in float32
            owned = logits.untyped_storage().data_ptr() != hidden.untyped_storage().data_ptr()  # not a view
            for name, value in _encode_chunk(logits, lm, gen, owned=owned).items():
                out[name][r, start:stop] = value
    return out


_TORCH = {"float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8, "uint16": torch.int32,
          "int32": torch.int32}


def _encode_chunk(logits: Tensor, lm: Any, gen: torch.Generator | None, *, owned: bool = False) -> dict[str, Tensor]:
    """One chunk's fields from its float32 logits [n, V], at the capture temperature `lm.temperature`.

    `owned`: the caller does not read `logits` again, so the top-k codec may overwrite them. Every pass over
    [n, V] costs about as much as a fifth of the output layer's matmul on a CPU, so each codec makes as few as it
    can (bench/lm_cache.py measures precompute against a bare forward).
    """
    if lm.temperature != 1.0:
        logits, owned = logits / lm.temperature, True
    if lm.codec == "dense":
        return {"logprobs": logits.log_softmax(-1).clamp_min(_F16_MIN).half()}
    if lm.codec == "topk":
        top, ids = logits.topk(lm.k, dim=-1, sorted=True)
        peak = top[:, :1]  # the row's largest logit: exp(logit - peak) <= 1 cannot overflow
        work = logits if owned else logits.clone()
        # The other V - k ids (-inf when k = V); in-place sub/exp/sum takes half the time of logsumexp here.
        rest = work.scatter_(1, ids, float("-inf")).sub_(peak).exp_().sum(-1).log() + peak[:, 0]
        lse = torch.logaddexp(rest, top.logsumexp(-1))
        return {"topk_ids": ids.int(), "topk_logprobs": (top - lse[:, None]).clamp_min(_F16_MIN).half(),
                "tail_logprob": (rest - lse).clamp_min(_F16_MIN)}
    if lm.proposal_temperature == 1.0:
        # q = p: one pass of exp(logit - max) serves the draws (multinomial normalises) and log p of the drawn
        # ids, and log Z is 0.
        peak = logits.amax(-1, keepdim=True)
        weights = (logits if owned else logits.clone()).sub_(peak).exp_()
        draws = torch.multinomial(weights, lm.samples, replacement=True, generator=gen)
        ids, counts = _unique_counts(draws)
        log_total = weights.sum(-1, keepdim=True).log()
        slot_logp = (weights.gather(1, ids).log() - log_total).masked_fill(counts == 0, 0.0)
        lognorm = torch.zeros(len(logits), device=logits.device)
    else:
        logp = logits.log_softmax(-1)
        scaled = logp / lm.proposal_temperature
        lognorm = scaled.logsumexp(-1)
        draws = torch.multinomial(scaled.sub_(lognorm[:, None]).exp_(), lm.samples, replacement=True, generator=gen)
        ids, counts = _unique_counts(draws)
        slot_logp = logp.gather(1, ids).masked_fill(counts == 0, 0.0)
    return {"sample_ids": ids.int(), "sample_counts": counts.to(torch.uint8),
            "sample_logprobs": slot_logp.clamp_min(_F16_MIN).half(), "proposal_lognorm": lognorm}


def _unique_counts(draws: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of `draws` [n, s]: its distinct ids in ascending order, each with its count, in s slots (unused
    slots: id 0, count 0)."""
    ordered = draws.sort(dim=1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = new.long().cumsum(1) - 1  # every draw goes to the slot of its id
    ids = torch.zeros_like(ordered).scatter_(1, slot, ordered)
    counts = torch.zeros_like(ordered).scatter_add_(1, slot, torch.ones_like(ordered))
    return ids, counts
