"""The pipeline end to end through DVC, on tiny random models, in a fresh git repository.

One repository is built (and reproduced once) per module; the tests then run in file order
against it: a no-op second repro, sharing through a local-folder remote, two experiments that
must reuse the one teacher cache, and a precompute change that must not reuse it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cache_format import CacheReader
from stages.config import EvaluateConfig
from stages.models import TEACHER_MEMOS

PROJECT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("pipeline", "stages", "cache_format")
# The module fixture runs the whole pipeline (~2 min on 2 idle cores); allow for a loaded machine.
pytestmark = pytest.mark.timeout(1800)

STAGES = ("prepare", "augment", "train_teacher", "precompute", "distill", "baseline", "fastbert", "evaluate")


class Repo:
    """A git + DVC repository on disk and the environment its commands run in."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.first_repro = ""  # output of the fixture's `dvc repro`

    def run(self, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a command in the repository; on failure the assertion shows its whole output."""
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, _describe(proc)
        return proc

    def dvc(self, *args: str, timeout: float = 300) -> str:
        """Stdout + stderr of a successful `dvc` command."""
        proc = self.run("dvc", *args, timeout=timeout)
        return proc.stdout + proc.stderr


def _describe(proc: subprocess.CompletedProcess) -> str:
    return f"{' '.join(proc.args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def _env(root: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Bytecode is written as for any user: `__pycache__` inside the code folders must not count as a change.
    for key in ("KD_CACHE_ROOT", "PYTHONDONTWRITEBYTECODE"):
        env.pop(key, None)
    env.update({
        # `kd` and `dvc` live next to this interpreter; the repo's own code folders shadow the
        # editable install, so what DVC hashes as a dependency is what runs.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(root),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(home / "dvc_site"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(home / "hf_home"),
        "KD_PROGRESS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "2",
        "GIT_TERMINAL_PROMPT": "0",
    })
    return env


def _params(source: Path, transfer: Path, teacher: Path) -> dict:
    """The project's params.yaml, shrunk to tiny data, a tiny transfer set and a tiny teacher and student."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    small = {"max_length": 32, "batch_size": 16}
    params["prepare"].update(source=str(source), filter={}, transfer_source=str(transfer), transfer_examples=40)
    params["train_teacher"].update(model=str(teacher), epochs=1, lr=1e-3, **small)
    params["precompute"].update(**small)
    params["distill"].update(epochs=1, lr=1e-3, **small)
    params["distill"]["student"].update(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2)
    params["evaluate"].update(throughput_batches=2, **small)
    return params


def _init_git(repo: Repo) -> None:
    repo.run("git", "init", "-q", "-b", "main")
    repo.run("git", "config", "user.name", "kd test")
    repo.run("git", "config", "user.email", "kd-test@example.invalid")
    repo.run("git", "config", "commit.gpgsign", "false")


def _exp_show(repo: Repo) -> list[dict]:
    """Baseline and experiment rows of `dvc exp show --json`, each with name, deps, outs, params, metrics."""
    rows = []
    for commit in json.loads(repo.dvc("exp", "show", "--json", "--no-pager") or "[]"):
        rows.append(commit)
        for exp in commit.get("experiments") or []:
            rows.extend(exp.get("revs") or [])
    return [{"name": r.get("name") or r.get("rev"), **(r.get("data") or {})} for r in rows]


def _out_hash(row: dict, path: str) -> str:
    entry = (row.get("outs") or {}).get(path) or (row.get("deps") or {}).get(path)
    assert entry and entry.get("hash"), f"no hash for {path} in exp show row {row}"
    return entry["hash"]


def project_repo(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Repo, Path]:
    """A git repository holding the project's dvc.yaml, DVC config and code (a home folder beside it)."""
    home = tmp_path_factory.mktemp(f"{name}_home")
    root = tmp_path_factory.mktemp(f"{name}_repo")
    repo = Repo(root, _env(root, home))
    _init_git(repo)
    (root / ".dvc").mkdir()
    for file in ("dvc.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        shutil.copy(PROJECT / file, root / file)
    for folder in CODE_DIRS:
        shutil.copytree(PROJECT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return repo, home


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_texts, tiny_teacher_dir: Path) -> Repo:
    """A committed repository with the project's dvc.yaml, code and DVC config, on tiny inputs."""
    repo, home = project_repo(tmp_path_factory, "dvc")
    root = repo.root

    source = home / "reviews.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "label"])
        writer.writerows((f"r{i:04d}", text, label) for i, (text, label) in enumerate(tiny_texts[:240]))
    transfer = home / "unlabelled.csv"  # prepare cuts it into sentences for the teacher to label
    with open(transfer, "w", newline="") as f:
        csv.writer(f).writerows([["text"]] + [[text + "."] for text, _ in tiny_texts[240:]])
    (root / "params.yaml").write_text(yaml.safe_dump(_params(source, transfer, tiny_teacher_dir), sort_keys=False))

    repo.run("git", "add", ".")
    repo.run("git", "commit", "-q", "-m", "pipeline on tiny inputs")
    repo.first_repro = repo.dvc("repro", timeout=600)
    repo.run("git", "add", ".")
    repo.run("git", "commit", "-q", "-m", "dvc repro")
    return repo


def test_repro_runs_every_stage(repo: Repo):
    for stage in STAGES:
        assert f"Running stage '{stage}'" in repo.first_repro, repo.first_repro
    root = repo.root
    for folder in ("models/teacher", "models/student", "models/baseline", "models/fastbert"):
        assert (root / folder / "config.json").is_file(), folder
    assert (root / "models" / "fastbert" / "fastbert.json").is_file()
    caches = [p for p in (root / "caches").iterdir() if p.is_dir() and p.name != TEACHER_MEMOS]
    assert len(caches) == 1, caches
    # The teacher labelled the transfer set too: the cache holds train + transfer examples.
    train_rows = len((root / "data" / "train.csv").read_text().strip().splitlines()) - 1
    assert len(CacheReader(caches[0])) == train_rows + 40
    # cache.type hardlink,symlink: the teacher cache is linked from .dvc/cache, never copied.
    for f in (p for p in caches[0].iterdir() if p.is_file()):
        assert f.is_symlink() or f.stat().st_nlink > 1, f"{f} is a copy, not a link into .dvc/cache"
    results = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert {"teacher", "student", "baseline"} <= set(results)
    assert results["student"]["parameters"] < results["teacher"]["parameters"]
    assert results["student"]["parameters"] == results["baseline"]["parameters"]
    # The fastbert stage's model, evaluated at every speed of evaluate.fastbert_speeds, next to the others.
    assert [p["speed"] for p in results["fastbert"]["fastbert"]] == EvaluateConfig().fastbert_speeds
    curve = list(csv.DictReader(open(root / "metrics" / "fastbert_curve.csv")))
    assert {r["model"] for r in curve} == {"teacher", "student", "baseline", "fastbert"}
    # Metrics and plots are `cache: false`: git must track them, or clones and experiments lose them.
    tracked = repo.run("git", "ls-files", "metrics", "dvclive").stdout.split()
    for name in ("evaluate.json", "distill.json", "fastbert.json", "fastbert_curve.csv", "fastbert_curve.png"):
        assert f"metrics/{name}" in tracked, tracked


def test_second_repro_runs_nothing(repo: Repo):
    out = repo.dvc("repro", timeout=120)
    assert "Running stage" not in out, out
    status = repo.dvc("status")
    assert "up to date" in status, status
    # Teacher memos are per-machine state that any stage may rewrite: .dvcignore keeps them out of the outputs.
    [memo] = (repo.root / "caches" / TEACHER_MEMOS).glob("*.json")
    original = memo.read_text()
    memo.write_text(original.replace('"files"', '"stale"'))
    try:
        status = repo.dvc("status")
        assert "up to date" in status, status
    finally:
        memo.write_text(original)


def test_editing_the_cli_reruns_nothing(repo: Repo):
    # Stages depend on the modules they run, not on pipeline/ (the CLI): a help text edit is not a new teacher.
    cli = repo.root / "pipeline" / "cli.py"
    original = cli.read_text()
    cli.write_text(original + "\n# an edited help text\n")
    try:
        status = repo.dvc("status")
        assert "up to date" in status, status
    finally:
        cli.write_text(original)


def test_outputs_shared_through_a_remote_reproduce_nothing(repo: Repo, tmp_path: Path):
    remote = tmp_path / "remote"
    repo.dvc("remote", "add", "-d", "local", str(remote))
    repo.run("git", "commit", "-q", "-am", "local remote")
    repo.dvc("push")

    clone = Repo(tmp_path / "clone", _env(tmp_path / "clone", tmp_path))
    repo.run("git", "clone", "-q", str(repo.root), str(clone.root))
    assert not (clone.root / "models").exists()
    clone.dvc("pull")
    assert (clone.root / "models" / "student" / "config.json").is_file()
    status = clone.dvc("status")
    assert "up to date" in status, status
    out = clone.dvc("repro", timeout=120)
    assert "Running stage" not in out, out


def test_experiments_on_distill_settings_reuse_the_teacher_cache(repo: Repo):
    for temperature in ("2.0", "8.0"):
        name = f"t{temperature[0]}"
        out = repo.dvc("exp", "run", "-n", name, "-S", f"distill.kd.temperature={temperature}", timeout=300)
        assert "Running stage 'distill'" in out, out
        assert "Running stage 'precompute'" not in out and "Running stage 'train_teacher'" not in out, out
        assert "Running stage 'fastbert'" not in out, out  # it reads no KD setting

    rows = {r["name"]: r for r in _exp_show(repo)}
    assert {"t2", "t8"} <= set(rows), sorted(rows)
    t2, t8 = rows["t2"], rows["t8"]
    assert _out_hash(t2, "caches") == _out_hash(t8, "caches") == _out_hash(rows["main"], "caches")
    assert _out_hash(t2, "models/student") != _out_hash(t8, "models/student")
    for row in (t2, t8):
        metrics = row.get("metrics") or {}
        assert "metrics/distill.json" in metrics and "metrics/evaluate.json" in metrics, row
    assert t2["params"]["params.yaml"]["data"]["distill"]["kd"]["temperature"] == 2.0


def test_precompute_setting_reruns_precompute(repo: Repo):
    out = repo.dvc("exp", "run", "-n", "fp32", "-S", "precompute.dtype=float32", timeout=300)
    assert "Running stage 'precompute'" in out and "Running stage 'distill'" in out, out
    assert "Running stage 'train_teacher'" not in out, out
    rows = {r["name"]: r for r in _exp_show(repo)}
    assert _out_hash(rows["fp32"], "caches") != _out_hash(rows["main"], "caches")


def test_augmentation_turned_on_labels_the_views(repo: Repo):
    # Off by default (the repro above wrote an empty views file); on, with the views as the transfer set.
    # `+`: DVC (Hydra) adds a key the params file does not have yet only when told to.
    out = repo.dvc("exp", "run", "-n", "aug", "-S", "+augment.ops.mask.p=0.3", "-S", "+augment.ops.delete.p=0.2",
                   "-S", "data.transfer=augmented/views.csv", timeout=300)
    # (train_teacher runs too: its params are the whole data section, data.transfer included.)
    for stage in ("augment", "precompute", "distill"):
        assert f"Running stage '{stage}'" in out, out
    rows = {r["name"]: r for r in _exp_show(repo)}
    assert _out_hash(rows["aug"], "augmented") != _out_hash(rows["main"], "augmented")
    assert _out_hash(rows["aug"], "caches") != _out_hash(rows["main"], "caches")
