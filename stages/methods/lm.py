"""`kd distill` for language models (`data.task: causal_lm`).

The student learns next-token cross-entropy on the text plus a KD term against the teacher's next-token
distribution, read from the cache (`dense`, `topk`, `sampled`: `CachedTeachers`), from a live teacher (online:
the teacher's full logits, served by `OnlineTeachers` like every kind's online signal) or, for a teacher with
another tokenizer, by Universal Logit Distillation over the cached top-k with positions aligned by character
offsets. The codec and loss names are the tables of stages/kinds.py (`LM_CODECS`, `LM_LOSSES`: which codecs serve
which loss). Every path runs at distill.kd.temperature T (a cache only at the T it was captured at) and, with
distill.kd.temperature_squared, multiplies the KD term by T^2. Every loss runs through `chunked_loss` on the
logits of `head_logits` (the output layer as precompute and evaluate apply it, softcapping included), so the
student's [B, T, V] logits never exist in full.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cache_format as cf
from cache_format import KDError
from stages.config import Config, lm_codec_problem, lm_temperature_problem
from stages.kinds import LM_CODECS, LM_LOSSES, ULD_CODEC
from stages.train import fit, save_model
from stages.data import Encoded, Examples
from stages.methods.common import start_method
from stages.methods.kd import DistillResult, distill_settings, load_distill_data, write_metrics
from stages.losses import (CODEC_LOSSES, LM_LOSS_FUNCTIONS, align_by_offsets, auto_chunk_tokens, chunked_loss,
                           next_token_ce, uld_loss)
from stages.models import causal_lm_student, head_logits, lm_metrics
from stages.models import load_causal_lm, load_tokenizer
from stages.tasks import TeacherSpec, get_task
from stages.teacher import CachedTeachers, OnlineTeachers
from stages.models import resolve_model

__all__ = ["distill_lm", "LMObjective"]

_F16_MIN = float(torch.finfo(torch.float16).min)  # a log-probability of 0, as the codecs store it


def _codec(reader: cf.CacheReader) -> str:
    """Which codec a causal-LM cache holds, from the fields its KD term reads (`LM_CODECS`)."""
    for codec, kind in LM_CODECS.items():
        if all(f in reader.fields for f in kind.kd_fields):
            return codec
    if {"topk_ids", "topk_logprobs", "logsumexp"} <= set(reader.fields):
        raise KDError(f"cache {reader.path} is a top-k cache written before the exact tail mass (tail_logprob) was "
                      "stored, and distill reads that field; re-run `kd precompute` (it writes a new folder) and "
                      "point distill at it")
    raise KDError(f"cache {reader.path} holds no next-token distribution (fields: {', '.join(sorted(reader.fields))}); "
                  "point distill.caches at a cache written by `kd precompute` with data.task: causal_lm")


def _check_cache(cfg: Config, reader: cf.CacheReader, codec: str) -> None:
    """The cache can serve distill.lm.loss at distill.kd.temperature: the config's rules for the caches precompute
    writes (stages/config.py `_lm_rules`), checked here against the manifest for any cache."""
    d = cfg.distill
    if not d.lm.cross_tokenizer and codec not in LM_LOSSES[d.lm.loss].codecs:
        raise KDError(f"distill.lm.loss: {lm_codec_problem(d.lm.loss, codec)}")
    lm = reader.manifest.settings.get("lm")
    capture = float(lm.get("temperature", 1.0)) if isinstance(lm, dict) else 1.0  # caches without one: T = 1
    if d.kd.temperature != capture:
        raise KDError("distill.kd.temperature: "
                      + lm_temperature_problem(d.kd.temperature, capture, f"cache {reader.path}"))


def _same_vocabulary(student_tok, teacher_tok) -> bool:
    return student_tok.get_vocab() == teacher_tok.get_vocab()


class LMObjective:
    """Next-token CE + a KD term, computed in one chunked pass over the scored positions.

    `source` serves the teacher signal batch by batch: a cache's codec fields (`CachedTeachers`; `codec` names the
    codec, `settings` are the cache's LM settings) or the live teacher's full `logits` (`OnlineTeachers` with
    `TeacherSpec.full_logits`); None without a teacher."""

    def __init__(self, cfg: Config, source: CachedTeachers | OnlineTeachers | None, codec: str | None,
                 settings: dict, pairs: dict[str, tuple[np.ndarray, np.ndarray]] | None, teacher_length: int):
        self.cfg = cfg
        self.source = source
        self.online = isinstance(source, OnlineTeachers)
        self.codec = codec
        self.settings = settings
        self.pairs = pairs  # cross-tokenizer: row id -> (student positions, teacher positions) to compare
        self.teacher_length = teacher_length
        self.modules = nn.ModuleList()  # no projections: only the student trains
        # At T = 1 the student's log-softmax is the same for both terms: a cached KD term then takes the one
        # log-softmax the cross-entropy computes (normalized=True) instead of computing its own.
        self.shared = (cfg.distill.kd.temperature == 1.0 and source is not None and not self.online
                       and not cfg.distill.lm.cross_tokenizer)

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        if self.source is not None:
            self.source.start(id_batches)

    def _kd_term(self) -> Callable[..., Tensor]:
        """Per-token KD loss (before T^2) on student logits and the teacher targets of those positions."""
        lm, t = self.cfg.distill.lm, self.cfg.distill.kd.temperature
        if lm.cross_tokenizer:
            return partial(uld_loss, temperature=t)
        if self.online:
            return partial(LM_LOSS_FUNCTIONS[lm.loss], temperature=t, beta=lm.jsd_beta, alpha=lm.skew_alpha)
        fn = CODEC_LOSSES[self.codec]
        if self.codec == "sampled":  # forward KL only (LM_LOSSES says which codecs serve which loss)
            return partial(fn, proposal_temperature=self.settings["proposal_temperature"],
                           samples=self.settings["samples"], temperature=t, normalized=self.shared)
        tail = {"tail": lm.topk_tail} if self.codec == "topk" else {}
        return partial(fn, loss=lm.loss, temperature=t, beta=lm.jsd_beta, alpha=lm.skew_alpha,
                       normalized=self.shared, **tail)

    def _teacher_targets(self, batch: dict[str, Tensor], ids: Sequence[str], keep: Tensor
                         ) -> tuple[dict[str, Tensor], Tensor]:
        """Teacher targets at the scored student positions, and a 0/1 mask of the positions that have one."""
        signal = self.source.next(self.teacher_length)[0]  # the one teacher's rows for this batch
        every = torch.ones(int(keep.sum()), device=keep.device)
        if self.online:
            return {"teacher_logits": signal["logits"][:, :-1][keep].float()}, every
        if not self.cfg.distill.lm.cross_tokenizer:
            return {n: signal[n][:, :-1][keep] for n in LM_CODECS[self.codec].kd_fields}, every
        # Another tokenizer: the (student, teacher) position pairs of each row were found once, from the cached
        # character offsets (`_alignment`); positions without a partner get no KD term (mask 0) and a stand-in
        # target (k equal log-probabilities, no tail) that keeps their zero-weighted loss finite.
        s_len = batch["input_ids"].shape[1] - 1
        k = signal["topk_logprobs"].shape[-1]
        rows = [np.full(len(self.pairs[r][0]), b) for b, r in enumerate(ids)]
        b_idx = torch.from_numpy(np.concatenate(rows)).to(keep.device)
        s_idx = torch.from_numpy(np.concatenate([self.pairs[r][0] for r in ids])).to(keep.device)
        t_idx = torch.from_numpy(np.concatenate([self.pairs[r][1] for r in ids])).to(keep.device)
        logprobs = torch.full((len(ids), s_len, k), -math.log(k), device=keep.device)
        tail = torch.full((len(ids), s_len), _F16_MIN, device=keep.device)
        mask = torch.zeros(len(ids), s_len, device=keep.device)
        logprobs[b_idx, s_idx] = signal["topk_logprobs"][b_idx, t_idx].float()
        tail[b_idx, s_idx] = signal["tail_logprob"][b_idx, t_idx].float()
        mask[b_idx, s_idx] = 1.0
        return {"topk_logprobs": logprobs[keep], "tail_logprob": tail[keep]}, mask[keep]

    def losses(self, model: nn.Module, batch: dict[str, Tensor], ids: Sequence[str], step: int,
               total_steps: int) -> dict[str, Tensor]:
        kd = self.cfg.distill.kd
        mask = batch["attention_mask"].bool()
        keep = mask[:, 1:] & mask[:, :-1]  # position t is scored when it and its next token are real tokens
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                  ).last_hidden_state[:, :-1][keep]
        labels = batch["input_ids"][:, 1:][keep]
        n = max(int(keep.sum()), 1)
        use_kd = kd.weight > 0 and self.source is not None
        targets: dict[str, Tensor] = {"labels": labels}
        if use_kd:
            teacher, kd_mask = self._teacher_targets(batch, ids, keep)
            targets.update(teacher)
            # One rule for every signal: the KD term times T^2 with temperature_squared (Hinton et al.: its
            # gradients then keep their size as T changes), the mean over the positions that have a target.
            scale = kd.temperature ** 2 if kd.temperature_squared else 1.0
            targets["kd_weight"] = kd_mask * (kd.weight * scale / max(float(kd_mask.sum()), 1.0))
        kd_term = self._kd_term() if use_kd else None
        shared = self.shared
        # One pass computes both terms (the head's logits are the expensive part); the KD part is also kept
        # detached so the two are logged apart: `hard` carries the gradient of the sum.
        kd_parts: list[Tensor] = []

        def per_token(logits: Tensor, labels: Tensor, kd_weight: Tensor | None = None, **teacher: Tensor) -> Tensor:
            if shared:
                student = F.log_softmax(logits.float(), dim=-1)
                ce = F.nll_loss(student, labels.long(), ignore_index=-100, reduction="none")
            else:
                student, ce = logits, next_token_ce(logits, labels)
            loss = kd.hard_weight / n * ce
            if kd_term is not None:
                part = kd_weight * kd_term(student, **teacher)
                kd_parts.append(part.detach().sum())
                loss = loss + part
            return loss

        vocab = model.get_output_embeddings().weight.shape[0]
        chunk = self.cfg.distill.lm.chunk_tokens or auto_chunk_tokens(vocab)
        # The logits precompute and evaluate use (`head_logits`: the output layer, softcapping included).
        total = chunked_loss(hidden, partial(head_logits, model), per_token, targets, chunk_tokens=chunk)
        if not use_kd:
            return {"hard": total}
        kd_value = torch.stack(kd_parts).sum() if kd_parts else total.new_zeros(())
        return {"hard": total - kd_value, "kd": kd_value}

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def _alignment(rows: Encoded, reader: cf.CacheReader, max_length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each student row, the scored student positions and the teacher positions (in the cache) whose next
    tokens start at the same character of the block: what ULD compares."""
    out = {}
    for i, row in enumerate(rows.ids):
        s_off = torch.from_numpy(np.asarray(rows.extras["char_offsets"][rows.offsets[i]:rows.offsets[i + 1]]))
        cached = reader.get(row)
        t_len = int(cached["length"])
        s_pos, t_pos = align_by_offsets(s_off, torch.from_numpy(np.array(cached["char_offsets"][:t_len])))
        ok = (s_pos < min(len(s_off), max_length) - 1) & (t_pos < t_len - 1)  # both must predict a real token
        out[row] = (s_pos[ok].numpy().astype(np.int64), t_pos[ok].numpy().astype(np.int64))
    return out


def _build_student(cfg: Config) -> tuple[nn.Module, object]:
    """The student LM and its tokenizer, as `distill.student` describes."""
    s = cfg.distill.student
    if s.pretrained:
        src = resolve_model(s.pretrained)
        return load_causal_lm(src), load_tokenizer(src)
    src = resolve_model(s.from_teacher or s.config)
    model = causal_lm_student(src, num_layers=s.num_layers, hidden_size=s.hidden_size,
                              intermediate_size=s.intermediate_size, num_heads=s.num_heads,
                              num_kv_heads=s.num_kv_heads, keep_layers=s.keep_layers if s.from_teacher else None)
    return model, load_tokenizer(src)


def _teacher_name(names: Sequence[str]) -> str:
    if len(names) != 1:
        raise KDError(f"language-model distillation takes one teacher, got {len(names)} ({', '.join(names)}); "
                      "list one in precompute.teachers (or distill.teachers)")
    return names[0]


def _rows(cfg: Config, examples: Examples, student_tok, teacher_tok, max_length: int) -> Encoded:
    """The student's training rows: the teacher's blocks (their ids are the cache's keys), re-tokenised by the
    student when the tokenizers differ."""
    task = get_task(cfg.data)
    if teacher_tok is None:
        return task.encode(student_tok, examples, max_length)
    rows = task.encode(teacher_tok, examples, cfg.precompute.max_length)
    if cfg.distill.lm.cross_tokenizer:
        return task.encode_like(student_tok, rows, max_length)
    return rows


def distill_lm(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Train a student language model (see the module docstring) and save it with `save_pretrained`."""
    d = cfg.distill
    run, (train_ex, dev_ex, readers) = start_method(cfg, lambda: load_distill_data(cfg))
    output, device = run.output, run.device
    codec = _codec(readers[0]) if readers else None
    if d.lm.cross_tokenizer and codec != ULD_CODEC:
        raise KDError(f"distill.lm.cross_tokenizer needs a {ULD_CODEC} cache, but "
                      f"{readers[0].path if readers else 'none'} holds {codec or 'no cache'}; precompute with "
                      f"precompute.lm.codec: {ULD_CODEC}")
    if readers:
        _check_cache(cfg, readers[0], codec)
    student, student_tok = _build_student(cfg)
    teacher_tok = load_tokenizer(resolve_model(_teacher_name(run.teachers))) if d.teacher_signal != "none" else None
    if teacher_tok is not None and not d.lm.cross_tokenizer and not _same_vocabulary(student_tok, teacher_tok):
        raise KDError("the student's vocabulary differs from the teacher's, so their next-token distributions cannot "
                      "be compared id by id; give the student the teacher's tokenizer, or set "
                      "distill.lm.cross_tokenizer: true (Universal Logit Distillation over a topk cache)")
    train = _rows(cfg, train_ex, student_tok, teacher_tok, d.max_length)
    dev = get_task(cfg.data).encode(student_tok, dev_ex, d.max_length) if dev_ex is not None else None
    source: CachedTeachers | OnlineTeachers | None = None
    if d.teacher_signal == "cached":
        missing = [i for i in train.ids if i not in readers[0]]
        if missing:
            raise KDError(f"{len(missing)} training block(s) are not in cache {readers[0].path}, e.g. {missing[:2]}; "
                          "rerun `kd precompute` with the same data, teacher and precompute.max_length")
        source = CachedTeachers(readers, list(LM_CODECS[codec].kd_fields), device, prefetch=d.prefetch)
    elif d.teacher_signal == "online":
        # The teacher on the student's own rows (the same tokenizer), its full logits at every position.
        teacher = load_causal_lm(resolve_model(_teacher_name(run.teachers))).requires_grad_(False)
        source = OnlineTeachers([teacher], [train], TeacherSpec(full_logits=True), device, get_task(cfg.data))
    settings = dict(readers[0].manifest.settings.get("lm", {})) if readers else {}
    pairs = _alignment(train, readers[0], d.max_length) if d.lm.cross_tokenizer else None
    objective = LMObjective(cfg, source, codec, settings, pairs, cfg.precompute.max_length)
    result = fit(student, objective, train, dev, d, output=output, log_dir=Path(d.log_dir), device=device,
                 desc=f"distill LM ({d.teacher_signal})", on_step=on_step,
                 run_settings={**distill_settings(cfg, readers), "lm": d.lm.model_dump()},
                 evaluate=lambda m, data: lm_metrics(m, data, batch_size=d.eval_batch_size, device=device,
                                                     chunk_tokens=d.lm.chunk_tokens or auto_chunk_tokens(
                                                         student.config.vocab_size)))
    save_model(student, student_tok, objective.modules, output, result=result)
    write_metrics(cfg, result)
    return DistillResult(output, d.teacher_signal, [str(r.path) for r in readers], result)
