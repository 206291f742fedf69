"""Unlabelled transfer data: the teacher labels it once, distillation learns from it, labels-only runs skip it."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cache_format as cf
from stages.distill import distill
from stages.precompute import precompute
from stages.config import config_from_dict
from stages.data import IGNORE_LABEL, DataError, Examples, model_inputs, with_transfer
from stages.methods import DistillObjective
from stages.prepare import transfer_sentences
from tests.test_stages import _params


def test_with_transfer_marks_transfer_examples_unlabelled():
    train = Examples(ids=["a", "b"], texts=["x y", "z"], text_pairs=None, labels=np.array([0, 1]))
    extra = Examples(ids=["a"], texts=["w"], text_pairs=None, labels=None)
    both = with_transfer(train, extra)
    assert both.ids == ["a", "b", "transfer-a"]
    assert both.labels.tolist() == [0, 1, IGNORE_LABEL]
    paired = Examples(ids=["c"], texts=["q"], text_pairs=["r"], labels=None)
    with pytest.raises(DataError, match="text pair"):
        with_transfer(train, paired)


def test_transfer_sentences_are_seeded_distinct_and_exclude_labelled_text(tmp_path):
    src = tmp_path / "reviews.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "source"])
        for i in range(30):
            w.writerow([f"Review {i} was long enough to keep here. Short one.<br /><br />Another sentence number {i} "
                        "stays in the pool!", "imdb" if i % 3 else "other"])
    out_a = transfer_sentences(src, tmp_path / "a.csv", text_field="text", n=10, seed=1, filter={"source": "imdb"},
                               exclude=["Review 1 was long enough to keep here."])
    out_b = transfer_sentences(src, tmp_path / "b.csv", text_field="text", n=10, seed=1, filter={"source": "imdb"},
                               exclude=["Review 1 was long enough to keep here."])
    with open(out_a, newline="") as f:
        rows = list(csv.DictReader(f))
    assert out_a.read_text() == out_b.read_text()  # same seed, same file
    texts = [r["text"] for r in rows]
    assert len(texts) == len(set(texts)) == 10
    assert "Review 1 was long enough to keep here." not in texts
    assert all("<br" not in t and len(t.split()) >= 5 for t in texts)
    with pytest.raises(DataError, match="transfer_examples"):
        transfer_sentences(src, tmp_path / "c.csv", text_field="text", n=1000, seed=1)


def _record_batches(monkeypatch) -> list[dict]:
    """Every batch `DistillObjective.losses` sees: its ids, labels, the student's logits (from a forward with the
    same dropout masks as the objective's own) and the terms it returned."""
    seen: list[dict] = []
    real = DistillObjective.losses

    def losses(self, model, batch, ids, step, total_steps):
        rng = torch.get_rng_state()
        with torch.no_grad():
            logits = model(**model_inputs(batch)).logits.double()
        torch.set_rng_state(rng)  # the objective's forward draws the same dropout masks
        labels = batch["labels"].clone()
        terms = real(self, model, batch, ids, step, total_steps)
        seen.append({"ids": list(ids), "labels": labels, "logits": logits,
                     "terms": {k: v.item() for k, v in terms.items()}})
        return terms

    monkeypatch.setattr(DistillObjective, "losses", losses)
    return seen


def test_distill_learns_from_transfer_data_and_the_baseline_skips_it(tmp_path, tiny_data_dir, tiny_teacher_dir,
                                                                     tiny_texts, monkeypatch):
    transfer = tmp_path / "transfer.csv"
    with open(transfer, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([[t + " again"] for t, _ in tiny_texts[:64]])
    cfg = _params(tmp_path, tiny_data_dir, tiny_teacher_dir)
    cfg["data"]["transfer"] = str(transfer)
    [res] = precompute(config_from_dict(cfg))
    reader = cf.CacheReader(res.path)
    assert len(reader) == 200 + 64
    labels = reader.gather([i for i in reader.ids if i.startswith("transfer-")][:4], fields=["label"])["label"]
    assert labels.tolist() == [IGNORE_LABEL] * 4
    kd = config_from_dict(cfg).distill.kd
    assert (kd.loss, kd.weight, kd.hard_weight, kd.temperature, kd.temperature_squared) == ("kl", 1.0, 1.0, 4.0, True)
    gold = {f"ex{i:04d}": y for i, (_, y) in enumerate(tiny_texts[:200])}  # tiny_data_dir's train.csv

    batches = _record_batches(monkeypatch)
    assert distill(config_from_dict(cfg)).fit.steps == 17  # (200 + 64) / 16
    assert sorted(i for b in batches for i in b["ids"]) == sorted(reader.ids)  # every row, transfer rows too
    transfer_kl = 0.0
    for b in batches:
        transfer = torch.tensor([i.startswith("transfer-") for i in b["ids"]])
        assert b["labels"][transfer].tolist() == [IGNORE_LABEL] * int(transfer.sum())
        assert b["labels"][~transfer].tolist() == [gold[i] for i, t in zip(b["ids"], transfer) if not t]
        # The KD term: every row of the batch, transfer rows included (T^2 x KL at T 4, mean over rows).
        teacher = torch.tensor(reader.gather(b["ids"], fields=["logits"])["logits"], dtype=torch.float64)
        log_t = torch.log_softmax(teacher / 4.0, -1)
        kl = (log_t.exp() * (log_t - torch.log_softmax(b["logits"] / 4.0, -1))).sum(-1)
        assert b["terms"]["kd"] == pytest.approx(16.0 * kl.mean().item(), rel=1e-4, abs=1e-6)
        transfer_kl += kl[transfer].sum().item()
        # The hard term: the labelled rows only.
        if (~transfer).any():
            ce = F.cross_entropy(b["logits"][~transfer], b["labels"][~transfer]).item()
            assert b["terms"]["hard"] == pytest.approx(ce, rel=1e-5)
        else:
            assert b["terms"]["hard"] == 0.0
    assert transfer_kl > 0  # the transfer rows' teacher outputs reach the student
    cfg["distill"].update({"teacher_signal": "none", "kd": {"hard_weight": 1.0}})
    assert distill(config_from_dict(cfg)).fit.steps == 13  # labels only: the 200 labelled examples
