"""Peak memory of `distill` reading a cache of N and of 10N examples: it streams, so it must stay flat.

The cache is made large on purpose: every example is 128 tokens (several Rotten Tomatoes sentences
joined, copies suffixed so ids stay unique) and the cache holds, besides logits, the teacher's hidden
states (all tokens) and an attention map of every head (12 x 128 x 128 per example). The teacher is a small
random 1-layer BERT (hidden 96, 12 heads, MiniLM tokenizer) so that precompute stays cheap; the student is
the same architecture, randomly initialised, trained with KD + hidden_mse + attention_mse. Both runs take
the same number of steps on batches of the same shape (10 epochs over N, 1 epoch over 10N), so the only
difference is the size of the cache they stream from.

Each distill runs in a fresh subprocess that samples /proc/self/status every 10 ms, once with glibc's
default allocator settings and once with a fixed mmap threshold (which keeps heap fragmentation out of the
numbers). Reported: peak RssAnon (private memory: what loading the cache into RAM would grow), also up to
the first optimizer step; peak RssFile and ru_maxrss (these also count the cache's memory-mapped file
pages while they are resident: page cache the kernel can drop at any time, not allocations); and their
growth from N to 10N.

    python bench/memory.py --quick     # N = 192 (cache ~80 MB) and 1,920 (~780 MB)
    python bench/memory.py             # N = 640 and 6,400 (~2.6 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import BUNDLED_TEACHER, log, quiet, table, write_results, write_subset

MAX_LENGTH = 128
HEADS = 12
HIDDEN = 96
# glibc raises its mmap threshold after freeing a large block, so later batch-sized tensors come from the heap
# and fragment it; a fixed threshold returns every large block to the OS (it separates fragmentation from growth).
ALLOCATORS = {"glibc default": {}, "glibc, mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


def _child(cfg_path: Path) -> None:
    """Run distill on the config in `cfg_path`, print peak memory as JSON on the last stdout line."""
    from _common import StepClock

    from stages.distill import distill
    from stages.config import config_from_dict

    cfg = config_from_dict(json.loads(cfg_path.read_text()))
    peak = _status_kb()
    base = dict(peak)
    before_fit: dict[str, int] = {}
    clock = StepClock()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, v in _status_kb().items():
                peak[k] = max(peak[k], v)
            if not clock.times and not before_fit.get("done"):
                before_fit.update(peak)  # until the first optimizer step: loading, tokenizing, opening the cache
            elif clock.times:
                before_fit["done"] = 1
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    res = distill(cfg, on_step=clock.on_step)
    stop.set()
    thread.join()
    before_fit.pop("done", None)
    print(json.dumps({"baseline_kb": base, "peak_kb": peak, "peak_before_first_step_kb": before_fit,
                      "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "seconds": time.perf_counter() - t0, "steps": res.fit.steps}))


def _teacher(root: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from stages.models import load_tokenizer
    from stages.models import resolve_model

    out = root / "teacher-tiny"
    tok = load_tokenizer(resolve_model(BUNDLED_TEACHER))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                        intermediate_size=2 * HIDDEN, num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _config(teacher: Path, csv: Path, work: Path, epochs: int) -> dict:
    return {
        "data": {"train": str(csv), "dev": None, "test": None},
        "precompute": {"teachers": [str(teacher)], "cache_root": str(work / "caches"), "max_length": MAX_LENGTH,
                       "hidden_layers": [1], "attention_layers": [0]},
        "distill": {"teacher_signal": "cached", "max_length": MAX_LENGTH, "epochs": epochs,
                    "student": {"from_teacher": None, "config": str(teacher), "num_layers": 1},
                    "matches": [{"kind": "hidden_mse", "teacher_layer": 1, "student_layer": 1},
                                {"kind": "attention_mse", "teacher_layer": 0, "student_layer": 0}],
                    "output": str(work / "student"), "log_dir": str(work / "dvclive"),
                    "metrics": str(work / "metrics.json")},
    }


def _measure(teacher: Path, root: Path, n: int, epochs: int) -> dict:
    from cache_format import cache_info
    from stages.precompute import precompute
    from stages.config import config_from_dict

    work = root / f"n{n}"
    csv = write_subset(work / "train.csv", n, seed=0, repeat=True, join=6)
    cfg = _config(teacher, csv, work, epochs)
    log(f"precompute {n} examples")
    pre = precompute(config_from_dict(cfg))[0]
    info = cache_info(pre.path)
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    log(f"distill, {epochs} epoch(s) over {n} cached examples ({info['bytes_on_disk'] / 1e6:.0f} MB), in a subprocess")
    runs = {}
    for allocator, env in ALLOCATORS.items():
        log(f"  allocator: {allocator}")
        proc = subprocess.run([sys.executable, __file__, "--child", str(cfg_path)], capture_output=True, text=True,
                              env={**os.environ, **env})
        if proc.returncode:
            raise RuntimeError(f"child distill failed:\n{proc.stderr[-3000:]}")
        runs[allocator] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"examples": n, "epochs": epochs, "cache_bytes": info["bytes_on_disk"], "runs": runs}


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 192")
    ap.add_argument("--n", type=int,
                    help="N (default 192 quick, 640 full; keep N / 32 above the prefetch depth); the other cache has 10N")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    n = args.n or (192 if args.quick else 640)
    root = args.work or Path(tempfile.mkdtemp(prefix="kd-bench-memory-"))
    try:
        teacher = _teacher(root)
        results = [_measure(teacher, root, n, 10), _measure(teacher, root, 10 * n, 1)]
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    mb = 1 / 1024
    small, big = results
    cache_growth = (big["cache_bytes"] - small["cache_bytes"]) / 2**20
    rows, growth = [], {}
    for allocator in ALLOCATORS:
        for r in results:
            x = r["runs"][allocator]
            rows.append([allocator, f'{r["examples"]} x {r["epochs"]} ep', r["cache_bytes"] / 1e6, x["steps"],
                         x["peak_before_first_step_kb"]["RssAnon"] * mb, x["peak_kb"]["RssAnon"] * mb,
                         x["peak_kb"]["RssFile"] * mb, x["ru_maxrss_kb"] * mb])
        a, b = small["runs"][allocator], big["runs"][allocator]
        growth[allocator] = {k: (b["peak_kb"][k] - a["peak_kb"][k]) * mb for k in ("RssAnon", "VmRSS", "RssFile")}
        growth[allocator]["RssAnon_before_first_step"] = (b["peak_before_first_step_kb"]["RssAnon"]
                                                          - a["peak_before_first_step_kb"]["RssAnon"]) * mb
        g = growth[allocator]
        rows.append([allocator, "growth N -> 10N", cache_growth * 2**20 / 1e6, "", g["RssAnon_before_first_step"],
                     g["RssAnon"], g["RssFile"], (b["ru_maxrss_kb"] - a["ru_maxrss_kb"]) * mb])
    print("Peak memory of distill, same steps over a cache of N and 10N examples (MiB except the cache column)\n")
    print(table(["allocator", "examples x epochs", "cache MB", "steps", "peak RssAnon up to 1st step",
                 "peak RssAnon", "peak RssFile (mapped cache pages)", "ru_maxrss (= peak VmRSS)"], rows))
    for allocator, g in growth.items():
        print(f"\n{allocator}: private memory (RssAnon) grew {g['RssAnon']:.1f} MiB for {cache_growth:.0f} MiB more "
              f"cache ({100 * g['RssAnon'] / max(cache_growth, 1e-9):.1f}%), {g['RssAnon_before_first_step']:.1f} MiB "
              "of it by the end of the first step")
    path = write_results("memory", {"quick": args.quick, "results": results, "growth_mib": growth,
                                    "cache_growth_mib": cache_growth})
    print(f"written: {path}")


if __name__ == "__main__":
    main()
