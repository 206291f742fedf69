"""FastBERT inference speed at each exit threshold, against the same model running every block.

`kd evaluate` times each speed once, one after the other; on a shared machine whose load changes the
timings of separate configurations are then not comparable. Here the configurations alternate (no exit,
then every speed, in rounds) on the same batches, and the best round of each is reported with the average
blocks run and the accuracy (those two are deterministic).

    python bench/fastbert_speed.py models/fastbert data/test.csv            # the demo's FastBERT folder
    python bench/fastbert_speed.py models/fastbert data/test.csv --rounds 5 --batches 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import log, quiet, table, write_results

from stages.config import config_from_dict
from stages.evaluate import measure_throughput
from stages.methods import load_fastbert, predict_exits
from stages.models import load_tokenizer
from stages.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a FastBERT folder (`kd distill` with distill.method: fastbert)")
    parser.add_argument("data", type=Path, help="a labelled CSV (id, text, label), e.g. data/test.csv")
    parser.add_argument("--speeds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    quiet()
    torch.set_grad_enabled(False)
    cpu = torch.device("cpu")
    task = get_task(config_from_dict({}).data)
    model = load_fastbert(args.model, task.num_labels)
    data = task.encode(load_tokenizer(str(args.model)), task.load(args.data), args.max_length)
    configs = [None, *args.speeds]
    best = {s: 0.0 for s in configs}
    for r in range(args.rounds):
        for s in configs:
            model.speed = s
            best[s] = max(best[s], measure_throughput(model, data, args.batch_size, args.batches, cpu))
        log(f"round {r + 1}/{args.rounds} done")
    rows, results = [], []
    for s in configs:
        model.speed = s
        preds, layers = predict_exits(model, data, task, args.batch_size, cpu)
        acc = task.score(data, preds)["accuracy"]
        results.append({"speed": s, "accuracy": acc, "average_layers": float(layers.mean()),
                        "examples_per_second": best[s], "vs_no_exit": best[s] / best[None]})
        rows.append(["none (every block)" if s is None else s, acc, float(layers.mean()), best[s],
                     best[s] / best[None]])
    print(table(["speed", "accuracy", "average blocks", "examples/s (best round)", "x no exit"], rows))
    path = write_results("fastbert_speed", {"model": str(args.model), "data": str(args.data),
                                            "examples": len(data), "batch_size": args.batch_size,
                                            "batches": args.batches, "rounds": args.rounds, "results": results})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
