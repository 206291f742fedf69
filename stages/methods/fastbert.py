"""FastBERT (Liu et al. 2020, arXiv 2004.02178): self-distilled branch classifiers and real early exit.

A fine-tuned BERT-like classifier (the backbone: `kd train-teacher`'s output or any fine-tuned model) gets a
small classifier branch after each of its blocks but the last; the last exit is the backbone's own head.
`kd distill` with `distill.method: fastbert` trains the branches only (the backbone is frozen and kept in eval
mode): each learns KL(p_final || p_branch) from the final classifier, on the training and transfer texts
(labels are not read), through the one training loop (`fit`: checkpoints, exact --resume).

Inference runs block by block. After block i the still-active rows go through branch i; a row whose
normalised entropy H(p) / log(num_labels) is at most `speed` leaves with that branch's prediction, and only
the others go on (the hidden states of the leaving rows are dropped: the next block runs on fewer rows). Speed
1 makes every row leave at the first branch; speed None runs every block (the backbone's own prediction).

Saved folder: the backbone (`save_pretrained` + tokenizer: it loads alone as the full model), plus
`fastbert.json` (branch sizes and counts) and `fastbert_branches.safetensors` (the branches' weights).
`load_fastbert(folder)` loads both; `kd evaluate` measures such a folder at every `evaluate.fastbert_speeds`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from cache_format import atomic_file, atomic_write_text
from cache_format import KDError
from stages.train import dist
from stages.train import FitResult, fit, replace_folder, write_model
from stages.config import Config, config_to_dict
from stages.data import Encoded, collate, model_inputs
from stages.losses import kd_loss
from stages.models import ModelError, load_classifier, load_tokenizer, num_layers, teacher_fingerprint
from stages.models.loading import _layer_list
from stages.methods.common import start_method
from stages.tasks import LabelledTask, get_task, labelled
from stages.tasks import load_split
from stages.models import resolve_model

__all__ = ["FastBertError", "BranchClassifier", "FastBert", "FastBertOutput", "normalized_entropy", "check_speed",
           "SelfDistillation", "exit_scores", "predict_exits", "speed_curve", "write_fastbert", "save_fastbert",
           "load_fastbert", "is_fastbert", "distill_fastbert", "curve_rows", "write_curve", "CONFIG_FILE",
           "BRANCHES_FILE"]

CONFIG_FILE = "fastbert.json"
BRANCHES_FILE = "fastbert_branches.safetensors"
_FORMAT = 1
# Backbones whose blocks `FastBert` can run one at a time: embeddings + encoder.layer + the head below.
_SUPPORTED = ("bert", "roberta")


class FastBertError(KDError, ValueError):
    """A FastBERT setting or model cannot be used as asked (speed out of range, unsupported backbone)."""


def check_speed(speed: float | None) -> float | None:
    """`speed` itself if it is None (no early exit) or in (0, 1]; else FastBertError."""
    if speed is not None and not (isinstance(speed, (int, float)) and 0 < speed <= 1):
        raise FastBertError(f"FastBERT speed must be in (0, 1] (got {speed!r}); 1 = every example leaves at the "
                            "first branch, near 0 = none leaves early")
    return speed


def normalized_entropy(logits: Tensor) -> Tensor:
    """H(softmax(logits)) / log(num_labels) per row, in [0, 1] (FastBERT's "uncertainty")."""
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    return h.clamp(0.0, 1.0)  # rounding can put a uniform distribution a hair above 1


class BranchClassifier(nn.Module):
    """The paper's student classifier: tanh(Linear) to `width`, self-attention, first token, tanh(Linear), Linear."""

    def __init__(self, hidden: int, width: int, heads: int, num_labels: int):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.dense = nn.Linear(width, width)
        self.out = nn.Linear(width, num_labels)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        x = torch.tanh(self.down(hidden))
        # Only the first token's output is read, so it is the only query: same result, 1/T of the work.
        a, _ = self.attention(x[:, :1], x, x, key_padding_mask=mask == 0, need_weights=False)
        return self.out(torch.tanh(self.dense(a[:, 0])))


@dataclass
class FastBertOutput:
    """`logits` [B, C] of the exit each row left at, and `layers` [B]: how many blocks each row ran."""

    logits: Tensor
    layers: Tensor


class FastBert(nn.Module):
    """A fine-tuned BERT-like classifier with a branch classifier after each block but the last.

    `model(input_ids, attention_mask, token_type_ids)` runs adaptive inference at `self.speed` and returns a FastBertOutput; `exit_logits` gives every exit's logits for every row. The backbone
    is frozen and always in eval mode: FastBERT fine-tunes it before the branches are trained.
    """

    def __init__(self, backbone: PreTrainedModel, branch_width: int = 128, branch_heads: int = 2,
                 speed: float | None = None):
        super().__init__()
        kind = getattr(backbone.config, "model_type", None)
        if kind not in _SUPPORTED or not type(backbone).__name__.endswith("ForSequenceClassification"):
            raise FastBertError(f"FastBERT runs BERT or RoBERTa sequence classifiers block by block, not "
                                f"{type(backbone).__name__}; use such a fine-tuned model as distill.fastbert.backbone")
        if num_layers(backbone) < 2:
            raise FastBertError("FastBERT needs a backbone of at least 2 blocks (a branch after every block but "
                                "the last, whose exit is the backbone's own head)")
        self.backbone = backbone.requires_grad_(False)
        self.num_labels = int(backbone.config.num_labels)
        self.branch_width, self.branch_heads = branch_width, branch_heads
        self.branches = nn.ModuleList(
            BranchClassifier(int(backbone.config.hidden_size), branch_width, branch_heads, self.num_labels)
            for _ in range(num_layers(backbone) - 1))
        self.speed = speed
        self.train(False)

    @property
    def speed(self) -> float | None:
        """Exit threshold on the normalised entropy, in (0, 1]; None: no early exit (every block runs)."""
        return self._speed

    @speed.setter
    def speed(self, value: float | None) -> None:
        self._speed = check_speed(value)

    @property
    def blocks(self) -> nn.ModuleList:
        return _layer_list(self.backbone)[1]

    def train(self, mode: bool = True) -> "FastBert":
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout must not make the final classifier's targets noisy
        return self

    def _block_mask(self, hidden: Tensor, mask: Tensor) -> Tensor | None:
        """The attention mask the blocks take, as the backbone builds it for its attention implementation."""
        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=hidden, attention_mask=mask)

    def _head(self, hidden: Tensor) -> Tensor:
        """The backbone's own classifier on the last block's output."""
        model, base = self.backbone, self.backbone.base_model
        if getattr(base, "pooler", None) is not None:  # BERT: pooler, dropout, classifier
            return model.classifier(model.dropout(base.pooler(hidden)))
        return model.classifier(hidden)  # RoBERTa: the head reads the first token itself

    def exit_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    token_type_ids: Tensor | None = None) -> list[Tensor]:
        """Every exit's logits for every row: the branches after blocks 1..L-1, then the backbone's head."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():  # the backbone is frozen: only the branches get gradients
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                output_hidden_states=True)
        hidden = out.hidden_states[1:-1]  # [0] is the embeddings' output
        return [b(h, attention_mask) for b, h in zip(self.branches, hidden)] + [out.logits]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> FastBertOutput:
        speed = self.speed
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n, blocks, device = input_ids.shape[0], self.blocks, input_ids.device
        logits = torch.empty(n, self.num_labels, device=device)
        layers = torch.full((n,), len(blocks), dtype=torch.long, device=device)
        rows = torch.arange(n, device=device)  # the batch rows still running
        mask = attention_mask
        hidden = self.backbone.base_model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        block_mask = self._block_mask(hidden, mask)
        for i, block in enumerate(blocks):
            hidden = block(hidden, block_mask)
            if i == len(blocks) - 1:
                logits[rows] = self._head(hidden).float()
                break
            if speed is None:
                continue
            exit_logits = self.branches[i](hidden, mask).float()
            leave = normalized_entropy(exit_logits) <= speed
            if not leave.any():
                continue
            logits[rows[leave]] = exit_logits[leave]
            layers[rows[leave]] = i + 1
            stay = (~leave).nonzero().squeeze(1)
            if not len(stay):
                break
            # Only the staying rows go on: the next blocks run on a smaller batch.
            rows, hidden, mask = rows[stay], hidden.index_select(0, stay), mask.index_select(0, stay)
            block_mask = self._block_mask(hidden, mask)
        return FastBertOutput(logits=logits, layers=layers)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def is_fastbert(path: str | Path) -> bool:
    """True for a folder that `save_fastbert` wrote."""
    return (Path(path) / CONFIG_FILE).is_file()


def write_fastbert(model: FastBert, tokenizer: Any, folder: Path, *, result: FitResult | None = None,
                   label_names: Sequence[str] | None = None, head_config: dict | None = None) -> None:
    """The backbone (`save_pretrained` + tokenizer) and the branches next to it, written into `folder`."""
    write_model(model.backbone, tokenizer, nn.ModuleDict(), folder, result=result, label_names=label_names,
                head_config=head_config)
    save_file({k: v.contiguous() for k, v in model.branches.state_dict().items()}, str(folder / BRANCHES_FILE))
    info = {"format": _FORMAT, "branches": len(model.branches), "branch_width": model.branch_width,
            "branch_heads": model.branch_heads, "num_labels": model.num_labels,
            "exits_after_blocks": list(range(1, len(model.branches) + 2))}
    atomic_write_text(folder / CONFIG_FILE, json.dumps(info, indent=2) + "\n")


def save_fastbert(model: FastBert, tokenizer: Any, output: Path, **saved: Any) -> None:
    """`write_fastbert` into a sibling folder, swapped in as `output` once complete (never half a model)."""
    replace_folder(output, lambda folder: write_fastbert(model, tokenizer, folder, **saved))


def load_fastbert(path: str | Path, num_labels: int | None = None, *,
                  label_names: Sequence[str] | None = None) -> FastBert:
    """A folder `save_fastbert` wrote, as a FastBert (speed None); `num_labels` is checked if given."""
    folder = Path(path)
    try:
        info = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder / CONFIG_FILE} cannot be read ({e}); give a folder `kd distill` wrote with "
                         "distill.method: fastbert") from None
    if info.get("format") != _FORMAT:
        raise ModelError(f"{folder} holds FastBERT format {info.get('format')!r}, this version reads {_FORMAT}; "
                         "train it again with this version")
    backbone = load_classifier(str(folder), num_labels or info["num_labels"], label_names=label_names)
    model = FastBert(backbone, info["branch_width"], info["branch_heads"])
    if len(model.branches) != info["branches"]:
        raise ModelError(f"{folder}: {info['branches']} branches saved for a {num_layers(backbone)}-block backbone; "
                         "the folder is inconsistent, train it again")
    model.branches.load_state_dict(load_file(str(folder / BRANCHES_FILE)))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Self-distillation


class SelfDistillation:
    """fit()'s objective: KL(p_final || p_branch) at temperature 1 for every branch (one term each, summed)."""

    def __init__(self) -> None:
        self.modules = nn.ModuleDict()  # the branches are part of the model

    def start_epoch(self, id_batches: Sequence[Sequence[str]]) -> None:
        pass

    def losses(self, model: FastBert, batch: dict[str, Tensor], ids: Sequence[str], step: int,
               total_steps: int) -> dict[str, Tensor]:
        *branches, final = model.exit_logits(**model_inputs(batch))
        final = final.float()
        return {f"kl_exit{i + 1}": kd_loss(b.float(), final, 1.0, kind="kl", temperature_squared=False)
                for i, b in enumerate(branches)}

    def close(self) -> None:
        pass


def _batches(data: Encoded, batch_size: int, device: torch.device):
    order = np.argsort(data.lengths, kind="stable")  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch, _ = collate(data, rows)
        yield rows, {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def exit_scores(model: FastBert, data: Encoded, task: LabelledTask, batch_size: int, device: torch.device) -> dict[str, float]:
    """`kl`: mean over rows and branches of KL(p_final || p_branch); and each exit's metrics (`exit<i>_<name>`,
    exit i = after block i, the last one the backbone's head) when the rows are labelled."""
    was_training = model.training
    model.eval()
    kl_sum, n = 0.0, 0
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(len(model.branches) + 1)]
    for rows, batch in _batches(data, batch_size, device):
        exits = [x.float() for x in model.exit_logits(**model_inputs(batch))]
        logp_final = F.log_softmax(exits[-1], -1)
        for x in exits[:-1]:
            kl_sum += float((logp_final.exp() * (logp_final - F.log_softmax(x, -1))).sum())
        n += len(rows)
        for i, x in enumerate(exits):
            parts[i].append((rows, task.predictions(x, batch)))
    model.train(was_training)
    out = {"kl": kl_sum / max(1, n * len(model.branches))}
    if data.labels is not None:
        for i, p in enumerate(parts):
            for k, v in task.score(data, task.gather(p, len(data))).items():
                out[f"exit{i + 1}_{k}"] = v
    return out


@torch.no_grad()
def predict_exits(model: FastBert, data: Encoded, task: LabelledTask, batch_size: int,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive inference at `model.speed` over `data`: each row's prediction and the blocks it ran (row order)."""
    model.eval()
    preds, layers = [], []
    for rows, batch in _batches(data, batch_size, device):
        out = model(**model_inputs(batch))
        preds.append((rows, task.predictions(out.logits, batch)))
        layers.append((rows, out.layers.cpu().numpy()))
    return task.gather(preds, len(data)), task.gather(layers, len(data))


def speed_curve(model: FastBert, data: Encoded, task: LabelledTask, speeds: Sequence[float], batch_size: int,
                throughput: Callable[[nn.Module], float], device: torch.device) -> list[dict[str, float]]:
    """For each speed: the metrics, the average blocks run per example and `throughput(model)` (examples/s)."""
    keep = model.speed
    rows = []
    try:
        for s in speeds:
            model.speed = s
            preds, layers = predict_exits(model, data, task, batch_size, device)
            rows.append({"speed": s, **{k: round(v, 4) for k, v in task.score(data, preds).items()},
                         "average_layers": round(float(layers.mean()), 3),
                         "examples_per_second": round(throughput(model), 1)})
    finally:
        model.speed = keep
    return rows


def distill_fastbert(cfg: Config, *, on_step: Callable[[int], None] | None = None) -> FitResult:
    """`kd distill` with distill.method: fastbert: train the branches of `distill.fastbert.backbone` and save
    the FastBERT folder to distill.output (metrics to distill.metrics)."""
    d = cfg.distill
    # The branches learn from the backbone, never from labels: the transfer set is training data as well.
    run, (train_ex, dev_ex) = start_method(  # seeds the branches' initialisation
        cfg, lambda: (load_split(cfg, "train", transfer=True), load_split(cfg, "dev") if cfg.data.dev else None))
    output, device, task = run.output, run.device, labelled(get_task(cfg.data))
    name = d.fastbert.backbone or run.teachers[0]
    src = resolve_model(name)
    backbone = load_classifier(src, task.num_labels, auto_model=task.auto_model, label_names=task.label_names)
    tokenizer = load_tokenizer(src)
    model = FastBert(backbone, d.fastbert.branch_width, d.fastbert.branch_heads)
    train = task.encode(tokenizer, train_ex, d.max_length)
    dev = task.encode(tokenizer, dev_ex, d.max_length) if dev_ex is not None else None
    settings = {"method": "fastbert", "backbone": name, "backbone_fingerprint": teacher_fingerprint(src),
                "fastbert": config_to_dict(d.fastbert), **task.cache_settings()}
    saved = {"label_names": task.label_names, "head_config": task.head_config()}
    result = fit(model, SelfDistillation(), train, dev, d, output=output, log_dir=Path(d.log_dir), device=device,
                 desc="distill (fastbert)", on_step=on_step, run_settings=settings,
                 evaluate=lambda m, data: exit_scores(m, data, task, d.eval_batch_size, device),
                 write=lambda folder: write_fastbert(model, tokenizer, folder, **saved))
    save_fastbert(model, tokenizer, output, result=result, **saved)
    metrics = {"method": "fastbert", "backbone": name, **{f"dev_{k}": v for k, v in (result.dev or {}).items()},
               "steps": result.steps, "seconds": round(result.seconds, 2),
               "train_examples_per_second": round(result.examples_per_second, 1)}
    if dist.is_main():
        atomic_write_text(Path(d.metrics), json.dumps(metrics, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------------------------------------------
# The speed/accuracy curve of `kd evaluate`

CURVE_COLUMNS = ("model", "speed", "accuracy", "macro_f1", "average_layers", "examples_per_second")


def curve_rows(results: dict[str, dict], layers: dict[str, int]) -> list[dict[str, Any]]:
    """One row per FastBERT speed, and one per other model (its full depth `layers[name]`, no speed)."""
    rows = []
    for name, m in results.items():
        if "fastbert" in m:
            rows += [{"model": name, **r} for r in m["fastbert"]]
        else:
            rows.append({"model": name, "speed": "", "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
                         "average_layers": layers[name], "examples_per_second": m["examples_per_second"]})
    return rows


def write_curve(path: str | Path, rows: list[dict[str, Any]]) -> Path | None:
    """The curve as CSV at `path` (for `dvc plots`) and as a PNG next to it; returns the PNG's path, or None
    (with a note on stderr) when matplotlib is not installed."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    png = path.with_suffix(".png")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"note: {png} was not drawn: matplotlib is not installed (pip install matplotlib, or the project's "
              f"[demo] extra); {path} has the same numbers", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        for ax, x in zip(axes, ("examples_per_second", "average_layers")):
            xs, ys = [r[x] for r in mine], [r["accuracy"] for r in mine]
            line = ax.plot(xs, ys, marker="o", label=name, linestyle="-" if len(mine) > 1 else "none")[0]
            for r in mine:
                if r["speed"] != "":
                    ax.annotate(f"{r['speed']:g}", (r[x], r["accuracy"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=line.get_color())
    axes[0].set_xscale("log")
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
    axes[0].set_xlabel("inference examples/s")
    axes[1].set_xlabel("average blocks run per example")
    for ax in axes:
        ax.set_ylabel("accuracy")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("FastBERT speed/accuracy (labels: speed)")
    fig.tight_layout()
    with atomic_file(png) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return png
