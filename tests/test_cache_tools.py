"""cache_info / verify_cache / list_caches, the `cache` CLI group, and the committed format-v1 fixture."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache_format import CacheReader, CacheWriter, FieldSpec, cache_info, list_caches, verify_cache
from pipeline.cache_cli import cache

FIXTURE = Path(__file__).parent / "fixtures" / "cache_v1"
V1_FIELDS = [
    FieldSpec("logits", "float16", ("T", 2)),
    FieldSpec("hidden.0", "bfloat16", (4,)),
    FieldSpec("input_ids", "int32", ("T",)),
    FieldSpec("label", "int64", ()),
    FieldSpec("topk_logprobs", "float16", ("T", 3)),
    FieldSpec("topk_ids", "int32", ("T", 3)),
    FieldSpec("logsumexp", "float32", ("T",)),
]


def _v1_example(i: int) -> tuple[int, dict[str, np.ndarray]]:
    """The values of fixture example i (kept in code so the test does not trust the files)."""
    n = i % 4  # lengths 0..3, zero included
    hidden = torch.arange(4, dtype=torch.float32).add(i / 8).to(torch.bfloat16)
    return n, {
        "logits": (np.arange(n * 2).reshape(n, 2) + i).astype(np.float16),
        "hidden.0": hidden.view(torch.int16).numpy().view(np.uint16),
        "input_ids": np.arange(n, dtype=np.int32) + 100 * i,
        "label": np.int64(i % 2),
        "topk_logprobs": -np.arange(n * 3, dtype=np.float16).reshape(n, 3) / 4,
        "topk_ids": np.arange(n * 3, dtype=np.int32).reshape(n, 3) * 7,
        "logsumexp": np.full(n, i, dtype=np.float32),
    }


def make_v1_fixture(path: Path) -> None:
    """Regenerate only for a new format version: `python tests/test_cache_tools.py OUT_DIR`."""
    with CacheWriter(path, V1_FIELDS, teacher_fingerprint="teacher-fp-v1", data_fingerprint="data-fp-v1",
                     settings={"max_length": 4, "layers": [0], "topk": 3}, shard_bytes=150) as w:
        for s in range(0, 6, 2):
            rows = [_v1_example(i) for i in (s, s + 1)]
            w.append([f"ex{s}", f"ex{s + 1}"], np.array([r[0] for r in rows]),
                     {f.name: [r[1][f.name] for r in rows] for f in V1_FIELDS})


def test_v1_fixture_still_reads_and_verifies():
    report = verify_cache(FIXTURE)
    assert report.ok, report.problems
    reader = CacheReader(FIXTURE, verify="open", expect_teacher="teacher-fp-v1",
                         expect_settings={"topk": 3})
    assert reader.manifest.format_version == 1 and len(reader.manifest.shards) > 1
    assert sorted(reader.ids) == [f"ex{i}" for i in range(6)]
    for i in range(6):
        n, values = _v1_example(i)
        got = reader.get(f"ex{i}")
        assert int(got["length"]) == n
        for name, want in values.items():
            np.testing.assert_array_equal(got[name], want)


@pytest.fixture
def cache_copy(tmp_path):
    dst = tmp_path / "caches" / "teacher-abc"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_cache_info(cache_copy):
    info = cache_info(cache_copy)
    assert info["count"] == 6 and info["format_version"] == 1
    assert info["teacher_fingerprint"] == "teacher-fp-v1" and info["settings"]["topk"] == 3
    fields = {f["name"]: f for f in info["fields"]}
    assert fields["hidden.0"]["dtype"] == "bfloat16" and fields["hidden.0"]["bytes_per_example"] == 8
    assert fields["logits"]["shape"] == ["T", 2]
    assert info["bytes_on_disk"] > sum(f["bytes"] for f in info["fields"])


def test_list_caches_finished_and_unfinished(cache_copy):
    root = cache_copy.parent
    w = CacheWriter(root / "other", [FieldSpec("x", "int8", ())], teacher_fingerprint="t2", data_fingerprint="d2",
                    settings={})
    w.append(["a"], np.zeros(1, int), {"x": [1]})
    w.close(finalize=False)
    found = list_caches(root)
    assert [(c["status"], c["teacher"], c["count"]) for c in found] == [
        ("unfinished", "t2", 1), ("finished", "teacher-fp-v1", 6)  # sorted by path: other < teacher-abc
    ]


def test_cli_info_verify_ls(cache_copy):
    runner = CliRunner()
    res = runner.invoke(cache, ["info", str(cache_copy)])
    assert res.exit_code == 0 and "teacher-fp-v1" in res.output and "hidden.0" in res.output
    res = runner.invoke(cache, ["info", str(cache_copy), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["count"] == 6
    res = runner.invoke(cache, ["verify", str(cache_copy)])
    assert res.exit_code == 0 and res.output.startswith("OK ")
    res = runner.invoke(cache, ["ls", str(cache_copy.parent)])
    assert res.exit_code == 0 and "finished" in res.output and "teacher-abc" in res.output


def test_cli_verify_fails_with_report(cache_copy):
    shard = sorted(cache_copy.glob("shard-*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    res = CliRunner().invoke(cache, ["verify", str(cache_copy)])
    assert res.exit_code == 1 and "FAILED" in res.output and shard.name in res.output


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(cache, ["info", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "no cache folder" in res.output and "Traceback" not in res.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "pending.json").write_text("{}")
    res = CliRunner().invoke(cache, ["info", str(tmp_path / "half")])
    assert res.exit_code == 1 and "rerun precompute" in res.output


if __name__ == "__main__":
    make_v1_fixture(Path(sys.argv[1]))
