"""Your own data end to end: a CSV with string labels and quoted multi-line texts -> `kd init` -> `dvc repro` ->
`kd report`, in a fresh git + DVC repository with the project's dvc.yaml, on a tiny random teacher (no downloads).
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import pytest
import yaml

from tests.test_dvc import project_repo
from tests.tiny_models import make_tiny_classifier

pytestmark = pytest.mark.timeout(600)

TOPICS = {
    "world": ["election", "minister", "border", "treaty", "summit"],
    "business": ["market", "shares", "profit", "bank", "merger"],
    "sports": ["match", "goal", "team", "coach", "league"],
}
FILLER = ["the", "a", "of", "in", "was", "is", "said", "on", "new", "report", "after", "today"]


def topic_rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(headline, body, topic) rows; bodies span two lines and hold commas and double quotes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = list(TOPICS)[i % len(TOPICS)]  # file order world, business, sports: not sorted
        words = rng.sample(FILLER, 4) + rng.sample(TOPICS[topic], 3)
        rng.shuffle(words)
        body = f'{" ".join(words[:3])}, "quoted" part.\n{" ".join(words[3:])} number {i}.'
        rows.append((f"Headline {i}", body, topic))
    return rows


def write_topics(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["headline", "body", "topic"])
        writer.writerows(rows)
    return path


def _shrink(params: Path) -> None:
    """Tiny sizes and one epoch, so the whole pipeline runs in seconds (the comments of kd init are lost)."""
    p = yaml.safe_load(params.read_text())
    small = {"max_length": 32, "batch_size": 16}
    p["prepare"]["transfer_examples"] = 40
    p["train_teacher"].update(epochs=1, lr=1e-3, **small)
    p["precompute"].update(**small)
    p["distill"].update(epochs=1, lr=1e-3, **small)
    p["distill"]["student"].update(num_layers=1, hidden_size=32, intermediate_size=64, num_heads=2)
    p["evaluate"].update(throughput_batches=2, **small)
    params.write_text(yaml.safe_dump(p, sort_keys=False))


def test_kd_init_dvc_repro_kd_report_on_a_topic_csv(tmp_path_factory: pytest.TempPathFactory):
    repo, home = project_repo(tmp_path_factory, "own")
    root = repo.root
    rows = topic_rows(150)
    write_topics(root / "topics.csv", rows)
    vocab = [body for _, body, _ in rows]
    teacher = make_tiny_classifier(home / "teacher", layers=2, hidden=32, heads=2, intermediate=64,
                                   vocab_texts=vocab, seed=1)

    timings = {}
    t0 = time.perf_counter()
    out = repo.run("kd", "init", "topics.csv", "--teacher", str(teacher)).stdout
    timings["init"] = time.perf_counter() - t0
    assert "3 labels (business, sports, world)" in out, out
    assert "split by kd prepare: train 120, dev 15, test 15" in out, out
    assert "dvc repro" in out and "kd report" in out, out
    written = (root / "params.yaml").read_text()
    params = yaml.safe_load(written)
    assert "imdb" not in json.dumps(params) and params["prepare"]["transfer_source"] == "bundled:ptb_sentences"
    assert params["data"]["label_names"] == ["business", "sports", "world"]
    assert params["data"]["id_field"] is None and params["data"]["text_field"] == "body"
    assert params["prepare"]["source"] == "topics.csv"
    _shrink(root / "params.yaml")
    repo.run("git", "add", ".")
    repo.run("git", "commit", "-q", "-m", "kd init")

    t0 = time.perf_counter()
    repro = repo.dvc("repro", timeout=600)
    timings["dvc repro"] = time.perf_counter() - t0
    for stage in ("prepare", "train_teacher", "precompute", "distill", "baseline", "evaluate"):
        assert f"Running stage '{stage}'" in repro, repro
    t0 = time.perf_counter()
    report = repo.run("kd", "report").stdout
    timings["kd report"] = time.perf_counter() - t0
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})

    assert "| teacher |" in report and "| student |" in report and "(reference)" in report, report
    assert "Paired on the same 15 examples" in report, report
    # The student's transfer set: Penn Treebank sentences, none of them a labelled text.
    with open(root / "data" / "transfer.csv", newline="") as f:
        transfer = [r["body"] for r in csv.DictReader(f)]
    assert len(transfer) == 40 and not set(transfer) & {body for _, body, _ in rows}
    # The quoted two-line texts came through the split intact.
    with open(root / "data" / "test.csv", newline="") as f:
        test = list(csv.DictReader(f))
    assert all("\n" in r["body"] and '"quoted"' in r["body"] for r in test)
    check = json.loads((root / "data" / "check.json").read_text())
    assert check["files"]["data.transfer"]["examples"] == 40
    teacher_config = json.loads((root / "models" / "teacher" / "config.json").read_text())
    assert [teacher_config["id2label"][str(i)] for i in range(3)] == ["business", "sports", "world"]
