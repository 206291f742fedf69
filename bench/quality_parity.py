"""Quality parity: the student of `kd distill` (cached) vs the student of TextBrewer's GeneralDistiller.

Same data (the project's default prepare split of Rotten Tomatoes), same fine-tuned teacher, same student
(2 layers kept from the teacher, TextBrewer's T3 initialisation), same loss (CE on logits at T=4, no T^2,
no hard labels), same AdamW (BERT decay groups), linear warmup/decay schedule, gradient clipping, batches
(seeded length-grouped order) and seed. Target (issue 5): test accuracies within 0.5 points.

Needs a fine-tuned teacher: `kd prepare && kd train-teacher` from the repository root writes models/teacher.

    python bench/quality_parity.py --quick [--teacher models/teacher]   # 1,280 train examples, full test split, 1 epoch
    python bench/quality_parity.py [--teacher models/teacher]           # full split, distill defaults (3 epochs)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
from _common import (
    Batches,
    TBSettings,
    log,
    quiet,
    table,
    textbrewer_distill,
    write_results,
)

from stages.distill import distill
from stages.precompute import precompute
from stages.prepare import prepare
from stages.train import set_seed
from stages.tasks import SequenceClassification
from stages.config import DataConfig, config_from_dict
from stages.data import encode, read_table
from stages.models import (
    load_classifier,
    load_tokenizer,
    num_layers,
    student_from_teacher,
)
from stages.tasks import load_split

TEMPERATURE = 4.0


def _accuracy(model, data, batch_size, device) -> tuple[float, float]:
    m = SequenceClassification(DataConfig()).evaluate(model, data, batch_size, device)
    return m["accuracy"], m["macro_f1"]


def _sample(src: Path, dst: Path, n: int | None) -> Path:
    """A seeded random subset of `n` rows of a split CSV, in file order (all rows when n is None).

    Random, not the first rows: the prepared splits keep the source order, which is sorted by label.
    """
    if n is None:
        return src
    t = read_table(src, string_columns=["id", "text"])
    rows = np.sort(np.random.default_rng(0).permutation(t.num_rows)[:n])
    pa_csv.write_csv(t.take(rows), dst)
    return dst


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("models/teacher"), help="fine-tuned teacher folder")
    ap.add_argument("--quick", action="store_true", help="1,280 train examples, full test split, 1 epoch")
    ap.add_argument("--train-examples", type=int, help="train subset (default: 1280 quick, all full)")
    ap.add_argument("--test-examples", type=int, help="test subset (default: all)")
    ap.add_argument("--epochs", type=int, help="epochs (default: 1 quick, distill.epochs default full)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    if not (args.teacher / "config.json").exists():
        raise SystemExit(f"no fine-tuned teacher at {args.teacher}: run `kd prepare && kd train-teacher` from the "
                         "repository root (it writes models/teacher), or pass --teacher PATH")
    defaults = config_from_dict({}).distill
    epochs = args.epochs or (1 if args.quick else int(defaults.epochs))
    n_train = args.train_examples or (1280 if args.quick else None)
    n_test = args.test_examples
    root = args.work or Path(tempfile.mkdtemp(prefix="kd-bench-parity-"))
    try:
        split = prepare(config_from_dict({"prepare": {"out_dir": str(root / "data")}}))
        train_csv = _sample(split["train"], root / "train_subset.csv", n_train)
        test_csv = _sample(split["test"], root / "test_subset.csv", n_test)
        teacher = load_classifier(str(args.teacher), 2)
        keep = [0, num_layers(teacher) - 1]
        cfg = config_from_dict({
            "data": {"train": str(train_csv), "dev": None, "test": str(test_csv)},
            "precompute": {"teachers": [str(args.teacher)], "cache_root": str(root / "caches")},
            "distill": {"teacher_signal": "cached", "student": {"from_teacher": str(args.teacher), "keep_layers": keep},
                        "kd": {"loss": "ce", "temperature": TEMPERATURE, "temperature_squared": False,
                               "weight": 1.0, "hard_weight": 0.0},
                        "epochs": epochs, "output": str(root / "student-kd"), "log_dir": str(root / "dvclive"),
                        "metrics": str(root / "metrics.json")},
        })
        d = cfg.distill
        tokenizer = load_tokenizer(str(args.teacher))
        test = encode(tokenizer, load_split(cfg, "test"), d.max_length)

        log(f"precompute {args.teacher} over {train_csv}")
        precompute(cfg)
        log(f"kd distill (cached), {epochs} epoch(s)")
        distill(cfg)
        ours = load_classifier(str(root / "student-kd"), 2)
        acc_ours, f1_ours = _accuracy(ours, test, d.eval_batch_size, ours.device)

        log(f"TextBrewer GeneralDistiller, {epochs} epoch(s)")
        student = student_from_teacher(teacher, keep)
        train = encode(tokenizer, load_split(cfg, "train"), d.max_length)
        set_seed(d.seed)  # as `fit` does right before training: same dropout masks
        s = TBSettings(epochs=epochs, lr=d.lr, weight_decay=d.weight_decay, warmup_ratio=d.warmup_ratio,
                       max_grad_norm=d.max_grad_norm or -1.0, temperature=TEMPERATURE, kd_weight=1.0, hard_weight=0.0)
        textbrewer_distill(teacher, student, Batches(train, d.batch_size, d.seed, labels=False,
                                                     group_by_length=d.group_by_length), s, root / "textbrewer")
        acc_tb, f1_tb = _accuracy(student, test, d.eval_batch_size, next(student.parameters()).device)
        acc_teacher, f1_teacher = _accuracy(teacher, test, d.eval_batch_size,
                                                       next(teacher.parameters()).device)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    gap = 100 * (acc_ours - acc_tb)
    rows = [["teacher", 100 * acc_teacher, 100 * f1_teacher, ""],
            ["student, kd distill (cached)", 100 * acc_ours, 100 * f1_ours, gap],
            ["student, TextBrewer GeneralDistiller", 100 * acc_tb, 100 * f1_tb, 0.0]]
    print(f"Quality parity on Rotten Tomatoes test ({len(test)} examples; {len(train)} train, {epochs} epoch(s), "
          f"student layers {keep} of {args.teacher})\n")
    print(table(["model", "test accuracy %", "macro-F1 %", "accuracy - TextBrewer (points)"], rows))
    print(f"\n|gap| = {abs(gap):.2f} points (target <= 0.5)")
    path = write_results("quality_parity", {
        "quick": args.quick, "teacher": str(args.teacher), "train_examples": len(train), "test_examples": len(test),
        "epochs": epochs, "student_layers": keep, "temperature": TEMPERATURE,
        "accuracy": {"teacher": acc_teacher, "kd_distill": acc_ours, "textbrewer": acc_tb},
        "macro_f1": {"teacher": f1_teacher, "kd_distill": f1_ours, "textbrewer": f1_tb}, "gap_points": gap})
    print(f"written: {path}")


if __name__ == "__main__":
    main()
