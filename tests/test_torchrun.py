"""`kd precompute` and `kd distill` as 2 torchrun processes on CPU (gloo), against the same runs in 1 process.

Each torchrun launch costs ~10 s (two processes importing torch and transformers), so the tests share one
1-process baseline and kill ranks with tests/torchrun_fault.py instead of racing them with signals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import cache_format as cf
from stages.train import dist
from stages.distill import distill
from stages.precompute import precompute
from stages.train import rank_share
from stages.config import config_from_dict
from tests.tiny_models import make_tiny_classifier
from tests.helpers import stage_params

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, cwd: Path, fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """`kd ARGS` as 2 torchrun processes (with `fault`: rank 1 killed, see tests/torchrun_fault.py)."""
    entry = [str(ROOT / "tests" / "torchrun_fault.py"), fault[0], str(fault[1])] if fault else ["-m", "pipeline.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KD_PROGRESS": "0",
           dist.TIMEOUT_ENV: "60"}  # a hung rank fails the test in a minute
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *entry, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_data_dir, tiny_texts) -> dict:
    """A dropout-free tiny teacher (so 1 and 2 processes compute the same), params, and the 1-process runs."""
    tmp = tmp_path_factory.mktemp("torchrun")
    teacher = make_tiny_classifier(tmp / "teacher", layers=2, hidden=32, heads=2, intermediate=64,
                                   vocab_texts=[t for t, _ in tiny_texts], seed=1)
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (teacher / "config.json").write_text(json.dumps(config))
    files = {"train": str(tiny_data_dir / "train.csv"), "dev": str(tiny_data_dir / "dev.csv")}
    # batch_size 7 over 200 rows: shares of 4 and 3 rows, and a last batch of 4; grad_accum 2: no_sync steps.
    params = stage_params(tmp, teacher, files, keep_layers=(0,),
                          precompute={"commit_examples": 16, "cache_root": str(tmp / "c1")},
                          distill={"batch_size": 7, "grad_accum": 2, "checkpoint_every": 2, "output": str(tmp / "s1"),
                                   "metrics": str(tmp / "s1.json")})
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = config_from_dict(params)
    [cache] = precompute(cfg)
    distill(cfg)
    return {"tmp": tmp, "cache": cache.path, "student": tmp / "s1"}


def _same_cache(a: Path, b: Path, exact: bool = True) -> None:
    """Same identity, ids and values; `exact=False` allows float32 rounding (1e-6): a resumed rank batches its
    remaining rows differently, and a row's logits in another batch can differ in the last bits (seen: 2e-9)."""
    ra, rb = cf.CacheReader(a), cf.CacheReader(b)
    ma, mb = ra.manifest, rb.manifest
    assert (ma.teacher_fingerprint, ma.data_fingerprint, ma.settings, ma.fields, ma.count) == \
           (mb.teacher_fingerprint, mb.data_fingerprint, mb.settings, mb.fields, mb.count)
    assert sorted(ra.ids) == sorted(rb.ids)
    for i in ra.ids:
        x, y = ra.get(i), rb.get(i)
        same = np.array_equal if exact else (lambda u, v: np.allclose(u, v, rtol=1e-6, atol=1e-6))
        assert x.keys() == y.keys() and all(same(x[k], y[k]) for k in x), i
    assert cf.verify_cache(b).ok, cf.verify_cache(b).problems


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_rank_share_partitions_a_batch_and_weights_the_shares():
    rows = np.arange(7)
    shares = [rank_share(rows, r, 3) for r in range(3)]
    assert sorted(np.concatenate([s for s, _ in shares]).tolist()) == rows.tolist()
    assert [len(s) for s, _ in shares] == [3, 2, 2] and sum(w for _, w in shares) == pytest.approx(3)
    part, weight = rank_share(np.array([5]), 1, 2)  # a rank without rows recomputes one at weight 0
    assert part.tolist() == [5] and weight == 0.0
    assert rank_share(rows, 0, 1)[0].tolist() == rows.tolist() and rank_share(rows, 0, 1)[1] == 1.0


def test_two_process_distill_matches_one_process(setup):
    tmp = setup["tmp"]
    run = _torchrun("distill", "--params", "params.yaml", "--set", f"distill.output={tmp / 's2'}",
                    "--set", f"distill.metrics={tmp / 's2.json'}", "--set", f"distill.log_dir={tmp / 'live2'}", cwd=tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _max_diff(setup["student"], tmp / "s2") < 1e-5
    one, two = json.loads((tmp / "s1.json").read_text()), json.loads((tmp / "s2.json").read_text())
    assert one["steps"] == two["steps"] == 15  # ceil(ceil(200 / 7) / 2): the same optimizer steps
    assert one["dev_accuracy"] == two["dev_accuracy"]
    assert not (tmp / "s2" / "checkpoint").exists() and (tmp / "live2" / "metrics.json").exists()


def test_killed_rank_resumes_with_another_number_of_processes(setup):
    tmp = setup["tmp"]
    out = ["--set", f"distill.output={tmp / 's3'}", "--set", f"distill.metrics={tmp / 's3.json'}"]
    run = _torchrun("distill", "--params", "params.yaml", *out, cwd=tmp, fault=("step", 5))
    assert run.returncode != 0
    ckpt = torch.load(tmp / "s3" / "checkpoint" / "state.pt", weights_only=False)
    assert ckpt["step"] == 4 and not (tmp / "s3" / "model.safetensors").exists()
    # The stream position is global, so 1 process continues where the 2 stopped.
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["distill"].update(output=str(tmp / "s3"), metrics=str(tmp / "s3.json"), resume=True)
    distill(config_from_dict(params))
    assert _max_diff(setup["student"], tmp / "s3") < 1e-5


def test_precompute_killed_rank_refused_with_one_process_resumed_with_two(setup):
    tmp = setup["tmp"]
    root = ["--set", f"precompute.cache_root={tmp / 'c2'}"]
    run = _torchrun("precompute", "--params", "params.yaml", *root, cwd=tmp, fault=("commit", 1))
    assert run.returncode != 0
    folder = tmp / "c2" / setup["cache"].name  # the folder 1 process writes
    assert folder.is_dir() and not (folder / "manifest.json").exists()
    kept = (folder / "shard-w2r1-000000.json").read_text()  # rank 1's one committed shard

    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["precompute"]["cache_root"] = str(tmp / "c2")
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(dist.DistError, match="started by 2 process.*this run has 1"):
        precompute(config_from_dict(params))
    assert sorted(p.name for p in folder.iterdir()) == before  # refused before writing anything

    committed = sum(json.loads(p.read_text())["count"] for p in folder.glob("shard-*.json"))
    run = _torchrun("precompute", "--params", "params.yaml", *root, cwd=tmp)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed" in run.stdout
    # the job's rows (both processes), not rank 0's share
    assert f"{cf.CacheReader(folder).manifest.count - committed} written" in run.stdout, run.stdout
    assert (folder / "shard-w2r1-000000.json").read_text() == kept
    _same_cache(setup["cache"], folder, exact=False)


def test_ranks_with_different_settings_are_refused(setup):
    tmp = setup["tmp"]
    run = _torchrun("precompute", "--params", "params.yaml", "--set", f"precompute.cache_root={tmp / 'c3'}",
                    cwd=tmp, fault=("set", 16))  # rank 1 runs with precompute.max_length=16
    assert run.returncode != 0
    assert "the torchrun ranks disagree on the cache of teacher" in run.stderr
    assert not any((tmp / "c3").glob("*/manifest.json"))
