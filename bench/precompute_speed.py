"""Precompute throughput against a bare loop that only runs the teacher's forward pass on the same batches.

The bare loop does what precompute must do anyway and nothing else: tokenize once, sort longest first,
collate batches of `precompute.batch_size`, `teacher_outputs` (forward + the cache dtype conversion) under
inference mode, copy to host. Precompute adds the cache: fingerprints, the background writer, shards,
manifest. Target (issue 5): precompute throughput >= 95% of the bare loop's.

Two timings each: the loop alone (precompute's own `seconds`: from opening the writer to closing it, which
includes tokenizing; the bare loop timed over the same work) and the whole call (model and data loading,
fingerprints, everything). Runs alternate bare / precompute, repeated; medians are reported.

    python bench/precompute_speed.py --quick      # MiniLM, 384 examples, 1 repeat
    python bench/precompute_speed.py              # MiniLM and BERT-L12-H768, 2,000 examples, 3 repeats
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    TEACHERS,
    Teacher,
    log,
    median,
    quiet,
    table,
    write_results,
    write_subset,
)

from stages.precompute import precompute
from stages.config import config_from_dict
from stages.data import collate, encode
from stages.models import load_classifier, load_tokenizer
from stages.tasks import get_task
from stages.tasks import TeacherSpec, load_split
from stages.teacher import teacher_outputs


def _config(t: Teacher, csv: Path, cache_root: Path, hidden: bool) -> dict:
    return {"data": {"train": str(csv), "dev": None, "test": None},
            "precompute": {"teachers": [str(t.path)], "cache_root": str(cache_root), "device": "cpu",
                           "hidden_layers": [t.layers // 2, t.layers] if hidden else []}}


def _bare(cfg_dict: dict) -> tuple[float, float, int]:
    """(loop seconds, whole seconds, examples) of the teacher alone, batched exactly as precompute does."""
    t_all = time.perf_counter()
    cfg = config_from_dict(cfg_dict)
    p = cfg.precompute
    spec = TeacherSpec.from_config(p)
    src = p.teachers[0]
    tokenizer = load_tokenizer(src)
    model = load_classifier(src, cfg.data.num_labels).eval()
    examples = load_split(cfg, p.split)
    task = get_task(cfg.data)
    t0 = time.perf_counter()
    enc = encode(tokenizer, examples, p.max_length)
    order = np.argsort(-enc.lengths, kind="stable")
    with torch.inference_mode():
        for start in range(0, len(order), p.batch_size):
            batch, ids = collate(enc, order[start : start + p.batch_size])
            outs = teacher_outputs(model, batch, spec, task, ids)
            lengths = outs.pop("length").to(torch.int32)
            _ = lengths.numpy(), {k: v.cpu() for k, v in outs.items()}
    end = time.perf_counter()
    return end - t0, end - t_all, len(examples)


def _precompute(cfg_dict: dict) -> tuple[float, float, int]:
    t_all = time.perf_counter()
    res = precompute(config_from_dict(cfg_dict))[0]
    if res.status != "written":
        raise RuntimeError(f"precompute did not write a fresh cache ({res.status}); the benchmark needs a new folder")
    return res.seconds, time.perf_counter() - t_all, res.examples


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MiniLM only, 384 examples, 1 repeat")
    ap.add_argument("--teachers", help="comma list of: minilm, bert (default: minilm quick, both full)")
    ap.add_argument("--examples", type=int, help="examples per run (default 384 quick, 2000 full)")
    ap.add_argument("--repeats", type=int, help="alternating bare/precompute repeats (1 quick, 3 full)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    teachers = (args.teachers or ("minilm" if args.quick else "minilm,bert")).split(",")
    n = args.examples or (384 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    root = args.work or Path(tempfile.mkdtemp(prefix="kd-bench-precompute-"))
    results, rows = [], []
    try:
        csv = write_subset(root / "train.csv", n, seed=0)
        for key in teachers:
            t = TEACHERS[key](root)
            for variant, hidden in (("logits", False), ("logits + 2 hidden layers, all tokens", True)):
                runs: dict[str, list[tuple[float, float, int]]] = {"bare": [], "precompute": []}
                for r in range(repeats):
                    log(f"{t.name} {variant}: bare loop, repeat {r + 1}/{repeats}")
                    runs["bare"].append(_bare(_config(t, csv, root / "unused", hidden)))
                    log(f"{t.name} {variant}: precompute, repeat {r + 1}/{repeats}")
                    cache_root = root / f"caches-{key}-{hidden}-{r}"
                    runs["precompute"].append(_precompute(_config(t, csv, cache_root, hidden)))
                    shutil.rmtree(cache_root, ignore_errors=True)
                loop = {k: median([x[0] for x in v]) for k, v in runs.items()}
                whole = {k: median([x[1] for x in v]) for k, v in runs.items()}
                res = {"teacher": t.name, "variant": variant, "examples": n, "repeats": repeats,
                       "loop_seconds": loop, "whole_seconds": whole, "all_runs": runs,
                       "loop_throughput_ratio": loop["bare"] / loop["precompute"],
                       "whole_throughput_ratio": whole["bare"] / whole["precompute"]}
                results.append(res)
                rows.append([t.name, variant, n / loop["bare"], n / loop["precompute"], res["loop_throughput_ratio"],
                             n / whole["bare"], n / whole["precompute"], res["whole_throughput_ratio"]])
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"Precompute vs a bare teacher loop (batch 64, max_length 64, float16 cache, CPU; median of {repeats})\n")
    print(table(["teacher", "outputs", "bare ex/s", "precompute ex/s", "ratio (target >= 0.95)",
                 "bare ex/s (whole call)", "precompute ex/s (whole call)", "ratio (whole)"], rows))
    path = write_results("precompute_speed", {"quick": args.quick, "results": results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
