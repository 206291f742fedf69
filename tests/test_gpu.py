"""The CUDA-only paths (opt in: `pytest -m gpu tests/test_gpu.py`; skipped without CUDA).

Autocast (bf16, fp16) in the training loop, the fp16 gradient scaler, the pinned host copies of
cached teacher outputs, and FastBERT's early exit on the device. Tiny random models from conftest; a few
seconds on any CUDA GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cache_format as cf
from stages.distill import distill
from stages.precompute import precompute
from stages.train.loop import _autocast
from stages.config import config_from_dict
from stages.methods import FastBert, normalized_entropy
from stages.models import load_classifier, load_tokenizer, student_from_teacher
from stages.teacher import CachedTeachers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def _params(tmp: Path, data: Path, teacher: Path, mixed_precision: str = "auto") -> dict:
    return {
        "data": {"train": str(data / "train.csv"), "dev": str(data / "dev.csv"), "test": None},
        "precompute": {"teachers": [str(teacher)], "cache_root": str(tmp / "caches"), "batch_size": 32,
                       "max_length": 32, "hidden_layers": [2]},
        "distill": {"student": {"from_teacher": str(teacher), "keep_layers": [0, 3]}, "epochs": 1,
                    "batch_size": 16, "max_length": 32, "lr": 1e-3, "mixed_precision": mixed_precision,
                    "kd": {"hard_weight": 1.0},
                    "output": str(tmp / "student"), "log_dir": str(tmp / "live"), "metrics": str(tmp / "m.json")},
    }


def _half(mode: str) -> torch.dtype:
    """The dtype `_autocast` picks for `mode` on this GPU (bf16 falls back to fp16 where unsupported)."""
    return torch.bfloat16 if mode == "bf16" and torch.cuda.is_bf16_supported() else torch.float16


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_autocast_picks_the_dtype_and_a_scaler_only_for_fp16(mode):
    autocast, scaler = _autocast(CUDA, mode)
    assert autocast.device == "cuda" and autocast.fast_dtype == _half(mode)
    with autocast:
        assert torch.is_autocast_enabled("cuda")
    if _half(mode) == torch.float16:
        assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    else:
        assert scaler is None  # bf16 has fp32's range: nothing to scale


def test_no_mixed_precision_runs_fp32():
    autocast, scaler = _autocast(CUDA, "no")
    with autocast:
        assert not torch.is_autocast_enabled("cuda")
    assert scaler is None


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_distill_trains_under_autocast_and_saves_float32(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch,
                                                         mode):
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir, mode))
    precompute(cfg)

    # What the student's Linear layers output in training (eval runs outside autocast, in fp32).
    seen: set[torch.dtype] = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.add(out.dtype) if isinstance(m, torch.nn.Linear) and m.training else None)
    scale_steps: list[float] = []
    step = torch.amp.GradScaler.step

    def counting_step(self, optimizer, *args, **kwargs):
        scale_steps.append(self.get_scale())
        return step(self, optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", counting_step)
    try:
        result = distill(cfg)
    finally:
        hook.remove()

    assert seen == {_half(mode)}
    if _half(mode) == torch.float16:
        # One scaler step per optimizer step; the scale stays a finite power of two (it halves on overflow).
        assert len(scale_steps) == result.fit.steps > 0
        assert all(math.isfinite(s) and s > 0 and math.log2(s).is_integer() for s in scale_steps)
    else:
        assert scale_steps == []
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert math.isfinite(summary["train"]["loss"]["total"]) and summary["train"]["loss"]["total"] > 0

    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in saved.values())
    initial = student_from_teacher(load_classifier(str(tiny_teacher_dir), 2), [0, 3]).state_dict()
    changed = [k for k, t in saved.items() if k in initial and not torch.equal(t, initial[k])]
    assert len(changed) > len(saved) // 2  # it trained: most weights moved from the teacher's


def test_cached_teachers_pin_host_memory_and_copy_to_cuda(tmp_path, tiny_data_dir, tiny_teacher_dir, monkeypatch):
    cfg = config_from_dict(_params(tmp_path, tiny_data_dir, tiny_teacher_dir))
    [res] = precompute(cfg)
    reader = cf.CacheReader(res.path)
    fields = ["logits", "hidden.2"]
    batches = [reader.ids[:16], reader.ids[16:40]]

    pinned: list[torch.Tensor] = []
    pin = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        out = pin(self, *args, **kwargs)
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    source = CachedTeachers([reader], fields, CUDA, prefetch=2)
    source.start(batches)
    try:
        for ids in batches:
            want = reader.gather_torch(ids, fields)  # padded to the batch's longest example
            [got] = source.next(int(want["length"].max()))
            for f in fields:
                assert got[f].device.type == "cuda"
                assert got[f].dtype == want[f].dtype and torch.equal(got[f].cpu(), want[f]), f
            assert torch.equal(torch.as_tensor(got["length"]), torch.as_tensor(want["length"]))
    finally:
        source.close()
    assert len(pinned) == len(batches) * len(fields)  # every field of every batch went through pinned memory
    assert all(t.is_pinned() for t in pinned)


FASTBERT_TEXTS = ["the film was great and the cast superb", "dull", "boring plot",
                  "a wonderful movie with charming music",
                  "the acting was weak and the script messy and the ending bland", "funny"]


def test_fastbert_leaving_rows_skip_the_later_blocks_on_cuda(tiny_teacher_dir):
    """As tests/test_fastbert.py checks on the CPU: each block runs on exactly the rows that have not left."""
    torch.manual_seed(0)  # the branches are initialised on the CPU, so their weights are the CPU test's
    model = FastBert(load_classifier(str(tiny_teacher_dir), 2))
    with torch.no_grad():  # a sharper first exit: the untrained branch's entropies, all near 1, spread out
        model.branches[0].out.weight.mul_(30.0)
        model.branches[0].out.bias.mul_(30.0)
    model.to(CUDA)
    enc = load_tokenizer(str(tiny_teacher_dir))(FASTBERT_TEXTS, padding=True, return_tensors="pt")
    inputs = {k: v.to(CUDA) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    n = len(FASTBERT_TEXTS)
    exits = model.exit_logits(**inputs)
    first = normalized_entropy(exits[0])
    # The speed halfway between the 3rd and 4th lowest first-exit entropies: 3 rows leave after block 1, with a
    # margin (checked) far above the rounding differences between the full backbone and the block-by-block run.
    low, high = first.sort().values[2:4].tolist()
    assert high - low > 1e-2, (low, high)
    model.speed = (low + high) / 2
    rows_run: list[int] = []
    hooks = [b.register_forward_hook(lambda m, args, out: rows_run.append(args[0].shape[0])) for b in model.blocks]
    try:
        out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    assert out.logits.device.type == "cuda" and out.layers.device.type == "cuda"
    layers, leave = out.layers.cpu(), (first <= model.speed).cpu()
    assert int(leave.sum()) == 3
    assert layers[leave].tolist() == [1] * 3
    torch.testing.assert_close(out.logits[leave.to(CUDA)], exits[0][leave.to(CUDA)], rtol=1e-4, atol=1e-4)
    # Block i ran on exactly the rows that had not left before it: fewer than the batch after block 1.
    assert rows_run[0] == n
    assert rows_run == [int((layers > i).sum()) for i in range(len(rows_run))]
    assert sum(rows_run) == int(layers.sum()) < len(model.blocks) * n
    # A row that stays gets what it would have got alone: the staying rows' exits are unchanged by the others.
    stay = (~leave).to(CUDA)
    again = model(**{k: v[stay] for k, v in inputs.items()})
    torch.testing.assert_close(again.logits, out.logits[stay], rtol=1e-4, atol=1e-4)
    assert again.layers.tolist() == out.layers[stay].tolist()
