"""What a kill late in precompute costs: work redone on resume, with and without the commit cadence.

A precompute run commits a shard every `precompute.commit_examples` examples or `commit_seconds`
seconds (whichever comes first, besides the 256 MiB shard cap); committed shards survive a SIGKILL and
the next run resumes after them. Without a cadence a logits-only cache is one shard, so a kill at 95%
redoes everything. For each setting this script times one uninterrupted `kd precompute` (a subprocess,
wall time), then starts it again in a fresh cache, where the process SIGKILLs itself once 95% of the
examples have reached the cache writer, reruns it to the end and reports the examples the resumed run had
to compute, its time, and the shards of the finished cache.

    python bench/precompute_resume.py --quick                    # 2,000 examples, cadence 10 s / 500 ex
    python bench/precompute_resume.py --examples 8530            # the default cadence (60 s / 20,000 ex)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import TEACHERS, log, quiet, table, write_results, write_subset

_RUN = """
import json, os, signal, sys
import cache_format as cf
from stages.config import config_from_dict
from stages import precompute
cfg, kill_after = json.loads(sys.argv[1]), int(sys.argv[2])
if kill_after:
    append, seen = cf.CacheWriter.append, [0]
    def counting_append(self, ids, *args, **kwargs):
        append(self, ids, *args, **kwargs)
        seen[0] += len(ids)
        if seen[0] >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # what a crash or an OOM kill does: no cleanup at all
    cf.CacheWriter.append = counting_append
r = precompute(config_from_dict(cfg))[0]
print(json.dumps({"written": r.written}))
"""
_NEVER = {"commit_examples": 10**9, "commit_seconds": 1e9}  # one shard: the behaviour before the cadence


def _config(teacher: Path, csv: Path, root: Path, cadence: dict) -> dict:
    return {"data": {"train": str(csv), "dev": None, "test": None, "transfer": None},
            "precompute": {"teachers": [str(teacher)], "cache_root": str(root), "device": "cpu", **cadence}}


def _start(cfg: dict, kill_after: int = 0) -> subprocess.Popen:
    env = {**os.environ, "KD_PROGRESS": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", _RUN, json.dumps(cfg), str(kill_after)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"precompute failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def _shards(root: Path) -> int:
    [cache] = [p for p in root.iterdir() if p.is_dir()]
    return len(json.loads((cache / "manifest.json").read_text())["shards"])


def _case(name: str, teacher: Path, csv: Path, work: Path, cadence: dict, kill_after: int) -> dict:
    full_root, killed_root = work / f"{name}-full", work / f"{name}-killed"
    t0 = time.perf_counter()
    _finish(_start(_config(teacher, csv, full_root, cadence)))
    full = time.perf_counter() - t0
    proc = _start(_config(teacher, csv, killed_root, cadence), kill_after)
    if proc.wait() != -signal.SIGKILL:
        raise SystemExit(f"the run to be killed ended with {proc.returncode}, not SIGKILL")
    t0 = time.perf_counter()
    written = _finish(_start(_config(teacher, csv, killed_root, cadence)))["written"]
    resume = time.perf_counter() - t0
    return {"case": name, "full_s": full, "resume_s": resume, "redone": written, "shards": _shards(full_root)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=8530)
    ap.add_argument("--commit-examples", type=int, default=20000)
    ap.add_argument("--commit-seconds", type=float, default=60.0)
    ap.add_argument("--kill-at", type=float, default=0.95, help="share of the examples written before the kill")
    ap.add_argument("--quick", action="store_true", help="2,000 examples, cadence 10 s / 500 examples")
    args = ap.parse_args()
    if args.quick:
        args.examples, args.commit_examples, args.commit_seconds = 2000, 500, 10.0
    quiet()
    with tempfile.TemporaryDirectory(prefix="kd-bench-resume-") as tmp:
        work = Path(tmp)
        teacher = TEACHERS["minilm"](work).path
        csv = write_subset(work / "train.csv", args.examples, repeat=True)
        cadence = {"commit_examples": args.commit_examples, "commit_seconds": args.commit_seconds}
        rows = []
        for name, c in (("cadence", cadence), ("one shard", _NEVER)):
            log(f"{name}: full run, then a run killed at {args.kill_at:.0%} and resumed")
            rows.append(_case(name.replace(" ", "-"), teacher, csv, work, c, int(args.kill_at * args.examples)))
    headers = ["commits", "examples", "uninterrupted s", "examples redone after the kill", "resume s",
               "resume / uninterrupted", "shards"]
    labels = [f"every {args.commit_examples} examples or {args.commit_seconds:g} s", "none (one shard)"]
    body = [[lab, args.examples, r["full_s"], r["redone"], r["resume_s"], r["resume_s"] / r["full_s"], r["shards"]]
            for lab, r in zip(labels, rows)]
    print(table(headers, body))
    write_results("precompute_resume", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
