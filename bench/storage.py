"""Cache storage: bytes per example per field and dtype, from `cache_format.cache_info` on real precompute runs.

Every example is exactly 128 tokens (several Rotten Tomatoes sentences joined, truncated at max_length 128).
Fields: logits (2 labels), the last layer's hidden states (all tokens, and first token only), the last
layer's attention maps (all heads), the stored input ids and labels, for float32, float16 and bfloat16 caches.
"raw" is the bare array size (elements x item size); the difference is the Arrow offsets/metadata.
Widths: the bundled MiniLM (384, 12 heads) and a 768-wide BERT (12 heads; 2 random layers: the bytes of a
field do not depend on the depth).

    python bench/storage.py --quick     # 64 examples per cache
    python bench/storage.py             # 512 examples per cache
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _common import (
    Teacher,
    bert_base_teacher,
    log,
    minilm_teacher,
    quiet,
    table,
    write_results,
    write_subset,
)

from cache_format import cache_info
from stages.precompute import precompute
from stages.config import config_from_dict

TOKENS = 128
DTYPES = ["float32", "float16", "bfloat16"]
ITEM = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}


def _raw(name: str, t: Teacher, dtype: str, tokens: str) -> int:
    """Bytes of the bare array of one example at 128 tokens."""
    if name == "logits":
        return 2 * ITEM[dtype]
    if name == "input_ids":
        return TOKENS * 4
    if name == "label":
        return 8
    if name.startswith("hidden."):
        return (TOKENS if tokens == "all" else 1) * t.hidden * ITEM[dtype]
    return 12 * TOKENS * TOKENS * ITEM[dtype]  # attention: heads x T x T


def _cache(t: Teacher, csv: Path, root: Path, dtype: str, tokens: str) -> dict:
    cfg = {"data": {"train": str(csv), "dev": None, "test": None},
           "precompute": {"teachers": [str(t.path)], "cache_root": str(root / "caches"), "max_length": TOKENS,
                          "batch_size": 16, "dtype": dtype, "hidden_tokens": tokens, "hidden_layers": [t.layers],
                          "attention_layers": [t.layers - 1] if tokens == "all" else [], "device": "cpu"}}
    res = precompute(config_from_dict(cfg))[0]
    return cache_info(res.path)


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 examples per cache")
    ap.add_argument("--examples", type=int, help="examples per cache (default 64 quick, 512 full)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    n = args.examples or (64 if args.quick else 512)
    root = args.work or Path(tempfile.mkdtemp(prefix="kd-bench-storage-"))
    results, rows = [], []
    try:
        csv = write_subset(root / "train.csv", n, seed=0, join=12)  # > 128 tokens, always truncated
        for t in (minilm_teacher(root), bert_base_teacher(root, layers=2)):
            for dtype in DTYPES:
                for tokens in ("all", "first"):
                    log(f"{t.name}: {dtype} cache, hidden tokens: {tokens}")
                    info = _cache(t, csv, root, dtype, tokens)
                    lengths_ok = info["count"] == n
                    for f in info["fields"]:
                        if tokens == "first" and not f["name"].startswith("hidden."):
                            continue  # the same fields as in the "all" cache
                        kind = {"logits": "logits", "input_ids": "input ids", "label": "label"}.get(
                            f["name"], "hidden, first token" if tokens == "first" and f["name"].startswith("hidden.")
                            else "hidden, all tokens" if f["name"].startswith("hidden.") else "attention, all heads")
                        raw = _raw(f["name"], t, dtype, tokens)
                        row = {"teacher": t.name, "width": t.hidden, "dtype": f["dtype"], "field": kind,
                               "bytes_per_example": f["bytes_per_example"], "raw_bytes_per_example": raw,
                               "overhead": f["bytes_per_example"] / raw - 1, "examples": info["count"]}
                        results.append(row)
                    results.append({"teacher": t.name, "width": t.hidden, "dtype": dtype,
                                    "field": f"whole cache on disk ({'all' if tokens == 'all' else 'first'} tokens)",
                                    "bytes_per_example": info["bytes_on_disk"] / max(info["count"], 1),
                                    "raw_bytes_per_example": float("nan"), "overhead": float("nan"),
                                    "examples": info["count"], "count_ok": lengths_ok})
                    shutil.rmtree(root / "caches", ignore_errors=True)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    for r in results:
        rows.append([r["teacher"], r["dtype"], r["field"], r["bytes_per_example"],
                     r["raw_bytes_per_example"] if not np.isnan(r["raw_bytes_per_example"]) else "",
                     f"{100 * r['overhead']:.2f}%" if not np.isnan(r["overhead"]) else ""])
    print(f"Cache bytes per example at {TOKENS} tokens ({n} examples per cache)\n")
    print(table(["teacher", "dtype", "field", "bytes/example", "raw bytes/example", "overhead"], rows))
    path = write_results("storage", {"quick": args.quick, "tokens": TOKENS, "examples": n, "results": results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
