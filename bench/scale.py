"""Scale-out, side by side in one run: processes (torchrun, CPU gloo) and cache location (local disk vs S3).

On the bundled MiniLM-L6 teacher (a seeded 2-label head) and a Rotten Tomatoes subset (max_length 64):

    (a) precompute examples/s, 1 process vs `torchrun --nproc-per-node 2`. Each process gets one torch
        thread (OMP_NUM_THREADS=1), so 2 processes use the 2 cores a 1-process run leaves half idle. The rate
        is the one `kd precompute` prints: rows written by all processes over the teacher loop's time (after
        tokenising and loading the model). Ideal scaling is 2x.
    (b) cached distill examples/s (the training loop's own figure, `train_examples_per_second`), 1 vs 2
        processes with the same global batch.
    (c) cached distill seconds per step, logits + two hidden layers cached and matched (about 100 KB per
        example), reading the cache from local disk vs from an S3-compatible server
        (moto's server mode, a separate process on localhost), with `distill.prefetch` 1 and 4 batches,
        for each cache format the installed code knows (`precompute.format`: arrow, zarr).

Every run is a real `kd` command (a) (b) or the `distill` stage in this process (c), so the code measured is
the code users run. Ratios within one run are the result; this machine is shared and noisy.

    python bench/scale.py --quick      # small sizes, minutes
    python bench/scale.py              # the README's table

Needs the test extra (moto[server], s3fs) for (c).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import StepClock, log, median, minilm_teacher, quiet, table, write_results, write_subset

from stages.distill import distill
from stages.precompute import precompute
from stages.config import config_from_dict

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32
MAX_LENGTH = 64
SEED = 42


def _params(work: Path, teacher: Path, train: Path, fmt: str = "arrow", hidden: bool = False) -> dict:
    """Settings of every run; `hidden` caches and matches two teacher layers (the cache then carries ~100 KB
    per example instead of a few bytes, which is where reading it from a store can cost)."""
    pre = {"teachers": [str(teacher)], "cache_root": str(work / "caches"), "max_length": MAX_LENGTH,
           "batch_size": BATCH, "hidden_layers": [3, 6] if hidden else []}
    matches = [{"kind": "hidden_mse", "teacher_layer": t, "student_layer": s} for t, s in ((3, 1), (6, 2))]
    if fmt != "arrow":
        pre["format"] = fmt
    return {
        "data": {"train": str(train), "dev": None, "test": None, "transfer": None},
        "precompute": pre,
        "distill": {"teacher_signal": "cached", "epochs": 1, "batch_size": BATCH, "max_length": MAX_LENGTH,
                    "seed": SEED, "mixed_precision": "no", "student": {"from_teacher": str(teacher),
                                                                       "keep_layers": [0, 5]},
                    "output": str(work / "student"), "log_dir": str(work / "dvclive"), "metrics": str(work / "metrics.json"),
                    "matches": matches if hidden else []},
    }


def _kd(args: list[str], params: dict, work: Path, procs: int) -> str:
    """Run `kd <args>` (under torchrun when procs > 1) with one torch thread per process; its stdout."""
    work.mkdir(parents=True, exist_ok=True)
    pfile = work / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    launch = [sys.executable, "-m", "pipeline.cli"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
        "-m", "pipeline.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KD_PROGRESS": "0", "PYTHONPATH": str(ROOT),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([*launch, *args, "--params", str(pfile)], cwd=work, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kd {' '.join(args)} ({procs} processes) failed:\n{out.stderr[-3000:]}")
    return out.stdout


def bench_precompute(root: Path, teacher: Path, n: int, repeats: int) -> dict:
    train = write_subset(root / "pre-train.csv", n, seed=0, repeat=True)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(repeats):
        for procs in (1, 2):
            work = root / f"pre-{procs}-{rep}"
            out = _kd(["precompute"], _params(work, teacher, train), work, procs)
            rates[procs].append(float(re.search(r"([0-9.]+) examples/s", out).group(1)))
            shutil.rmtree(work)
            log(f"precompute {procs} process(es), repeat {rep}: {rates[procs][-1]:.1f} examples/s")
    return {p: median(r) for p, r in rates.items()}


def bench_distill_procs(root: Path, teacher: Path, n: int, repeats: int) -> dict:
    work = root / "distill-procs"
    train = write_subset(work / "train.csv", n, seed=0, repeat=True)
    params = _params(work, teacher, train)
    _kd(["precompute"], params, work, 1)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(repeats):
        for procs in (1, 2):
            _kd(["distill"], params, work, procs)
            rates[procs].append(json.loads((work / "metrics.json").read_text())["train_examples_per_second"])
            log(f"distill {procs} process(es), repeat {rep}: {rates[procs][-1]:.1f} examples/s")
    return {p: median(r) for p, r in rates.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto(work: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3 server in its own process (so its request handling does not share the reader's GIL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "kd-bench", "AWS_SECRET_ACCESS_KEY": "kd-bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, env


def _formats() -> list[str]:
    """The cache formats this checkout's settings accept."""
    try:
        config_from_dict({"precompute": {"format": "zarr"}})
        return ["arrow", "zarr"]
    except Exception:  # noqa: BLE001 - any refusal means the setting does not exist here
        return ["arrow"]


def bench_store(root: Path, teacher: Path, n: int, warmup: int, repeats: int) -> list[dict]:
    import s3fs

    proc, env = _moto(root)
    os.environ.update(env)
    rows = []
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir("kd-bench")
        for fmt in _formats():
            work = root / f"store-{fmt}"
            train = write_subset(work / "train.csv", n, seed=0, repeat=True)
            params = _params(work, teacher, train, fmt, hidden=True)
            local = precompute(config_from_dict(params))[0].path
            url = f"s3://kd-bench/{fmt}/{Path(local).name}"
            fs.put(str(local), url, recursive=True)
            size = sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file())
            times: dict[str, list[float]] = {}
            for rep in range(repeats):
                for where, path in (("local", str(local)), ("s3", url)):
                    for depth in (1, 4):
                        cfg = json.loads(json.dumps(params))
                        cfg["distill"].update(caches=[path], prefetch=depth)
                        clock = StepClock()
                        distill(config_from_dict(cfg), on_step=clock.on_step)
                        times.setdefault(f"{where}, prefetch {depth}", []).append(clock.seconds_per_step(warmup))
            base = median(times["local, prefetch 4"])
            for key, ts in times.items():
                rows.append({"format": fmt, "read from": key, "s_per_step": median(ts), "vs_local": median(ts) / base,
                             "cache_mb": size / 2**20})
                log(f"{fmt} {key}: {median(ts) * 1000:.1f} ms/step ({median(ts) / base:.2f}x local)")
    finally:
        proc.terminate()
        proc.wait()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--only", choices=["precompute", "distill", "store"], action="append")
    a = p.parse_args()
    quiet()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): steadier on a shared machine
    n_pre, n_dist, warmup = (256, 256, 2) if a.quick else (1024, 2048, 5)
    repeats = a.repeats or (1 if a.quick else 2)
    parts = a.only or ["precompute", "distill", "store"]
    root = Path(tempfile.mkdtemp(prefix="kd-scale-"))
    try:
        teacher = minilm_teacher(root).path
        res: dict = {"sizes": {"precompute_n": n_pre, "distill_n": n_dist, "batch": BATCH, "repeats": repeats}}
        if "precompute" in parts:
            r = bench_precompute(root, teacher, n_pre, repeats)
            res["precompute"] = r
            print(table(["processes", "precompute examples/s", "vs 1 process", "of ideal"],
                        [[p, r[p], r[p] / r[1], r[p] / r[1] / p] for p in (1, 2)]))
        if "distill" in parts:
            r = bench_distill_procs(root, teacher, n_dist, repeats)
            res["distill"] = r
            print(table(["processes", "distill examples/s", "vs 1 process", "of ideal"],
                        [[p, r[p], r[p] / r[1], r[p] / r[1] / p] for p in (1, 2)]))
        if "store" in parts:
            rows = bench_store(root, teacher, n_dist, warmup, repeats)
            res["store"] = rows
            print(table(["format", "cache read from", "ms/step", "vs local (prefetch 4)", "cache MiB"],
                        [[r["format"], r["read from"], r["s_per_step"] * 1000, r["vs_local"], r["cache_mb"]]
                         for r in rows]))
        print(f"results: {write_results('scale', res)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
