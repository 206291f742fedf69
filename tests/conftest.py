"""Shared fixtures: an offline, sandboxed environment and tiny data and models (no downloads)."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub are imported: they read these once at import time.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

_POSITIVE = ["great", "wonderful", "superb", "delightful", "moving", "brilliant", "charming", "funny"]
_NEGATIVE = ["dull", "boring", "awful", "tedious", "weak", "messy", "bland", "clumsy"]
_NEUTRAL = ["the", "film", "movie", "plot", "acting", "story", "was", "is", "quite", "really", "a", "with", "and",
            "ending", "cast", "script", "director", "scenes", "music", "overall"]


def _user_cache_listing() -> dict[str, float]:
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kd-pipeline"
    return {str(p): p.stat().st_mtime for p in home.rglob("*")} if home.is_dir() else {}


@pytest.fixture(scope="session")
def _kd_home(tmp_path_factory: pytest.TempPathFactory):
    """One kd cache home for the session (converted models and downloaded archives are reused across tests);
    at the end, the user's own kd cache folder must be as it was."""
    before = _user_cache_listing()
    yield tmp_path_factory.mktemp("kd_home")
    after = _user_cache_listing()
    assert after == before, f"tests wrote into the user's kd cache folder: {sorted(set(after) ^ set(before))[:5]}"


@pytest.fixture(autouse=True)
def _offline_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _kd_home: Path) -> None:
    """Keep every test off the network and out of the user's home and cache folders."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("KD_CACHE_HOME", str(_kd_home))  # teacher memos, converted models, downloaded archives
    monkeypatch.delenv("KD_DATA_HOME", raising=False)


@pytest.fixture(scope="session")
def tiny_texts() -> list[tuple[str, int]]:
    """300 distinct short (text, label) pairs; label 1 sentences hold positive words, label 0 negative ones."""
    rng = random.Random(0)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    while len(out) < 300:
        label = len(out) % 2
        sentiment = _POSITIVE if label else _NEGATIVE
        words = rng.sample(_NEUTRAL, rng.randint(3, 7)) + rng.sample(sentiment, rng.randint(1, 2))
        rng.shuffle(words)
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[tuple[str, int]]) -> Path:
    """Folder with train.csv (200 rows), dev.csv (50) and test.csv (50), columns id,text,label."""
    root = tmp_path_factory.mktemp("tiny_data")
    splits = {"train": tiny_texts[:200], "dev": tiny_texts[200:250], "test": tiny_texts[250:]}
    start = 0
    for name, rows in splits.items():
        with open(root / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "text", "label"])
            writer.writerows((f"ex{start + i:04d}", text, label) for i, (text, label) in enumerate(rows))
        start += len(rows)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[tuple[str, int]]) -> Path:
    """A saved tiny random BERT classifier (2 layers, hidden 32) with a tokenizer covering tiny_texts."""
    from tests.tiny_models import make_tiny_classifier

    texts = [t for t, _ in tiny_texts]
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny_model"), layers=2, hidden=32, heads=2,
                                intermediate=64, vocab_texts=texts, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[tuple[str, int]]) -> Path:
    """A saved tiny random BERT teacher (4 layers, hidden 64), same tokenizer as tiny_model_dir."""
    from tests.tiny_models import make_tiny_classifier

    texts = [t for t, _ in tiny_texts]
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny_teacher"), layers=4, hidden=64, heads=4,
                                intermediate=128, vocab_texts=texts, seed=1)
