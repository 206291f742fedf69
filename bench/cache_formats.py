"""Arrow or Zarr shards: the same caches written and read in both formats, compared as ratios in one run.

Per case and format: write MB/s (logical bytes through CacheWriter, validation, hashing and fsync included),
bytes stored, sequential read MB/s (consecutive 32-example batches, first pass of a fresh reader), random
32-example batch gather (median ms), and the same random batches through `prefetch` (depth 4) while the
consumer "trains" for `--step-ms` per batch: the ms per batch the step had to wait for data. Readers use
verify="off" (the lazy hash check costs the same per byte in both formats; bench/cache_io.py measures it).
Both formats read a warm page cache (the data was just written).

Cases: real MiniLM-L6 outputs (logits, hidden states of layers 3 and 6 in fp16, input ids) over Rotten Tomatoes
reviews (4 sentences joined, up to 128 tokens), plus synthetic sequence-classification logits (tiny rows) and a
synthetic top-64 language-model cache.

    python bench/cache_formats.py [--real 512] [--scale 1.0] [--dir /tmp/x] [--url s3://bucket/prefix]

`--url` writes and reads the caches at `<url>/<case>-<format>` (any fsspec URL: memory://, s3://, gs://)
instead of a local folder; `--moto` starts a local S3-compatible server (moto, in the test extra) and uses a
bucket on it: the real s3fs client over HTTP on localhost, so no network latency.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_format import CacheReader, CacheWriter, FieldSpec, cache_info

BATCH = 32
FORMATS = ("arrow", "zarr")


@dataclass
class Case:
    name: str
    fields: list[FieldSpec]
    ids: list[str]
    lengths: np.ndarray
    arrays: dict[str, list[np.ndarray] | np.ndarray]  # fixed fields [n, ...]; ragged: one array per example

    @property
    def nbytes(self) -> int:
        return sum(sum(a.nbytes for a in v) if isinstance(v, list) else v.nbytes for v in self.arrays.values())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def real_minilm(n: int, store: Path) -> Case:
    """MiniLM-L6 (bundled) outputs over n Rotten Tomatoes examples; computed once and kept under `store`."""
    file = store / f"minilm-{n}.npz"
    if not file.exists():
        import torch

        from bench._common import minilm_teacher, quiet, write_subset
        from stages.data import read_table
        from stages.models import load_tokenizer

        quiet()
        from transformers import AutoModelForSequenceClassification

        teacher = minilm_teacher(store)
        csv = write_subset(store / f"rt-{n}.csv", n, join=4, repeat=True)
        texts = read_table(csv, string_columns=["text"]).column("text").to_pylist()
        tok = load_tokenizer(str(teacher.path))
        model = AutoModelForSequenceClassification.from_pretrained(teacher.path).eval()
        out: dict[str, list] = {"logits": [], "hidden.3": [], "hidden.6": [], "input_ids": [], "length": []}
        torch.manual_seed(0)
        with torch.inference_mode():
            for s in range(0, n, 32):
                enc = tok(texts[s : s + 32], truncation=True, max_length=128, padding=True, return_tensors="pt")
                res = model(**enc, output_hidden_states=True)
                lengths = enc["attention_mask"].sum(1)
                for k in range(len(lengths)):
                    t = int(lengths[k])
                    out["length"].append(t)
                    out["logits"].append(res.logits[k].float().numpy())
                    out["input_ids"].append(enc["input_ids"][k, :t].numpy().astype(np.int32))
                    for layer in (3, 6):
                        out[f"hidden.{layer}"].append(res.hidden_states[layer][k, :t].half().numpy())
        flat = {"length": np.array(out["length"], np.int32), "logits": np.stack(out["logits"])}
        for name in ("hidden.3", "hidden.6", "input_ids"):
            flat[name] = np.concatenate(out[name])
        np.savez(file, **flat)
    data = np.load(file)
    lengths = data["length"]
    cuts = np.cumsum(lengths)[:-1]
    arrays = {"logits": data["logits"]}
    for name in ("hidden.3", "hidden.6", "input_ids"):
        arrays[name] = np.split(data[name], cuts)
    fields = [FieldSpec("logits", "float32", (2,)), FieldSpec("hidden.3", "float16", ("T", 384)),
              FieldSpec("hidden.6", "float16", ("T", 384)), FieldSpec("input_ids", "int32", ("T",))]
    return Case(f"MiniLM-L6 real: logits + hidden 3,6 f16 + ids ({n} ex)", fields,
                [f"ex{i:07d}" for i in range(len(lengths))], lengths, arrays)


def synthetic_logits(n: int, rng: np.random.Generator) -> Case:
    return Case(f"synthetic cls logits [2] f32 ({n} ex)", [FieldSpec("logits", "float32", (2,))],
                [f"ex{i:07d}" for i in range(n)], np.zeros(n, np.int32),
                {"logits": rng.standard_normal((n, 2), dtype=np.float32)})


def synthetic_topk(n: int, rng: np.random.Generator, k: int = 64) -> Case:
    """Top-k log-probabilities (sorted, decreasing, like real ones), int32 ids and f32 tail log-mass per token."""
    lengths = rng.integers(32, 129, n).astype(np.int32)
    lp, ids, lse = [], [], []
    for t in lengths:
        lp.append(-np.sort(rng.exponential(3.0, (t, k)), axis=1).astype(np.float16))
        ids.append(rng.integers(0, 32_000, (t, k), dtype=np.int32))
        lse.append(rng.normal(10, 1, t).astype(np.float32))
    fields = [FieldSpec("topk_logprobs", "float16", ("T", k)), FieldSpec("topk_ids", "int32", ("T", k)),
              FieldSpec("tail_logprob", "float32", ("T",))]
    return Case(f"synthetic top-{k} LM (T<=128) ({n} ex)", fields, [f"ex{i:07d}" for i in range(n)], lengths,
                {"topk_logprobs": lp, "topk_ids": ids, "tail_logprob": lse})


def _bench(case: Case, fmt: str, path: str, picks: list[list[str]], warmup: list[str], step_s: float) -> dict:
    n = len(case.ids)
    t0 = time.perf_counter()
    with CacheWriter(path, case.fields, teacher_fingerprint="t", data_fingerprint="d", settings={},
                     shard_format=fmt, commit_examples=max(BATCH, n // 4)) as w:  # 4 shards
        for s in range(0, n, BATCH):
            w.append(case.ids[s : s + BATCH], case.lengths[s : s + BATCH],
                     {k: v[s : s + BATCH] for k, v in case.arrays.items()})
    t_write = time.perf_counter() - t0
    stored = cache_info(path)["bytes_on_disk"]

    reader = CacheReader(path, verify="off")
    t0 = time.perf_counter()
    for s in range(0, n, BATCH):
        reader.gather(reader.ids[s : s + BATCH])
    t_seq = time.perf_counter() - t0

    # Fresh readers for the random batches and for prefetch: a remote Arrow reader keeps the bytes it fetched.
    # Each first reads one other example (zarr opens its arrays on first use).
    times = []
    reader = CacheReader(path, verify="off")
    reader.gather(warmup)
    for ids in picks:
        t0 = time.perf_counter()
        reader.gather(ids)
        times.append(time.perf_counter() - t0)

    reader = CacheReader(path, verify="off")
    reader.gather(warmup)
    t0 = time.perf_counter()
    for _ in reader.prefetch(picks, depth=4, torch=False):
        time.sleep(step_s)  # the training step: releases the GIL like a real one mostly does
    wait = (time.perf_counter() - t0) / len(picks) - step_s
    mb = case.nbytes / 1e6
    return {"case": case.name, "format": fmt, "examples": n, "logical_MB": mb, "stored_MB": stored / 1e6,
            "write_MBps": mb / t_write, "seq_read_MBps": mb / t_seq, "rand32_ms": float(np.median(times)) * 1e3,
            "rand32_mean_ms": float(np.mean(times)) * 1e3,
            "prefetch_wait_ms": max(wait, 0.0) * 1e3}


def _table(rows: list[dict], step_ms: float) -> str:
    head = ("| case | format | stored MB (values MB / stored) | write MB/s | seq read MB/s | random 32 gather ms "
            f"median (mean) | prefetch wait ms per batch ({step_ms:g} ms step) |\n|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["format"]] = r
    for case, fm in by_case.items():
        for fmt, r in fm.items():
            lines.append(f"| {case} | {fmt} | {r['stored_MB']:.1f} ({r['logical_MB'] / r['stored_MB']:.2f}x) | "
                         f"{r['write_MBps']:.0f} | {r['seq_read_MBps']:.0f} | "
                         f"{r['rand32_ms']:.2f} ({r['rand32_mean_ms']:.2f}) | "
                         f"{r['prefetch_wait_ms']:.2f} |")
        if set(fm) == set(FORMATS):
            a, z = fm["arrow"], fm["zarr"]
            lines.append(f"| {case} | **zarr / arrow** | {z['stored_MB'] / a['stored_MB']:.2f}x | "
                         f"{z['write_MBps'] / a['write_MBps']:.2f}x | {z['seq_read_MBps'] / a['seq_read_MBps']:.2f}x | "
                         f"{z['rand32_ms'] / a['rand32_ms']:.1f}x ({z['rand32_mean_ms'] / a['rand32_mean_ms']:.1f}x) | "
                         f"{z['prefetch_wait_ms']:.2f} vs {a['prefetch_wait_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=512, help="MiniLM examples (0: skip the real case)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the synthetic cases' example counts")
    parser.add_argument("--batches", type=int, default=40, help="random 32-example batches timed per format")
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated training step behind prefetch")
    parser.add_argument("--dir", default=None, help="local folder for the caches (default: a temp folder)")
    parser.add_argument("--store", default="bench/results/cache_formats_data", help="where the MiniLM outputs are kept")
    parser.add_argument("--url", default=None, help="fsspec URL base to write the caches to instead of --dir")
    parser.add_argument("--moto", action="store_true",
                        help="start a local S3-compatible server (moto, test extra) and use a bucket on it as --url")
    args = parser.parse_args()
    server = None
    if args.moto:
        server, args.url = _start_moto()
    try:
        _run(args)
    finally:
        if server is not None:
            server.stop()


def _start_moto() -> tuple[object, str]:
    import os
    import uuid

    import s3fs

    from tests.helpers import start_moto_server

    server, env = start_moto_server()
    os.environ.update(env)
    bucket = f"kd-bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return server, f"s3://{bucket}/caches"


def _run(args: argparse.Namespace) -> None:
    from bench._common import log, write_results  # imports torch: only when running

    rng = np.random.default_rng(0)
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    cases = []
    if args.real:
        log(f"MiniLM outputs for {args.real} examples")
        cases.append(real_minilm(args.real, store))
    cases.append(synthetic_logits(int(50_000 * args.scale), rng))
    cases.append(synthetic_topk(int(1_000 * args.scale), rng))
    base = None if args.url else Path(tempfile.mkdtemp(prefix="kd-formats-", dir=args.dir))
    rows = []
    try:
        for case in cases:
            picks = [[case.ids[i] for i in rng.choice(len(case.ids), BATCH, replace=False)]
                     for _ in range(args.batches + 1)]
            picks, warmup = picks[1:], picks[0][:1]
            for fmt in FORMATS:
                path = f"{args.url.rstrip('/')}/{_slug(case.name)}-{fmt}" if args.url else str(base / f"{len(rows)}")
                rows.append(_bench(case, fmt, path, picks, warmup, args.step_ms / 1e3))
                log(f"{case.name} {fmt}: {rows[-1]['rand32_ms']:.2f} ms per random batch")
                if base is not None:
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    print(_table(rows, args.step_ms))
    import zarr

    name = "cache_formats_url" if args.url else "cache_formats"
    out = write_results(name, {"zarr": zarr.__version__, "url": args.url, "batch": BATCH, "step_ms": args.step_ms,
                               "results": rows})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
