"""`kd cache probe` (stages/teacher/probe.py): the top-k tail mass and KL gap against numpy on the same teacher
distributions, k = V loses nothing, the sampled codec's spread against its closed form, the recommendation, the
CLI, and the tail a real top-k cache records against the probe's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from cache_format import CacheReader
from pipeline.cli import cli
from stages.config import ConfigError, config_from_dict
from stages.precompute import precompute
from stages.tasks import get_task, load_split
from stages.models import load_causal_lm, load_tokenizer
from stages.teacher import PROBE_KS, lm_cache_info, probe_codecs, recommend
from tests.tiny_models import make_tiny_causal_lm

L = 32
_DOCS = [f"the cat number {i} sat on the mat and the dog barked at it while {i % 7} birds sang ." for i in range(60)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    (root / "train.txt").write_text("\n".join(_DOCS) + "\n")
    make_tiny_causal_lm(root / "teacher", texts=_DOCS, vocab_size=300)
    return root


def _params(root: Path, **lm) -> dict:
    return {"data": {"task": "causal_lm", "train": str(root / "train.txt"), "dev": None, "test": None},
            "precompute": {"teachers": [str(root / "teacher")], "cache_root": str(root / "caches"), "max_length": L,
                           "batch_size": 4, "device": "cpu", "lm": lm or {"codec": "topk", "k": 8}},
            "distill": {"max_length": L}}


def _teacher_logp(root: Path, blocks: int, temperature: float) -> tuple[np.ndarray, int]:
    """float64 log p [tokens, V] of the blocks the probe picks (evenly spread), from the model's own forward."""
    cfg = config_from_dict(_params(root))
    task = get_task(cfg.data)
    enc = task.encode(load_tokenizer(str(root / "teacher")), load_split(cfg, "train"), L)
    rows = np.unique(np.linspace(0, len(enc.ids) - 1, num=min(blocks, len(enc.ids))).round().astype(int))
    model = load_causal_lm(str(root / "teacher")).eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor(enc.input_ids[enc.offsets[r]: enc.offsets[r + 1]],
                                                         dtype=torch.long)[None]).logits[0] for r in rows])
    z = logits.double().numpy() / temperature
    z -= z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True)), len(rows)


def _tail_and_gap(logp: np.ndarray, k: int) -> tuple[float, float]:
    """Mean tail mass outside the top k and mean KL(p || top k + the rest spread evenly), straight from the sort."""
    v = logp.shape[1]
    p = np.exp(np.sort(logp, axis=1)[:, ::-1])
    head, rest = p[:, :k], p[:, k:]
    tail = rest.sum(1)
    if k == v:
        return float(tail.mean()), 0.0
    recon = np.concatenate([head, np.repeat(tail[:, None] / (v - k), v - k, axis=1)], axis=1)
    return float(tail.mean()), float((p * (np.log(p) - np.log(recon))).sum(1).mean())


@pytest.mark.parametrize("temperature", [1.0, 0.25])  # the random teacher is flat at 1: 0.25 makes it peaked
def test_topk_tail_and_kl_gap_match_numpy_and_k_equal_v_loses_nothing(root, temperature):
    cfg = config_from_dict(_params(root, codec="topk", k=8, temperature=temperature))
    vocab = load_causal_lm(str(root / "teacher")).config.vocab_size
    res = probe_codecs(cfg, blocks=3, ks=[1, 4, 32, vocab], samples=[4], draws=2, progress=False)
    logp, blocks = _teacher_logp(root, 3, temperature)
    assert (res["vocab_size"], res["blocks"], res["tokens"], res["temperature"]) == (vocab, blocks, blocks * L,
                                                                                     temperature)
    assert [r["k"] for r in res["topk"]] == [1, 4, 32, vocab]
    for row in res["topk"]:
        tail, gap = _tail_and_gap(logp, row["k"])
        assert row["tail_mass"] == pytest.approx(tail, rel=1e-5, abs=1e-9), row
        assert row["kl_gap"] == pytest.approx(gap, rel=1e-5, abs=1e-9), row
    full = res["topk"][-1]
    assert full["tail_mass"] == 0.0 and full["kl_gap"] == 0.0
    tails, gaps = [r["tail_mass"] for r in res["topk"]], [r["kl_gap"] for r in res["topk"]]
    assert tails == sorted(tails, reverse=True) and gaps == sorted(gaps, reverse=True) and gaps[0] > 1e-3
    # ids uint16 (2 B) + float16 log-probabilities (2 B) per kept id + the float32 tail log-mass
    assert [r["bytes_per_token"] for r in res["topk"]] == [4 * k + 4 for k in (1, 4, 32, vocab)]


def test_sampled_spread_matches_its_closed_form(root):
    """With proposal temperature 1 the estimate is the mean of f = log p - log s over n draws from p, so its
    per-token variance is (E_p[f^2] - KL^2) / n; the probe's spread over seeded draws through the codec and the
    loss must agree with that, and its mean with the exact KL (the estimate is unbiased)."""
    cfg = config_from_dict(_params(root, codec="sampled", samples=8))
    res = probe_codecs(cfg, blocks=6, ks=[4], samples=[2, 8, 32], draws=12, progress=False)
    logp, _ = _teacher_logp(root, 6, 1.0)
    log_s = logp / 2 - np.log(np.exp(logp / 2).sum(1, keepdims=True))
    p, f = np.exp(logp), logp - log_s
    kl = (p * f).sum(1)
    assert res["reference_kl"] == pytest.approx(kl.mean(), rel=1e-6)
    for row in res["sampled"]:
        n = row["samples"]
        closed = math.sqrt(((p * f**2).sum(1) - kl**2).mean() / n) / kl.mean()
        assert row["rel_std"] == pytest.approx(closed, rel=0.15), row
        se = closed * kl.mean() / math.sqrt(res["tokens"] * res["draws"])
        assert abs(row["mean_estimate"] - kl.mean()) < 6 * se, row
        assert 1 <= row["distinct_ids"] <= n and 0 < row["tail_mass"] < 1
        # uint16 ids (2 B), uint8 counts (1 B) and float16 log-probabilities (2 B) per slot + the float32 normaliser
        assert row["bytes_per_token"] == 5 * n + 4
    spreads = [r["rel_std"] for r in res["sampled"]]
    assert spreads == sorted(spreads, reverse=True)


def test_recommendation_is_the_best_candidate_within_the_budget():
    result = {"topk": [{"k": k, "bytes_per_token": 4 * k + 4} for k in (4, 8, 16, 32)],
              "sampled": [{"samples": n, "bytes_per_token": 5 * n + 4, "rel_std": 1 / math.sqrt(n)}
                          for n in (4, 8, 16)]}
    assert recommend(result, 68) == {"budget": 68, "k": 16, "samples": 8}
    assert recommend(result, 132) == {"budget": 132, "k": 32, "samples": 16}
    assert recommend(result, 10) == {"budget": 10, "k": None, "samples": None}


def test_default_candidates_budget_and_bad_settings(root):
    cfg = config_from_dict(_params(root, codec="topk", k=16))
    res = probe_codecs(cfg, blocks=1, samples=[4], draws=2, progress=False)
    assert [r["k"] for r in res["topk"]] == [k for k in PROBE_KS if k <= 300]
    assert res["budget"] == 4 * 16 + 4 and res["recommended"]["k"] == 16  # the configured k's top-k cache
    with pytest.raises(ConfigError, match=r"probe k must be in \[1, 300\] .*got \[301\]"):
        probe_codecs(cfg, blocks=1, ks=[8, 301], samples=[4], progress=False)
    with pytest.raises(ConfigError, match=r"probe samples must be in \[1, 255\]"):
        probe_codecs(cfg, blocks=1, ks=[8], samples=[0], progress=False)
    other = config_from_dict({"data": {"task": "sequence_classification", "train": str(root / "train.txt")}})
    with pytest.raises(ConfigError, match="data.task is sequence_classification, set data.task: causal_lm"):
        probe_codecs(other)


def test_cli_prints_the_tables_and_the_json(root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_params(root, codec="topk", k=8)))
    args = ["cache", "probe", "--params", str(params), "--blocks", "2", "--k", "4,8,300", "--samples", "4,8",
            "--draws", "2", "--budget", "40"]
    res = CliRunner().invoke(cli, args, env={"KD_PROGRESS": "0"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()  # stderr: the blocks message of the encoding
    assert lines[0].startswith("teacher ") and "vocabulary 300" in lines[0] and f"{2 * L} tokens" in lines[0]
    assert any(line.split()[:2] == ["300", str(4 * 300 + 4)] and line.split()[2:] == ["0.00000", "0.00000"]
               for line in lines)
    assert lines[-1].startswith("within 40 B/token") and lines[-1].endswith("k 8, samples 4")
    data = json.loads(CliRunner().invoke(cli, [*args, "--json"], env={"KD_PROGRESS": "0"}).stdout)
    assert [r["k"] for r in data["topk"]] == [4, 8, 300] and data["recommended"] == {"budget": 40.0, "k": 8,
                                                                                      "samples": 4}
    bad = CliRunner().invoke(cli, [*args[:4], "--k", "4,x"])
    assert bad.exit_code == 2 and "not a comma-separated list" in bad.output


def test_a_real_topk_cache_records_the_tail_the_probe_measures(root):
    """The tail a top-k cache stores (`kd cache info --deep`) is the probe's over the same tokens (every block)."""
    cfg = config_from_dict(_params(root, codec="topk", k=8, temperature=1.5))
    (done,) = precompute(cfg)
    info = lm_cache_info(done.path, deep=True)
    res = probe_codecs(cfg, blocks=10_000, ks=[8], samples=[4], draws=2, progress=False)
    assert info["tokens"] == res["tokens"] == len(CacheReader(done.path).ids) * L
    assert info["temperature"] == 1.5 and info["k"] == 8
    assert info["tail_mass"] == pytest.approx(res["topk"][0]["tail_mass"], rel=1e-4)
