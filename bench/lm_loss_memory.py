"""Peak memory and time of a causal-LM loss, chunked over tokens vs on the full [N, V] logits, as V grows.

One training step's loss: next-token cross-entropy + top-k KL (k = 32, tail bucket) from a linear head
(V x H, no bias) on N hidden states, forward and backward. "unchunked" computes the same per-token
functions on the full logits `head(hidden)`; "chunked" is `stages.losses.lm.chunked_loss` with
`chunk_tokens` rows at a time (each chunk's logits recomputed in backward); "chunked, C x V fixed" the same
with chunk_tokens = C * V0 / V (V0 the smallest V), so that every V has the same chunk logits size: with a
fixed chunk_tokens memory no longer grows with N, but still grows with V. Random hidden states, labels,
and top-k ids/log-probabilities (float16, as cached). Each (V, mode) runs in a fresh subprocess so that one
run's high-water mark cannot hide another's.

Reported per run: peak memory of the loss = ru_maxrss after the steps minus VmRSS just before the first
(CPU; both include the head's weight gradient, V x H x 4 bytes, which any method allocates), or CUDA's
max_memory_allocated minus memory_allocated before (`--device cuda`); median seconds per step.

    python bench/lm_loss_memory.py --quick   # N = 1024, chunk 256, 1 step
    python bench/lm_loss_memory.py           # N = 4096, H = 256, chunk 1024, V in {8192, 32768, 131072}, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import log, median, quiet, table, write_results

VOCABS = (8192, 32768, 131072)
MODES = ("unchunked", "chunked", "chunked, C x V fixed")
MIB = 2**20


def _vmrss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _child(spec: dict) -> dict:
    """Run `spec["repeats"]` forward+backward steps of one mode; return peak memory (bytes) and step times."""
    import torch

    from stages.losses import chunked_loss, next_token_ce, topk_loss

    n, h, v, k, device = spec["n"], spec["hidden"], spec["vocab"], spec["k"], torch.device(spec["device"])
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False, device=device)
    hidden = torch.randn(n, h, device=device, requires_grad=True)
    stride = v // k  # k distinct ids per row without building [N, V]: one per stride
    targets = {
        "labels": torch.randint(0, v, (n,), device=device),
        "topk_ids": (torch.arange(k) * stride + torch.randint(0, stride, (n, k))).to(device),
        "topk_logprobs": torch.log_softmax(torch.randn(n, k + 1) * 2, -1)[:, :k]
        .sort(dim=-1, descending=True).values.half().to(device),
    }

    def per_token(logits, labels, topk_ids, topk_logprobs):
        return next_token_ce(logits, labels) + topk_loss(logits, topk_ids, topk_logprobs)

    def step(rows: int = n) -> None:
        h, t = hidden[:rows], {key: x[:rows] for key, x in targets.items()}
        if spec["mode"] != "unchunked":
            loss = chunked_loss(h, head, per_token, t, chunk_tokens=spec["chunk"])
        else:
            loss = per_token(head(h).float(), **t).sum()
        loss.backward()
        hidden.grad = None
        head.weight.grad = None

    step(2)  # one-off costs (lazy imports, kernel and allocator setup) out of the measured peak
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _vmrss_kb() * 1024
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - base, "base_bytes": base, "seconds": times}


def _run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1024, chunk 256, 1 step per run")
    ap.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    ap.add_argument("--n", type=int, help="tokens (default 4096; 1024 with --quick)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, help="chunk_tokens (default 1024; 256 with --quick)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, help="steps per run, median time reported (default 3; 1 with --quick)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    n = args.n or (1024 if args.quick else 4096)
    chunk = args.chunk or (256 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 3)
    results, rows = [], []
    for v in args.vocab:
        runs = {}
        for mode in MODES:
            mode_chunk = {"unchunked": None, "chunked": chunk}.get(mode, max(1, chunk * min(args.vocab) // v))
            spec = {"mode": mode, "n": n, "hidden": args.hidden, "vocab": v, "k": args.k, "chunk": mode_chunk,
                    "repeats": repeats, "device": args.device}
            if mode != "unchunked" and mode_chunk == chunk and "chunked" in runs:
                runs[mode] = runs["chunked"]  # the same run
                continue
            log(f"V={v} {mode}: {repeats} step(s) in a subprocess")
            runs[mode] = {**spec, **_run(spec)}
        results.append(runs)
        u, c, f = runs["unchunked"], runs["chunked"], runs[MODES[2]]
        tu, tc = median(u["seconds"]), median(c["seconds"])
        rows.append([v, n * v * 4 / MIB, v * args.hidden * 4 / MIB, u["peak_bytes"] / MIB, c["peak_bytes"] / MIB,
                     u["peak_bytes"] / c["peak_bytes"], f["chunk"], f["peak_bytes"] / MIB, tu, tc, tc / tu,
                     median(f["seconds"]) / tu])
    what = "ru_maxrss - RSS before" if args.device == "cpu" else "CUDA max allocated - allocated before"
    print(f"next-token CE + top-{args.k} KL, forward + backward, N = {n} tokens, H = {args.hidden}, chunk {chunk}, "
          f"{args.device}, threads {os.environ.get('OMP_NUM_THREADS', 'default')}; peak = {what}\n")
    print(table(["V", "[N, V] fp32 logits MiB", "head grad MiB", "unchunked peak MiB",
                 f"chunked ({chunk}) peak MiB", "peak unchunked / chunked", "C x V fixed: chunk",
                 "C x V fixed: peak MiB", "unchunked s/step", f"chunked ({chunk}) s/step",
                 "time chunked / unchunked", "time C x V fixed / unchunked"], rows))
    path = write_results("lm_loss_memory", {"quick": args.quick, "n": n, "chunk": chunk, "hidden": args.hidden,
                                            "k": args.k, "device": args.device, "results": results})
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
