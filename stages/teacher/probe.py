"""What a causal-LM cache's codec keeps of the teacher's next-token distribution, and what it costs per token.

- `lm_cache_info(path, deep=...)` (`kd cache info`): a finished LM cache's codec, capture temperature, codec
  options, bytes per token, and with `deep` the teacher mass outside the cached ids, read from the cache itself.
- `probe_codecs(cfg, ...)` (`kd cache probe`): runs the configured teacher once over a few blocks of the data
  precompute reads and, from its full distributions, measures each candidate top-k and sampled codec before a cache
  is written, and recommends k and n for a bytes-per-token budget.

The probe's measures, per token, averaged over every position of the probed blocks (p is the teacher's softmax at
the capture temperature `precompute.lm.temperature`, as every codec stores it; V the vocabulary):

- top-k tail mass: the mass outside the k most likely ids, exact (float64 over the full distribution).
- top-k KL gap: KL(p || p_k) in nats, p_k = p on the k ids and the tail mass spread evenly over the other V - k.
  It is what the bucketed top-k loss (k ids + one bucket) cannot see: for any student s whose own tail is spread
  evenly, KL(p || s) - KL_bucket(p || s) = KL(p || p_k) exactly (for any s the gap is the tail mass times the KL
  between the teacher's and the student's tail shapes; this is it against an even student tail). It needs no
  student, is 0 when the tail is empty (k = V) and grows with how uneven the teacher's tail is.
- sampled relative standard deviation: each candidate n is encoded `draws` times with other seeds through the
  codec itself (`lm_codecs._encode_chunk`) and scored with the sampled loss (`losses.sampled_kl`) against a stand-in
  student s = softmax(log p / 2) (the teacher at temperature 2: same ranking, flatter, as a partly trained student
  is). Reported: the per-token standard deviation over the draws (pooled over tokens) divided by the mean exact
  KL(p || s). A batch mean over B tokens has about 1/sqrt(B) of it.
- bytes per token: the codec's own fields (`lm_codecs.codec_fields`), width x item size summed; every LM cache also
  stores `input_ids` (4 B) and `char_offsets` (8 B) per token whatever the codec.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch

import cache_format as cf
from stages._io import progress_bar
from stages.config import Config, ConfigError
from stages.data import collate
from stages.kinds import TASK_KINDS
from stages.losses import sampled_kl
from stages.models import head_logits, load_model_config, load_tokenizer, resolve_model
from stages.tasks import TeacherSpec, get_task, load_split
from stages.tasks.lm_codecs import _encode_chunk, codec_fields, row_seed
from stages.train import pick_device

__all__ = ["PROBE_KS", "PROBE_SAMPLES", "lm_cache_info", "probe_codecs", "recommend"]

# Candidate k and n of `kd cache probe` when none are given (k above the vocabulary is left out).
PROBE_KS = (4, 8, 16, 32, 64, 128, 256)
PROBE_SAMPLES = (4, 8, 12, 16, 32, 64)
# Stored per token by every causal_lm cache whatever the codec (the student's inputs and the text offsets).
_TASK_FIELDS = ("input_ids", "char_offsets")
# The stand-in student of the sampled estimate: the captured teacher distribution at this temperature.
_REFERENCE_TEMPERATURE = 2.0
# Values of one float64 [tokens, V] array per chunk of the probe (32 MiB); a few such arrays are alive at once.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# A finished cache


def lm_cache_info(path: str | os.PathLike, *, deep: bool = False, batch_rows: int = 64) -> dict[str, Any] | None:
    """The LM codec summary of the finished cache at `path`, or None when it is not a causal-LM cache.

    Keys: codec, temperature (the capture temperature; 1.0 for a cache recorded before it existed), the codec's
    options (k; samples, proposal_temperature, seed), `per_token_fields` (name, dtype, width, bytes, and whether
    the codec stores it), `codec_bytes_per_token` and `bytes_per_token` (every field stored once per token).
    With `deep` (reads every row): `tokens` and `tail_mass`, the mean teacher mass outside the cached ids (topk:
    exp(tail_logprob), or 1 - sum exp(topk_logprobs) for a cache without that field; sampled: 1 - the sum of
    exp(sample_logprobs) over the slots with a count, and `distinct_ids`, their mean number; dense: 0).
    """
    manifest = cf.load_manifest(path)
    lm = manifest.settings.get("lm")
    if not isinstance(lm, dict) or "codec" not in lm:
        return None
    per_token = [f for f in manifest.fields if f.shape[:1] == ("T",) and f.shape.count("T") == 1]
    fields = [{"name": f.name, "dtype": f.dtype, "width": f.size(1), "bytes": f.size(1) * f.storage_dtype.itemsize,
               "codec": f.name not in _TASK_FIELDS} for f in per_token]
    options = {key: lm[key] for key in ("k", "samples", "proposal_temperature", "seed") if key in lm}
    out: dict[str, Any] = {
        "codec": lm["codec"],
        "temperature": float(lm.get("temperature", 1.0)),  # absent: captured before the setting existed, at 1
        **options,
        "per_token_fields": fields,
        "codec_bytes_per_token": sum(f["bytes"] for f in fields if f["codec"]),
        "bytes_per_token": sum(f["bytes"] for f in fields),
    }
    if deep:
        out.update(_cached_tail_mass(path, lm["codec"], {f.name for f in manifest.fields}, batch_rows))
    return out


def _cached_tail_mass(path: str | os.PathLike, codec: str, names: set[str], batch_rows: int) -> dict[str, Any]:
    """Mean over every cached token of the teacher mass outside the cached ids (float64 sums)."""
    if codec == "dense":  # every id is cached
        return {"tokens": int(cf.cache_info(path)["tokens"]), "tail_mass": 0.0}
    if codec == "topk":
        fields = ["tail_logprob"] if "tail_logprob" in names else ["topk_logprobs"]
    else:
        fields = ["sample_counts", "sample_logprobs"]
    reader = cf.CacheReader(path)
    tokens, tail_sum, distinct_sum = 0, 0.0, 0.0
    try:
        for start in range(0, len(reader.ids), batch_rows):
            got = reader.gather(reader.ids[start : start + batch_rows], fields=fields)
            mask = np.arange(got[fields[0]].shape[1])[None, :] < got["length"][:, None]
            if "tail_logprob" in got:
                tail = np.exp(got["tail_logprob"].astype(np.float64))
            elif "topk_logprobs" in got:  # rounded float16 sums may pass 1: that tail is empty, not negative
                tail = np.clip(1.0 - np.exp(got["topk_logprobs"].astype(np.float64)).sum(-1), 0.0, None)
            else:
                used = got["sample_counts"] > 0
                held = np.where(used, np.exp(got["sample_logprobs"].astype(np.float64)), 0.0).sum(-1)
                tail = np.clip(1.0 - held, 0.0, None)
                distinct_sum += float(used.sum(-1)[mask].sum())
            tokens += int(mask.sum())
            tail_sum += float(tail[mask].sum())
    finally:
        reader.close()
    out: dict[str, Any] = {"tokens": tokens, "tail_mass": tail_sum / tokens if tokens else None}
    if codec == "sampled":
        out["distinct_ids"] = distinct_sum / tokens if tokens else None
    return out


# ----------------------------------------------------------------------------------------------------------------
# The probe


def probe_codecs(cfg: Config, *, blocks: int = 8, ks: Sequence[int] | None = None,
                 samples: Sequence[int] | None = None, draws: int = 4, budget: float | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Measure the top-k and sampled codecs on `blocks` blocks of `data.<precompute.split>` (evenly spread) with
    `precompute.teachers[0]` at `precompute.max_length` and `precompute.lm` (temperature, proposal temperature,
    seed), before any cache is written; nothing is written.

    `ks` / `samples`: the candidates (default PROBE_KS up to the vocabulary, PROBE_SAMPLES); `draws`: seeded
    encodings per candidate n (>= 2, for a standard deviation); `budget`: bytes per token the recommendation may
    spend (default: a top-k cache at `precompute.lm.k`). Returns a JSON-ready dict: the settings probed, one row
    per k (`topk`) and per n (`sampled`), and `recommended` (`recommend`). See the module docstring for the measures.
    """
    if not TASK_KINDS[cfg.data.task].language_model:
        raise ConfigError(f"kd cache probe measures causal-LM cache codecs; data.task is {cfg.data.task}, "
                          "set data.task: causal_lm")
    if draws < 2:
        raise ConfigError(f"draws must be at least 2 to measure a standard deviation (got {draws})")
    if blocks < 1:
        raise ConfigError(f"blocks must be at least 1 (got {blocks})")
    p = cfg.precompute
    lm = p.lm
    teacher = p.teachers[0]
    source = resolve_model(teacher)
    task = get_task(cfg.data)
    # What can fail cheaply (the model's config, the candidates, the data) before the weights are loaded.
    config = load_model_config(source)
    task.check_teacher(config, teacher, TeacherSpec.from_config(p))
    vocab = int(config.get_text_config().vocab_size)
    ks = _candidates(ks if ks is not None else [k for k in PROBE_KS if k <= vocab], 1, vocab, "k", vocab)
    samples = _candidates(samples if samples is not None else PROBE_SAMPLES, 1, 255, "samples", vocab)
    enc = task.encode(load_tokenizer(source), load_split(cfg, p.split), p.max_length)
    model = task.load_teacher(source)
    rows = np.unique(np.linspace(0, len(enc.ids) - 1, num=min(blocks, len(enc.ids))).round().astype(np.int64))
    device = pick_device(p.device)
    model.to(device).eval()
    stats = _Stats(ks, samples, draws)
    sampled_lm = {n: lm.model_copy(update={"codec": "sampled", "samples": n}) for n in samples}
    with progress_bar(total=len(rows), desc=f"probe {os.path.basename(teacher)}", unit="block",
                      hide_below=0 if progress else len(rows) + 1) as bar, torch.inference_mode():
        for r in rows.tolist():
            batch, ids = collate(enc, np.array([r]))
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = task.teacher_forward(model, batch, hidden=False, attentions=False).last_hidden_state[0]
            gens = {(n, d): torch.Generator(device=device) for n in samples for d in range(draws)}
            for (n, d), gen in gens.items():  # a seed per row and draw, as precompute seeds each row's draws
                gen.manual_seed(row_seed(lm.seed, f"{ids[0]}\0probe-{n}-{d}"))
            length = int(enc.lengths[r])
            chunk = max(1, _CHUNK_ELEMENTS // vocab)
            for start in range(0, length, chunk):
                logits = head_logits(model, hidden[start : min(start + chunk, length)]).float()
                stats.add(logits, lm.temperature, sampled_lm, gens)
            bar.update(1)
    return _result(stats, teacher, vocab, len(rows), p.split, p.max_length, lm, draws, budget)


def _result(stats: _Stats, teacher: str, vocab: int, blocks: int, split: str, max_length: int, lm: Any, draws: int,
            budget: float | None) -> dict[str, Any]:
    """The probe's JSON-ready result (see `probe_codecs`)."""
    topk = {k: lm.model_copy(update={"codec": "topk", "k": k}) for k in stats.ks}
    sampled = {n: lm.model_copy(update={"codec": "sampled", "samples": n}) for n in stats.samples}
    if budget is None:  # a top-k cache at precompute.lm.k
        budget = _codec_bytes(lm.model_copy(update={"codec": "topk"}), vocab)
    result = {
        "teacher": teacher,
        "vocab_size": vocab,
        "split": split,
        "max_length": max_length,
        "blocks": blocks,
        "tokens": stats.tokens,
        "temperature": float(lm.temperature),
        "proposal_temperature": float(lm.proposal_temperature),
        "draws": draws,
        "reference_student": f"the teacher's distribution at temperature {_REFERENCE_TEMPERATURE:g}: "
                             f"softmax(log p / {_REFERENCE_TEMPERATURE:g})",
        "bytes_counted": "the codec's fields only; every LM cache adds input_ids and char_offsets (12 B/token)",
        "reference_kl": stats.reference_kl(),
        "topk": [{"k": k, "bytes_per_token": _codec_bytes(topk[k], vocab), **stats.topk_row(k)} for k in stats.ks],
        "sampled": [{"samples": n, "bytes_per_token": _codec_bytes(sampled[n], vocab), **stats.sampled_row(n)}
                    for n in stats.samples],
        "budget": float(budget),
    }
    result["recommended"] = recommend(result, result["budget"])
    return result


def recommend(result: dict[str, Any], budget: float) -> dict[str, Any]:
    """The best top-k and sampled candidate of a probe `result` within `budget` bytes per token: the largest k
    that fits (its tail mass and KL gap are the smallest: both only fall as k grows), and the n that fits with
    the smallest relative standard deviation; None where no candidate fits."""
    fit_k = [row for row in result["topk"] if row["bytes_per_token"] <= budget]
    fit_n = [row for row in result["sampled"] if row["bytes_per_token"] <= budget and row["rel_std"] is not None]
    best_n = min(fit_n, key=lambda row: (row["rel_std"], row["bytes_per_token"])) if fit_n else None
    return {"budget": budget,
            "k": max(fit_k, key=lambda row: row["k"])["k"] if fit_k else None,
            "samples": best_n["samples"] if best_n else None}


def _candidates(values: Sequence[int], low: int, high: int, what: str, vocab: int) -> list[int]:
    values = sorted({int(v) for v in values})
    bad = [v for v in values if not low <= v <= high]
    if not values or bad:
        why = f"the teacher's vocabulary has {vocab} ids" if what == "k" else "counts are stored as uint8"
        raise ConfigError(f"probe {what} must be in [{low}, {high}] ({why}); got {bad or 'none'}")
    return values


def _plog(p: torch.Tensor, log_x: torch.Tensor) -> torch.Tensor:
    """p * log_x elementwise, 0 where p = 0 (an id a model rules out has log p = -inf: no 0 * inf = NaN)."""
    return torch.where(p > 0, p * log_x, torch.zeros((), dtype=p.dtype, device=p.device))


def _codec_bytes(lm: Any, vocab: int) -> int:
    return sum(f.size(1) * f.storage_dtype.itemsize for f in codec_fields(lm, vocab))


class _Stats:
    """Sums over the probed tokens (float64), chunk by chunk: the full [tokens, V] distributions never coexist."""

    def __init__(self, ks: list[int], samples: list[int], draws: int) -> None:
        self.ks, self.samples, self.draws = ks, samples, draws
        self.tokens = 0
        self.ref_kl = 0.0
        self.tail = dict.fromkeys(ks, 0.0)
        self.gap = dict.fromkeys(ks, 0.0)
        self.var = dict.fromkeys(samples, 0.0)  # per-token variance over the draws, summed over tokens
        self.est = dict.fromkeys(samples, 0.0)  # the estimates, summed over tokens and draws
        self.sampled_tail = dict.fromkeys(samples, 0.0)  # mass outside the distinct ids of the first draw
        self.distinct = dict.fromkeys(samples, 0.0)

    def add(self, logits: torch.Tensor, temperature: float, sampled_lm: dict[int, Any],
            gens: dict[tuple[int, int], torch.Generator]) -> None:
        """One chunk of raw float32 logits [n, V] (the codecs divide by the capture temperature themselves)."""
        n, vocab = logits.shape
        logp = (logits.double() / temperature).log_softmax(-1)
        p = logp.exp()
        self.tokens += n
        self._add_topk(logp, p, vocab)
        log_s = (logp / _REFERENCE_TEMPERATURE).log_softmax(-1)
        self.ref_kl += float(_plog(p, logp - log_s).sum())
        log_s32 = log_s.float()
        for k in self.samples:
            est = torch.empty(self.draws, n, dtype=torch.float64, device=logits.device)
            for d in range(self.draws):
                f = _encode_chunk(logits, sampled_lm[k], gens[(k, d)])
                est[d] = sampled_kl(log_s32, f["sample_ids"], f["sample_counts"], f["sample_logprobs"],
                                    f["proposal_lognorm"], proposal_temperature=sampled_lm[k].proposal_temperature,
                                    samples=k, normalized=True).double()
                if d == 0:
                    used = f["sample_counts"] > 0
                    held = torch.where(used, p.gather(1, f["sample_ids"].long()), 0.0).sum(-1)
                    self.sampled_tail[k] += float((1.0 - held).clamp_min(0.0).sum())
                    self.distinct[k] += float(used.sum())
            self.var[k] += float(est.var(dim=0, correction=1).sum())
            self.est[k] += float(est.sum())

    def _add_topk(self, logp: torch.Tensor, p: torch.Tensor, vocab: int) -> None:
        below = [k for k in self.ks if k < vocab]  # k = V: no tail, no gap
        if not below:
            return
        total_p, total_plogp = p.sum(-1), _plog(p, logp).sum(-1)
        top = logp.topk(max(below), dim=-1, sorted=True).values
        head_p, head_plogp = top.exp().cumsum(-1), _plog(top.exp(), top).cumsum(-1)
        for k in below:
            tail = (total_p - head_p[:, k - 1]).clamp_min(0.0)
            # KL(p || p_k) = sum over the tail of p log p - tail log(tail / (V - k)); the head terms cancel.
            gap = total_plogp - head_plogp[:, k - 1] - torch.xlogy(tail, tail) + tail * math.log(vocab - k)
            self.tail[k] += float(tail.sum())
            self.gap[k] += float(gap.clamp_min(0.0).sum())  # >= 0; a rounding residue below it is no gap

    def reference_kl(self) -> float | None:
        return self.ref_kl / self.tokens if self.tokens else None

    def topk_row(self, k: int) -> dict[str, Any]:
        t = max(self.tokens, 1)
        return {"tail_mass": self.tail[k] / t, "kl_gap": self.gap[k] / t}

    def sampled_row(self, n: int) -> dict[str, Any]:
        t = max(self.tokens, 1)
        ref = self.reference_kl()
        std = math.sqrt(self.var[n] / t)
        return {"distinct_ids": self.distinct[n] / t, "tail_mass": self.sampled_tail[n] / t,
                "mean_estimate": self.est[n] / (t * self.draws), "std": std,
                "rel_std": std / ref if ref else None}
