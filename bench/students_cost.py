"""End-to-end cost of K students x E epochs: one precompute + K x E cached epochs vs K x E online epochs.

Each student keeps 2 different layers of the teacher (so the K runs are K different students); the loss is
the project default (KL on logits at T=4). Wall-clock of whole `precompute`/`distill` calls (model loading,
tokenizing, checkpoints and saving included), and the sum of their training loops alone (`FitResult.seconds`).

    python bench/students_cost.py --quick      # MiniLM, K=3, E=2, 128 examples
    python bench/students_cost.py              # MiniLM and BERT-L12-H768, K=3, E=2, 2,000 examples
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import TEACHERS, Teacher, log, quiet, table, write_results, write_subset

from stages.distill import distill
from stages.precompute import precompute
from stages.config import config_from_dict

STUDENT_LAYERS = [[0, -1], [0, 2], [1, -2], [2, -1], [0, 1]]  # negative: counted from the teacher's last layer


def _config(t: Teacher, work: Path, csv: Path, signal: str, keep: list[int], epochs: int) -> dict:
    return {
        "data": {"train": str(csv), "dev": None, "test": None},
        "precompute": {"teachers": [str(t.path)], "cache_root": str(work / "caches")},
        "distill": {"teacher_signal": signal, "teachers": [str(t.path)] if signal == "online" else [],
                    "student": {"from_teacher": str(t.path), "keep_layers": [k % t.layers for k in keep]},
                    "epochs": epochs, "output": str(work / "student"), "log_dir": str(work / "dvclive"),
                    "metrics": str(work / "metrics.json")},
    }


def _timed(fn, cfg: dict) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(config_from_dict(cfg))
    return time.perf_counter() - t0, out


def _bench(key: str, root: Path, n: int, k: int, epochs: int) -> dict:
    t = TEACHERS[key](root)
    work = root / key
    csv = write_subset(work / "train.csv", n, seed=1)
    students = STUDENT_LAYERS[:k]
    log(f"{t.name}: precompute {n} examples")
    pre_wall, pre = _timed(precompute, _config(t, work, csv, "cached", students[0], epochs))
    cached, online = [], []
    for keep in students:
        for signal, out in (("cached", cached), ("online", online)):
            log(f"{t.name}: student {keep}, {signal}, {epochs} epoch(s)")
            wall, res = _timed(distill, _config(t, work, csv, signal, keep, epochs))
            out.append({"student_layers": keep, "wall_seconds": wall, "loop_seconds": res.fit.seconds})
    cached_wall = pre_wall + sum(r["wall_seconds"] for r in cached)
    online_wall = sum(r["wall_seconds"] for r in online)
    cached_loop = pre[0].seconds + sum(r["loop_seconds"] for r in cached)
    online_loop = sum(r["loop_seconds"] for r in online)
    return {"teacher": t.name, "examples": n, "students": k, "epochs": epochs, "precompute_wall_seconds": pre_wall,
            "precompute_loop_seconds": pre[0].seconds, "cached_runs": cached, "online_runs": online,
            "cached_total_wall": cached_wall, "online_total_wall": online_wall,
            "cached_total_loop": cached_loop, "online_total_loop": online_loop,
            "online_over_cached_wall": online_wall / cached_wall, "online_over_cached_loop": online_loop / cached_loop}


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MiniLM only, 128 examples")
    ap.add_argument("--teachers", help="comma list of: minilm, bert (default: minilm quick, both full)")
    ap.add_argument("--examples", type=int, help="training examples (default 128 quick, 2000 full)")
    ap.add_argument("--students", type=int, default=3, help=f"K, at most {len(STUDENT_LAYERS)} (default 3)")
    ap.add_argument("--epochs", type=int, default=2, help="E (default 2)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    teachers = (args.teachers or ("minilm" if args.quick else "minilm,bert")).split(",")
    n = args.examples or (128 if args.quick else 2000)
    root = args.work or Path(tempfile.mkdtemp(prefix="kd-bench-students-"))
    try:
        results = [_bench(key, root, n, args.students, args.epochs) for key in teachers]
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = []
    for r in results:
        label = f"{r['teacher']}, K={r['students']} x E={r['epochs']}, {r['examples']} ex"
        rows.append([label, "wall (whole calls)", r["precompute_wall_seconds"], r["cached_total_wall"],
                     r["online_total_wall"], r["online_over_cached_wall"]])
        rows.append([label, "training loops only", r["precompute_loop_seconds"], r["cached_total_loop"],
                     r["online_total_loop"], r["online_over_cached_loop"]])
    print("K students x E epochs: one precompute + K x E cached epochs vs K x E online epochs (seconds)\n")
    print(table(["setup", "timing", "precompute s", "precompute + cached s", "online s", "online / cached"], rows))
    path = write_results("students_cost", {"quick": args.quick, "results": results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
