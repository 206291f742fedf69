"""`kd distill`: train a student from cached teacher outputs (or a live teacher, or labels alone)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

import cache_format as cf
from cache_format import CacheMismatchError, CacheMissError, KDError
from cache_format import path_exists, parent_path
from stages.config import Config, ConfigError, DataConfig, DistillConfig, KDConfig, config_to_dict
from stages.train import dist
from stages.train import FitResult, NonFiniteLossError, fit, save_model, write_model
from stages.models import as_output, module_student
from stages.data import IGNORE_LABEL, Encoded, Examples, data_fingerprint, model_inputs
from stages.losses import (Match, MatchError, build_projections, check_matches, feature_map, match_loss,
                           needed_teacher_layers, preset_matches)
from stages.models import (ModelError, hidden_size, load_classifier, load_tokenizer,
                           num_layers, student_from_config, student_from_teacher, teacher_fingerprint)
from stages.losses import combine_teachers, cwsm_temperature, flsw_temperature, probability_shift, weight_at
from stages.methods.common import configured_teachers, start_method
from stages.tasks import LabelledTask, get_task, labelled
from stages.teacher import CachedTeachers, OnlineTeachers, cache_target, teacher_folder_gone, teacher_memos
from stages.tasks import TeacherSpec, load_split
from stages.models import resolve_model

__all__ = ["DistillResult", "DistillObjective", "build_student", "distill_kd", "distill_batches", "distill_objective",
           "distill_settings", "load_distill_data", "logit_terms", "write_metrics"]


@dataclass(frozen=True)
class DistillResult:
    output: Path
    teacher_signal: str
    caches: list[str]
    fit: FitResult


def build_student(cfg: Config) -> tuple[nn.Module, object]:
    """The student model and its tokenizer, as `distill.student` describes (with the task's head)."""
    task = labelled(get_task(cfg.data))
    s, n, head, names = cfg.distill.student, task.num_labels, task.auto_model, task.label_names
    if s.from_teacher:
        src = resolve_model(s.from_teacher)
        teacher = load_classifier(src, n, auto_model=head, label_names=names)
        return student_from_teacher(teacher, s.keep_layers), load_tokenizer(src)
    if s.pretrained:
        src = resolve_model(s.pretrained)
        # A base model gets a new head (that is what distillation trains); a head for another label count is
        # an error, as for teachers: silently re-initialising it would throw away what it learned.
        return load_classifier(src, n, head="if_missing", auto_model=head, label_names=names), load_tokenizer(src)
    if s.module:  # any nn.Module on the first teacher's token ids (stages/models/module_student.py)
        tokenizer = load_tokenizer(resolve_model(configured_teachers(cfg)[0]))
        return module_student(s.module, s.module_kwargs, num_labels=n, vocab_size=len(tokenizer),
                              pad_token_id=tokenizer.pad_token_id), tokenizer
    if s.num_kv_heads is not None:
        raise ConfigError("distill.student.num_kv_heads only applies to causal-LM students (data.task: causal_lm); "
                          "remove it")
    src = resolve_model(s.config)
    model = student_from_config(src, n, num_layers=s.num_layers, hidden_size=s.hidden_size,
                                intermediate_size=s.intermediate_size, num_heads=s.num_heads, auto_model=head)
    return model, load_tokenizer(src)


def _matches(d: DistillConfig, teacher_layers: int, student_layers: int) -> list[Match]:
    """The configured matches plus the preset's, adapted to the real layer counts."""
    out = [Match(m.kind, tuple(m.teacher_layer) if isinstance(m.teacher_layer, list) else m.teacher_layer,
                 tuple(m.student_layer) if isinstance(m.student_layer, list) else m.student_layer,
                 m.weight, m.projection, m.projection_lr) for m in d.matches]
    if d.match_preset:
        out += preset_matches(d.match_preset, teacher_layers, student_layers)
    return out


def logit_terms(kd: KDConfig, task: LabelledTask, logits: torch.Tensor, teachers: Sequence[torch.Tensor],
                batch: dict[str, torch.Tensor], step: int, total_steps: int, *,
                teacher_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted `kd` term (student vs the teachers' logits, combined) and `hard` term (gold labels).

    `teachers` are float logits of the batch's rows, one tensor per teacher ([] for labels only). The hard
    term is there whenever `kd.hard_weight` > 0, and always without teachers.
    """
    terms: dict[str, torch.Tensor] = {}
    if teachers and kd.weight > 0:
        t = teachers[0] if len(teachers) == 1 else combine_teachers(
            list(teachers), kd.teacher_weights, kd.teacher_combine, temperature=kd.temperature)
        if kd.probability_shift and "labels" in batch:
            t = probability_shift(t, batch["labels"])
        if kd.temperature_schedule == "flsw":
            temp = flsw_temperature(logits, t, kd.temperature, kd.flsw_beta, kd.flsw_gamma)
        elif kd.temperature_schedule == "cwsm":
            temp = cwsm_temperature(logits, t, kd.temperature, kd.cwsm_beta)
        else:
            temp = kd.temperature
        w = weight_at(kd.weight_schedule, kd.weight, step, total_steps)
        terms["kd"] = w * task.kd_loss(logits, t, batch, temperature=temp, kind=kd.loss,
                                       temperature_squared=kd.temperature_squared, teacher_lengths=teacher_lengths)
    if kd.hard_weight > 0 or not teachers:
        w = weight_at(kd.hard_weight_schedule, kd.hard_weight, step, total_steps)
        terms["hard"] = w * task.hard_loss(logits, batch)
    return terms


class DistillObjective:
    """KD on logits + hard labels + intermediate matches, with their schedules."""

    def __init__(self, cfg: DistillConfig, task: LabelledTask, source, matches: Sequence[Match], projections: nn.ModuleList,
                 student_lengths: dict[str, int]):
        self.cfg = cfg
        self.task = task
        self.source = source
        self.matches = list(matches)
        self.modules = projections
        self.need_hidden = any(m.feature == "hidden" for m in self.matches)
        self.need_attn = any(m.feature == "attention" for m in self.matches)
        self.token_level = any(m.token_level for m in self.matches)
        self.student_lengths = student_lengths

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        if self.source is not None:
            self.source.start(id_batches)

    def losses(self, model: nn.Module, batch: dict[str, torch.Tensor], ids: Sequence[str], step: int,
               total_steps: int) -> dict[str, torch.Tensor]:
        kd, d, task = self.cfg.kd, self.cfg, self.task
        seq_len = batch["input_ids"].shape[1]
        teachers = self.source.next(seq_len) if self.source is not None else []
        out = model(**model_inputs(batch), output_hidden_states=self.need_hidden, output_attentions=self.need_attn)
        logits = task.logits(out, batch).float()
        # A ragged teacher axis comes padded to the batch's token count; the student's may be shorter (words).
        t_logits = [t["logits"].float()[:, : logits.shape[1]] if logits.dim() == 3 else t["logits"].float()
                    for t in teachers]
        lengths = torch.stack([t["length"] for t in teachers]).amin(0) if teachers and logits.dim() == 3 else None
        terms = logit_terms(kd, task, logits, t_logits, batch, step, total_steps, teacher_lengths=lengths)
        if self.matches:
            t0 = teachers[0]
            if self.token_level:
                want = torch.tensor([self.student_lengths[i] for i in ids], dtype=t0["length"].dtype)
                if not torch.equal(t0["length"].cpu(), want):
                    raise KDError(
                        "token-level matches need the teacher and student to tokenise alike, but their token "
                        f"counts differ (e.g. example {ids[int((t0['length'].cpu() != want).nonzero()[0])]}); "
                        "use the teacher's tokenizer for the student, the same max_length, or only logits/pkd"
                    )
            student = feature_map(out.hidden_states or (), out.attentions or ())
            teacher = {k: v.float() for k, v in t0.items() if k.startswith(("hidden.", "attention."))}
            mw = weight_at(d.match_weight_schedule, 1.0, step, total_steps)
            for m, proj in zip(self.matches, self.modules):
                # mw: the schedule shared by all matches; m.weight: this match's own weight.
                terms[m.label] = mw * m.weight * match_loss(m, student, teacher, mask=batch["attention_mask"], projection=proj)
        return terms

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def _check_cache_teachers(cfg: Config, readers: Sequence[cf.CacheReader]) -> None:
    """Each explicit cache must hold the outputs of the configured teacher in the same position."""
    if not cfg.distill.check_cache_teacher:
        print("warning: distill.check_cache_teacher is false: the caches in distill.caches are not checked "
              "against the configured teachers", file=sys.stderr)
        return
    teachers = configured_teachers(cfg)
    which = "distill.teachers" if cfg.distill.teachers else "precompute.teachers"
    if len(teachers) != len(readers):
        raise CacheMismatchError(
            f"distill.caches lists {len(readers)} cache(s) but {which} lists {len(teachers)} teacher(s); list the "
            f"teacher of each cache in {which}, in the same order (or set distill.check_cache_teacher: false)"
        )
    for r, teacher in zip(readers, teachers):
        # A gone folder (also one named without a slash, which is not then looked up on the hub): nothing left to
        # compare with; the cache itself is still checked.
        if teacher_folder_gone(teacher, r.path, r.manifest.teacher_fingerprint):
            print(f"warning: cache {r.path} is not checked against {which} entry {teacher}: the teacher folder "
                  "is gone", file=sys.stderr)
            continue
        # Memoised by path and file stats next to the cache: no weight file is read unless one changed.
        expected = teacher_fingerprint(resolve_model(teacher), teacher_memos(parent_path(r.path)))
        if r.manifest.teacher_fingerprint != expected:
            raise CacheMismatchError(
                f"cache {r.path} was made by another teacher (fingerprint {r.manifest.teacher_fingerprint}) than "
                f"{which} entry {teacher} (fingerprint {expected}); point distill.caches at that teacher's cache, "
                f"fix {which}, or set distill.check_cache_teacher: false to use the cache anyway"
            )


def _open_caches(cfg: Config, train_examples) -> list[cf.CacheReader]:
    """Readers for the teacher caches, checked against the teachers, the task and the training data.

    Nothing here builds a teacher model or reads its weights: a cache is identified by the teacher's fingerprint,
    memoised by path and file stats (`teacher_fingerprint`). That every
    training row is in each cache is checked once the rows are known (`_check_rows`).
    """
    d = cfg.distill
    dfp = data_fingerprint(train_examples)
    readers = []
    if d.caches:
        readers = [cf.CacheReader(path, expect_data=dfp) for path in d.caches]
        _check_cache_teachers(cfg, readers)
    else:
        # The caches precompute writes for precompute.teachers: same teacher + data + settings -> same folder.
        for teacher in cfg.precompute.teachers:
            target = cache_target(cfg, teacher, train_examples)
            if not path_exists(target.path):
                raise KDError(f"no cache for teacher {teacher} at {target.path}; run `kd precompute` first "
                              "(or set distill.caches to an existing cache folder)")
            readers.append(cf.CacheReader(target.path, expect_teacher=target.teacher_fingerprint,
                                          expect_data=dfp, expect_settings=target.settings))
    task = get_task(cfg.data)
    for r in readers:
        logits = r.fields.get("logits")  # class logits: a labelled kind's cache (a causal_lm cache has none)
        if logits is None or tuple(logits.shape) == (want := labelled(task).logits_shape()):
            continue
        if logits.shape[-1] != want[-1]:
            raise CacheMismatchError(
                f"cache {r.path} holds {logits.shape[-1]}-label teacher logits but data.num_labels is {want[-1]}; "
                f"set data.num_labels: {logits.shape[-1]} if that is the data's label count, else use a cache "
                f"of a teacher fine-tuned for {want[-1]} labels"
            )
        raise CacheMismatchError(
            f"cache {r.path} holds teacher logits of shape {tuple(logits.shape)} but data.task {cfg.data.task} "
            f"needs {want}; use a cache precomputed for this task (`kd precompute` with the same data.task)"
        )
    return readers


def _check_rows(readers: Sequence[cf.CacheReader], ids: Sequence[str]) -> None:
    """Every training row (example, or window of one) must be in every cache."""
    for r in readers:
        missing = [i for i in ids if i not in r]
        if missing:
            raise CacheMissError(
                f"{len(missing)} training example(s) are not in cache {r.path}, e.g. {missing[:3]}; "
                "rerun `kd precompute` on the same data.train file (for a task cut into windows, the student "
                "must also use the teacher's tokenizer, max_length and data.doc_stride)"
            )


def distill_settings(cfg: Config, readers: Sequence[cf.CacheReader]) -> dict:
    """What, besides the optimisation settings, defines a distillation run (a resume must not change it)."""
    d = cfg.distill
    return {
        "teacher_signal": d.teacher_signal,
        "caches": [str(r.path) for r in readers],
        "teachers": configured_teachers(cfg) if d.teacher_signal == "online" else [],
        "student": config_to_dict(d.student),
        "kd": config_to_dict(d.kd),
        "matches": [config_to_dict(m) for m in d.matches],
        "match_preset": d.match_preset,
        "match_weight_schedule": d.match_weight_schedule,
        **get_task(cfg.data).cache_settings(),
    }


def distill_kd(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> DistillResult:
    """Logit and feature KD of a task kind's student: cached, online or labels-only teacher signal."""
    d = cfg.distill
    run, (train_ex, dev_ex, readers) = start_method(cfg, lambda: load_distill_data(cfg))
    output, device, task = run.output, run.device, labelled(get_task(cfg.data))
    student, tokenizer = build_student(cfg)
    train = task.encode(tokenizer, train_ex, d.max_length)
    dev = task.encode(tokenizer, dev_ex, d.max_length) if dev_ex is not None else None
    objective = distill_objective(cfg, student, train_ex, train, readers, device)
    saved = {"label_names": task.label_names, "head_config": task.head_config()}
    result = fit(student, objective, train, dev, d, output=output, log_dir=Path(d.log_dir), device=device,
                 desc=f"distill ({d.teacher_signal})", on_step=on_step, run_settings=distill_settings(cfg, readers),
                 evaluate=lambda m, data: task.evaluate(m, data, d.eval_batch_size, device),
                 write=lambda folder: write_model(student, tokenizer, objective.modules, folder, **saved))
    save_model(student, tokenizer, objective.modules, output, result=result, **saved)
    write_metrics(cfg, result)
    return DistillResult(output, d.teacher_signal, [str(r.path) for r in readers], result)


def load_distill_data(cfg: Config) -> tuple[Examples, Examples | None, list[cf.CacheReader]]:
    """The train and dev examples and the checked teacher caches (none unless teacher_signal is cached).

    The unlabelled transfer set carries only teacher signal: a labels-only run leaves it out.
    """
    d = cfg.distill
    train_ex = load_split(cfg, "train", transfer=d.teacher_signal != "none")
    dev_ex = load_split(cfg, "dev") if cfg.data.dev else None
    readers = _open_caches(cfg, train_ex) if d.teacher_signal == "cached" else []
    return train_ex, dev_ex, readers


def distill_objective(cfg: Config, student: nn.Module, train_ex: Examples, train: Encoded,
                      readers: Sequence[cf.CacheReader], device: torch.device) -> "DistillObjective":
    """The teacher signal (cache, live teachers or none), matches and projections of one task's student."""
    d, task = cfg.distill, labelled(get_task(cfg.data))
    _check_rows(readers, train.ids)
    s_layers = num_layers(student)
    source, matches = None, []
    t_width: int | None = None
    if d.teacher_signal == "cached":
        t_layers = readers[0].manifest.settings.get("num_layers", 0)
        matches = _matches(d, t_layers, s_layers)
        check_matches(matches, t_layers, s_layers)
        hidden, attn = needed_teacher_layers(matches)
        fields = ["logits"] + [f"hidden.{i}" for i in sorted(hidden)] + [f"attention.{i}" for i in sorted(attn)]
        for key in fields[1:]:
            if key not in readers[0].fields:
                raise MatchError(f"teacher output {key} is not in cache {readers[0].path} (it holds "
                                 f"{', '.join(sorted(readers[0].fields))}); add the layer to precompute and rerun "
                                 "it, or use distill.teacher_signal: online")
        t_width = next((readers[0].fields[f].shape[-1] for f in fields if f.startswith("hidden.")), None)
        source = CachedTeachers(readers, [f for f in fields if f in readers[0].fields], device, prefetch=d.prefetch)
    elif d.teacher_signal == "online":
        names = configured_teachers(cfg)
        first = load_classifier(resolve_model(names[0]), task.num_labels, auto_model=task.auto_model,
                                label_names=task.label_names)
        matches = _matches(d, num_layers(first), s_layers)
        check_matches(matches, num_layers(first), s_layers)
        hidden, attn = needed_teacher_layers(matches)
        models, encs = [], []
        for t in names:
            src = resolve_model(t)
            models.append(load_classifier(src, task.num_labels, eager_attention=bool(attn), auto_model=task.auto_model,
                                          label_names=task.label_names))
            encs.append(task.encode(load_tokenizer(src), train_ex, d.max_length))
            missing = sorted(set(train.ids) - set(encs[-1].ids))
            if missing:  # windows cut by another tokenizer or length: the teacher has no such rows
                raise KDError(f"teacher {t} cuts the training examples into other windows than the student "
                              f"(e.g. no row {missing[0]}); windowed tasks need the student to use the teacher's "
                              "tokenizer, max_length and data.doc_stride")
        first_only = bool(matches) and all(m.kind == "pkd" for m in matches)
        spec = TeacherSpec(True, tuple(sorted(hidden)), "first" if first_only else "all", tuple(sorted(attn)))
        t_width = hidden_size(models[0])
        source = OnlineTeachers(models, encs, spec, device, task)

    if any(m.feature == "attention" for m in matches):
        student.set_attn_implementation("eager")  # only eager attention returns attention maps
    s_width = hidden_size(student)
    for m in matches:
        if (m.feature == "hidden" and not m.projection and not m.spec.any_width and t_width is not None
                and t_width != s_width):
            raise MatchError(f"match {m.label} compares student width {s_width} with teacher width {t_width}; "
                             "set projection: linear (or relu/tanh) on that match")
    projections = build_projections(matches, s_width, t_width or s_width)

    return DistillObjective(d, task, source, matches, projections, dict(zip(train.ids, train.lengths.tolist())))


def write_metrics(cfg: Config, result: FitResult) -> None:
    """distill.metrics: the dev metrics, steps, time and speed of a finished run (rank 0 writes it)."""
    if not dist.is_main():
        return
    d = cfg.distill
    metrics = {"method": d.method, "teacher_signal": d.teacher_signal,
               **{f"dev_{k}": v for k, v in (result.dev or {}).items()},
               **({"best_step": result.best_step} if result.best_step is not None else {}),
               "steps": result.steps, "seconds": round(result.seconds, 2),
               "train_examples_per_second": round(result.examples_per_second, 1)}
    cf.atomic_write_text(Path(d.metrics), json.dumps(metrics, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The Python API for any model on your own batches (images, audio, ...), from a cache


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def distill_batches(model: nn.Module, batches: Iterable[tuple[Sequence[str], Any, torch.Tensor | None]],
                    caches: cf.CacheReader | Sequence[cf.CacheReader], kd: KDConfig | None = None, *,
                    epochs: int = 1, optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
                    device: str | torch.device = "cpu", task: LabelledTask | None = None) -> list[dict[str, float]]:
    """Train `model` on your own batches against cached teacher logits; returns each epoch's mean loss terms.

    Each batch is `(ids, inputs, labels)`: the cache ids of its rows, what the model takes (a tensor:
    `model(inputs)`; a dict: `model(**inputs)`; a tuple: `model(*inputs)`) and the gold class ids ([B] int64;
    -100 marks an unlabelled row; None: none labelled). `batches` is iterated once per epoch (a DataLoader is).
    The model returns logits as under the student contract (README "Students that are not transformers").
    The loss is the distill stage's (`logit_terms`): `kd.loss` at `kd.temperature` with its schedules, several
    caches combined by `kd.teacher_combine`, plus `kd.hard_weight` x cross-entropy on the labels. `task`
    defaults to single-label classification over the cache's logits; `optimizer` to AdamW at `lr`. Nothing is
    saved or checkpointed: a `ModuleStudent` saves with `save_pretrained`, anything else as you save it.
    """
    kd = kd or KDConfig()
    readers = [caches] if isinstance(caches, cf.CacheReader) else list(caches)
    if not readers:
        raise ConfigError("distill_batches: no cache given; pass a CacheReader (or a list of them)")
    spec = readers[0].fields.get("logits")
    if spec is None:
        raise ConfigError(f"distill_batches: cache {readers[0].path} holds no logits "
                          f"({', '.join(readers[0].fields)}); precompute it with logits")
    task = labelled(task or get_task(DataConfig(num_labels=int(spec.shape[-1]))))
    if hasattr(batches, "__len__"):
        total = max(1, epochs * len(batches))
    elif any(s != "constant" for s in (kd.weight_schedule, kd.hard_weight_schedule)):
        raise ConfigError("distill_batches: weight schedules need the number of steps, but `batches` has no len(); "
                          "pass a sized iterable (a list, a DataLoader) or use constant schedules")
    else:
        total = 1
    device = torch.device(device)
    model.to(device).train()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    history, step = [], 0
    for _ in range(epochs):
        sums: dict[str, float] = {}
        n = 0
        for ids, inputs, labels in batches:
            ids = [str(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
            teachers = [r.gather_torch(ids, ["logits"])["logits"].to(device).float() for r in readers]
            gold = torch.full((len(ids),), IGNORE_LABEL) if labels is None else torch.as_tensor(labels)
            batch = {"labels": gold.to(device)}
            logits = task.logits(as_output(_call(model, _to(inputs, device))), batch).float()
            if logits.shape != teachers[0].shape:
                raise ModelError(f"the model returns logits of shape {tuple(logits.shape)} but cache "
                                 f"{readers[0].path} holds {tuple(teachers[0].shape)} for the same rows; make "
                                 "its head as wide as the teacher's")
            terms = logit_terms(kd, task, logits, teachers, batch, step, total)
            loss = sum(terms.values())
            values = {k: float(v.detach()) for k, v in terms.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise NonFiniteLossError(f"distill_batches: non-finite loss at step {step} ({values}); check the "
                                         "cache with `kd cache verify` or lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
        history.append({k: v / max(n, 1) for k, v in sums.items()})
    return history
