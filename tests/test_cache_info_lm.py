"""`kd cache info` on causal-LM caches: codec, capture temperature, options, bytes per token and, with --deep, the
teacher mass outside the cached ids, checked against numpy on small synthetic caches of known values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache_format import CacheWriter, FieldSpec, cache_info
from pipeline.cache_cli import cache
from stages.teacher import lm_cache_info

V = 50
LENGTHS = [5, 0, 3, 7, 1, 4, 6, 2]  # an empty example included: its padding must not count


def _distributions(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random next-token distributions over V ids, float64, some peaked and some flat."""
    logits = rng.normal(size=(n, V)) * rng.uniform(0.5, 4.0, size=(n, 1))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def _write(path: Path, fields: list[FieldSpec], lm: dict, rows: list[dict[str, np.ndarray]]) -> Path:
    settings = {"lm": lm, "max_length": 8} if lm else {"max_length": 8}
    with CacheWriter(path, fields, teacher_fingerprint="t", data_fingerprint="d", settings=settings,
                     shard_bytes=400) as w:  # several shards
        for i, (n, row) in enumerate(zip(LENGTHS, rows)):
            w.append([f"ex{i}"], np.array([n]), {name: [value] for name, value in row.items()})
    return path


def _task_fields(n: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.arange(n, dtype=np.int32), "char_offsets": np.zeros((n, 2), np.int32)}


TASK_SPECS = [FieldSpec("input_ids", "int32", ("T",)), FieldSpec("char_offsets", "int32", ("T", 2))]


def _topk_cache(path: Path, k: int, *, old: bool) -> tuple[Path, np.ndarray]:
    """A topk cache (with tail_logprob, or an old one with logsumexp instead) and its expected per-token tails."""
    rng = np.random.default_rng(k)
    rows, tails = [], []
    for n in LENGTHS:
        p = _distributions(rng, n)
        ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(p, ids, 1)
        logprobs = np.log(top).astype(np.float16)
        row = {"topk_ids": ids.astype(np.uint16), "topk_logprobs": logprobs, **_task_fields(n)}
        if old:
            row["logsumexp"] = rng.normal(size=n).astype(np.float32)  # unused by the old readers too
            tails.append(np.clip(1.0 - np.exp(logprobs.astype(np.float64)).sum(1), 0.0, None))
        else:
            tail_logprob = np.log(1.0 - top.sum(1)).astype(np.float32)
            row["tail_logprob"] = tail_logprob
            tails.append(np.exp(tail_logprob.astype(np.float64)))
        rows.append(row)
    last = FieldSpec("logsumexp", "float32", ("T",)) if old else FieldSpec("tail_logprob", "float32", ("T",))
    fields = [FieldSpec("topk_ids", "uint16", ("T", k)), FieldSpec("topk_logprobs", "float16", ("T", k)), last,
              *TASK_SPECS]
    lm = {"codec": "topk", "k": k} if old else {"codec": "topk", "temperature": 2.0, "k": k}
    return _write(path, fields, lm, rows), np.concatenate(tails)


def _sampled_cache(path: Path, slots: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """A sampled cache: distinct ids in ascending order with counts (empty slots: id 0, count 0); its expected tails
    and distinct-id counts per token."""
    rng = np.random.default_rng(7)
    rows, tails, distinct = [], [], []
    for n in LENGTHS:
        p = _distributions(rng, n)
        ids = np.zeros((n, slots), np.uint16)
        counts = np.zeros((n, slots), np.uint8)
        logprobs = np.zeros((n, slots), np.float16)
        for t in range(n):
            drawn, c = np.unique(rng.choice(V, size=slots, p=p[t]), return_counts=True)
            ids[t, : len(drawn)], counts[t, : len(drawn)] = drawn, c
            logprobs[t, : len(drawn)] = np.log(p[t, drawn])
            logprobs[t, len(drawn):] = -3.0  # an empty slot's value must not count
            tails.append(max(0.0, 1.0 - np.exp(logprobs[t, : len(drawn)].astype(np.float64)).sum()))
            distinct.append(len(drawn))
        rows.append({"sample_ids": ids, "sample_counts": counts, "sample_logprobs": logprobs,
                     "proposal_lognorm": np.zeros(n, np.float32), **_task_fields(n)})
    fields = [FieldSpec("sample_ids", "uint16", ("T", slots)), FieldSpec("sample_counts", "uint8", ("T", slots)),
              FieldSpec("sample_logprobs", "float16", ("T", slots)), FieldSpec("proposal_lognorm", "float32", ("T",)),
              *TASK_SPECS]
    lm = {"codec": "sampled", "temperature": 1.0, "samples": slots, "proposal_temperature": 1.5, "seed": 3,
          "chunk_elements": 1 << 24}
    return _write(path, fields, lm, rows), np.array(tails), np.array(distinct, dtype=np.float64)


def _info(*args: str) -> str:
    res = CliRunner().invoke(cache, ["info", *args])
    assert res.exit_code == 0, res.output
    return res.output


def _line(out: str, head: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith(head)]
    return line


def test_topk_cache_shows_codec_temperature_bytes_and_the_tail_mass(tmp_path):
    path, tails = _topk_cache(tmp_path / "topk", 4, old=False)
    out = _info(str(path), "--deep")
    assert _line(out, "lm codec") == "lm codec   topk, k 4, capture temperature 2"
    # Counted: every field stored once per token, width x item size: 4 uint16 ids + 4 float16 + 1 float32 in the
    # codec, plus the int32 input id and the two int32 char offsets.
    assert _line(out, "lm bytes") == ("lm bytes   20 B/token in the codec's fields (topk_ids uint16 x4 = 8, "
                                      "topk_logprobs float16 x4 = 8, tail_logprob float32 x1 = 4) + 12 B in "
                                      "input_ids, char_offsets = 32 B/token")
    assert cache_info(path)["bytes_per_token"] == 32
    assert _line(out, "lm tail") == (f"lm tail    {tails.mean():.6f}: mean teacher mass per token outside the cached "
                                     f"ids, over {sum(LENGTHS)} tokens")
    info = json.loads(_info(str(path), "--deep", "--json"))["lm"]
    assert info["tail_mass"] == pytest.approx(tails.mean(), rel=1e-12) and info["tokens"] == sum(LENGTHS) == len(tails)
    assert 0.05 < tails.mean() < 0.95  # the values are not degenerate


def test_without_deep_no_row_is_read(tmp_path, monkeypatch):
    path, _ = _topk_cache(tmp_path / "topk", 4, old=False)
    import cache_format

    monkeypatch.setattr(cache_format, "CacheReader", lambda *a, **k: pytest.fail("read the rows without --deep"))
    out = _info(str(path))
    assert "lm codec" in out and "lm bytes" in out and "lm tail" not in out
    assert "tail_mass" not in json.loads(_info(str(path), "--json"))["lm"]


def test_an_old_topk_cache_reads_its_tail_from_the_topk_sum_at_temperature_1(tmp_path):
    path, tails = _topk_cache(tmp_path / "old", 3, old=True)
    info = lm_cache_info(path, deep=True, batch_rows=3)  # several batches
    assert info["temperature"] == 1.0 and info["k"] == 3  # no temperature recorded: captured at 1
    assert info["tail_mass"] == pytest.approx(tails.mean(), rel=1e-12)
    assert info["codec_bytes_per_token"] == 3 * 2 + 3 * 2 + 4 and info["bytes_per_token"] == 16 + 12
    out = _info(str(path), "--deep")
    assert _line(out, "lm codec") == "lm codec   topk, k 3, capture temperature 1"
    assert f"lm tail    {tails.mean():.6f}:" in out


def test_sampled_cache_tail_counts_only_the_used_slots(tmp_path):
    path, tails, distinct = _sampled_cache(tmp_path / "sampled", 6)
    out = _info(str(path), "--deep")
    assert _line(out, "lm codec") == ("lm codec   sampled, 6 samples, proposal temperature 1.5, seed 3, "
                                      "capture temperature 1")
    assert _line(out, "lm bytes").startswith("lm bytes   34 B/token in the codec's fields (sample_ids uint16 x6 = 12, "
                                             "sample_counts uint8 x6 = 6, sample_logprobs float16 x6 = 12, "
                                             "proposal_lognorm float32 x1 = 4)")
    assert _line(out, "lm tail") == (f"lm tail    {tails.mean():.6f}: mean teacher mass per token outside the cached "
                                     f"ids, over {sum(LENGTHS)} tokens; {distinct.mean():.2f} distinct ids cached "
                                     "per token")
    info = lm_cache_info(path, deep=True, batch_rows=2)
    assert info["tail_mass"] == pytest.approx(tails.mean(), rel=1e-12)
    assert info["distinct_ids"] == pytest.approx(distinct.mean(), rel=1e-12)


def test_dense_cache_has_no_tail_and_a_cache_of_another_kind_no_lm_lines(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"logprobs": np.log(_distributions(rng, n)).astype(np.float16), **_task_fields(n)} for n in LENGTHS]
    dense = _write(tmp_path / "dense", [FieldSpec("logprobs", "float16", ("T", V)), *TASK_SPECS],
                   {"codec": "dense", "temperature": 1.0}, rows)
    info = lm_cache_info(dense, deep=True)
    assert (info["codec_bytes_per_token"], info["tail_mass"], info["tokens"]) == (2 * V, 0.0, sum(LENGTHS))
    other = _write(tmp_path / "cls", [FieldSpec("logits", "float16", ("T", 2))], {},
                   [{"logits": np.zeros((n, 2), np.float16)} for n in LENGTHS])
    assert lm_cache_info(other) is None
    res = CliRunner().invoke(cache, ["info", str(other), "--deep"])
    assert res.exit_code == 0 and not re.search(r"^lm ", res.output, flags=re.M)
    assert "--deep reads causal-LM caches only" in res.output
    assert "lm" not in json.loads(_info(str(other), "--json"))
