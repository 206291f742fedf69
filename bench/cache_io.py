"""Cache I/O benchmark: CacheWriter/CacheReader next to a raw numpy memmap of the same bytes on the same disk.

For each realistic shape: write throughput, sequential read (consecutive 32-example batches) and random
32-example batch gather, each with the same measurement on `np.lib.format.open_memmap` files holding the
same arrays. Prints a markdown table and writes JSON to bench/results/cache_io.json. Page cache is warm
for both (the data was just written), so the ratios compare the formats, not the disk.

The cost of the reader's lazy shard hash check: the first sequential pass of a freshly opened reader
with `verify="lazy"` (each shard is hashed before its first read) over the same pass with `verify="off"`.

    python bench/cache_io.py [--scale 1.0] [--dir /tmp/kd-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache_format import CacheReader, CacheWriter, FieldSpec

BATCH = 32
T = 128


@dataclass(frozen=True)
class Case:
    name: str
    fields: tuple[FieldSpec, ...]
    n: int  # examples at scale 1


CASES = [
    Case("cls logits [2] f32", (FieldSpec("logits", "float32", (2,)),), 100_000),
    Case("hidden T=128 H=384 f16 x1", (FieldSpec("hidden.6", "float16", ("T", 384)),), 2_000),
    Case("hidden T=128 H=384 f16 x2",
         (FieldSpec("hidden.3", "float16", ("T", 384)), FieldSpec("hidden.6", "float16", ("T", 384))), 1_500),
    Case("hidden T=128 H=768 f16 x1", (FieldSpec("hidden.12", "float16", ("T", 768)),), 1_500),
    Case("hidden T=128 H=768 f16 x2",
         (FieldSpec("hidden.6", "float16", ("T", 768)), FieldSpec("hidden.12", "float16", ("T", 768))), 1_000),
    Case("top-64 T=128 (f16 logprobs, i32 ids, f32 tail)",
         (FieldSpec("topk_logprobs", "float16", ("T", 64)), FieldSpec("topk_ids", "int32", ("T", 64)),
          FieldSpec("tail_logprob", "float32", ("T",))), 10_000),
]


def _make(case: Case, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    data = {}
    for f in case.fields:
        shape = (n, *f.resolve(T))
        if f.dtype.startswith("int"):
            data[f.name] = rng.integers(0, 32_000, size=shape, dtype=f.dtype)
        else:
            data[f.name] = rng.standard_normal(shape, dtype=np.float32).astype(f.dtype)
    return data


def _bench_case(case: Case, n: int, root: Path, rng: np.random.Generator, batches: int) -> dict:
    data = _make(case, n, rng)
    ids = [f"ex{i:07d}" for i in range(n)]
    lengths = np.full(n, T, dtype=np.int32)
    nbytes = sum(a.nbytes for a in data.values())

    # --- write ---
    cache_dir = root / "cache"
    t0 = time.perf_counter()
    with CacheWriter(cache_dir, case.fields, teacher_fingerprint="t", data_fingerprint="d", settings={}) as w:
        for s in range(0, n, BATCH):
            w.append(ids[s : s + BATCH], lengths[s : s + BATCH], {k: v[s : s + BATCH] for k, v in data.items()})
    t_write = time.perf_counter() - t0  # includes validation, hashing and fsync of every shard

    raw_dir = root / "raw"
    raw_dir.mkdir()
    t0 = time.perf_counter()
    for k, v in data.items():  # the same bytes as a .npy file, written batch by batch, then fsync'ed
        with open(raw_dir / f"{k}.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(v))
            for s in range(0, n, BATCH):
                f.write(v[s : s + BATCH].data)
            f.flush()
            os.fsync(f.fileno())
    t_write_raw = time.perf_counter() - t0
    raw = {k: np.load(raw_dir / f"{k}.npy", mmap_mode="r") for k in data}

    names = [f.name for f in case.fields]

    # --- sequential read: consecutive batches in cache order, the first pass of a fresh reader ---
    def first_pass(verify: str) -> float:
        fresh = CacheReader(cache_dir, verify=verify)
        t0 = time.perf_counter()
        for s in range(0, n, BATCH):
            fresh.gather(fresh.ids[s : s + BATCH], names)
        return time.perf_counter() - t0

    t_seq = first_pass("off")
    t_seq_lazy = first_pass("lazy")  # same pass, plus hashing every shard once
    # Steady state: once a shard is checked, the lazy check is one bool test per gather, as with "off".
    reader = CacheReader(cache_dir, verify="off")
    t0 = time.perf_counter()
    for s in range(0, n, BATCH):
        {k: np.array(v[s : s + BATCH]) for k, v in raw.items()}
    t_seq_raw = time.perf_counter() - t0

    # --- random batch gather (same index sets for both) ---
    picks = [np.sort(rng.choice(n, size=BATCH, replace=False)) for _ in range(batches)]
    pick_ids = [[ids[i] for i in p] for p in picks]
    for p, pid in zip(picks[:5], pick_ids[:5]):  # warm-up, and a correctness check
        got = reader.gather(pid, names)
        for k in names:
            assert np.array_equal(got[k], raw[k][p]), k
    # Interleaved and summarised by the median, so load from other processes hits both sides alike.
    times, times_raw = [], []
    for p, pid in zip(picks, pick_ids):
        t0 = time.perf_counter()
        reader.gather(pid, names)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        {k: v[p] for k, v in raw.items()}
        times_raw.append(time.perf_counter() - t0)
    t_rand, t_rand_raw = float(np.median(times)), float(np.median(times_raw))

    reader.close()
    shutil.rmtree(cache_dir)
    shutil.rmtree(raw_dir)
    mb = nbytes / 1e6
    return {
        "case": case.name,
        "examples": n,
        "bytes_per_example": nbytes / n,
        "write_examples_per_s": n / t_write,
        "write_MBps": mb / t_write,
        "write_raw_MBps": mb / t_write_raw,
        "seq_read_MBps": mb / t_seq,
        "seq_read_raw_MBps": mb / t_seq_raw,
        "seq_read_lazy_MBps": mb / t_seq_lazy,
        "first_pass_lazy_over_off": t_seq_lazy / t_seq,
        "rand32_ms": t_rand * 1e3,
        "rand32_raw_ms": t_rand_raw * 1e3,
        "rand32_ratio": t_rand / t_rand_raw,
        "rand32_mean_ms": float(np.mean(times)) * 1e3,
        "rand32_raw_mean_ms": float(np.mean(times_raw)) * 1e3,
    }


def _table(rows: list[dict]) -> str:
    head = ("| case | examples | KB/example | write ex/s | write MB/s (raw) | seq read MB/s (raw) | rand 32 median ms (raw) | "
            "rand ratio | 1st pass MB/s verify lazy (off) | lazy/off |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['examples']} | {r['bytes_per_example'] / 1e3:.2f} | {r['write_examples_per_s']:.0f} | "
            f"{r['write_MBps']:.0f} ({r['write_raw_MBps']:.0f}) | {r['seq_read_MBps']:.0f} ({r['seq_read_raw_MBps']:.0f}) | "
            f"{r['rand32_ms']:.2f} ({r['rand32_raw_ms']:.2f}) | {r['rand32_ratio']:.2f}x | "
            f"{r['seq_read_lazy_MBps']:.0f} ({r['seq_read_MBps']:.0f}) | {r['first_pass_lazy_over_off']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's example count")
    parser.add_argument("--batches", type=int, default=200, help="random batches timed per case")
    parser.add_argument("--dir", default=None, help="folder on the disk to test (default: a temp folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_io.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    base = Path(tempfile.mkdtemp(prefix="kd-cache-bench-", dir=args.dir))
    try:
        for case in CASES:
            root = base / str(len(rows))
            root.mkdir()
            rows.append(_bench_case(case, max(BATCH * 4, int(case.n * args.scale)), root, rng, args.batches))
            print(f"done: {case.name} ({rows[-1]['rand32_ratio']:.2f}x)", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(_table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "batch": BATCH, "tokens": T,
            "scale": args.scale, "note": "warm page cache for both; raw = numpy .npy memmap of the same arrays"}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
