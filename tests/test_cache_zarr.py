"""The zarr shard format (`shard_format="zarr"`, `precompute.format: zarr`): same contents as Arrow, same guarantees."""

from __future__ import annotations

import json
import multiprocessing
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_format as cf
from cache_format import (
    resolve_path,
    CacheCorruptError,
    CacheReader,
    CacheVersionError,
    CacheWriter,
    FieldSpec,
    _manifest,
    _zarr,
    verify_cache,
)
from stages.distill import distill
from stages.precompute import precompute
from stages.config import config_from_dict
from tests.helpers import stage_params
from tests.test_cache_durability import PRODUCER, REPO, N, _check_values, flip_value_bit

# Every kind of field: fixed, scalar, ragged ("T", H), several "T" axes, bf16, fp16, int ids, bool.
FIELDS = [
    FieldSpec("logits", "float32", (3,)),
    FieldSpec("label", "int64", ()),
    FieldSpec("pair", "float16", (2, 3)),
    FieldSpec("hidden.1", "bfloat16", ("T", 4)),
    FieldSpec("attention.0", "float16", (2, "T", "T")),
    FieldSpec("input_ids", "int32", ("T",)),
    FieldSpec("topk_ids", "uint16", ("T", 2)),
    FieldSpec("mask", "bool", (2,)),
    # Random bits, 8 KiB a row: blosc cannot compress a full 16-row chunk of them, so zarr stores it as it is
    # and a test can find one stored value in a shard's bytes and flip it.
    FieldSpec("noise", "uint16", (4096,)),
]
KW = dict(teacher_fingerprint="t", data_fingerprint="d", settings={"s": 1})


def _data(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = [f"ex{i:03d}" for i in range(n)]
    lengths = rng.integers(0, 8, n).astype(np.int32)
    lengths[3] = 0  # an empty example
    arrays = {
        "logits": rng.standard_normal((n, 3)).astype(np.float32),
        "label": rng.integers(-5, 5, n),
        "pair": rng.standard_normal((n, 2, 3)).astype(np.float16),
        "hidden.1": [torch.randn(int(t), 4, generator=gen).to(torch.bfloat16) for t in lengths],
        "attention.0": [rng.random((2, int(t), int(t))).astype(np.float16) for t in lengths],
        "input_ids": [rng.integers(0, 30000, int(t)) for t in lengths],
        "topk_ids": [rng.integers(0, 65535, (int(t), 2)) for t in lengths],
        "mask": rng.random((n, 2)) > 0.5,
        "noise": rng.integers(0, 2**16, (n, 4096), dtype=np.uint16),
    }
    return ids, lengths, arrays


def _write(path: Path, fmt: str, n: int = 60, **kw) -> Path:
    ids, lengths, arrays = _data(n)
    with CacheWriter(path, FIELDS, shard_format=fmt, commit_examples=23, **KW, **kw) as w:
        for s in range(0, n, 16):  # several appends, several shards
            w.append(ids[s : s + 16], lengths[s : s + 16], {k: v[s : s + 16] for k, v in arrays.items()})
    return path


@pytest.fixture
def both(tmp_path):
    return _write(tmp_path / "arrow", "arrow"), _write(tmp_path / "zarr", "zarr")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = (a[k].view(torch.int16), b[k].view(torch.int16)) if torch.is_tensor(a[k]) else (a[k], b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and (x == y).all(), k


def test_round_trip_of_every_field_kind_equals_arrow(both):
    arrow, zarr = CacheReader(both[0]), CacheReader(both[1])
    assert zarr.manifest.shard_format == "zarr" and zarr.manifest.format_version == 2
    assert arrow.manifest.shard_format == "arrow" and arrow.manifest.format_version == 1
    assert len(zarr.manifest.shards) == 3 and zarr.ids == arrow.ids
    assert all((both[1] / s.file).is_dir() for s in zarr.manifest.shards)
    ids = zarr.ids
    batch = [ids[i] for i in (59, 3, 0, 17, 17, 40, 22, 23)]  # across shards, a repeat, an empty example
    _assert_same(arrow.gather(batch), zarr.gather(batch))
    _assert_same(arrow.gather(batch, pad_to=3), zarr.gather(batch, pad_to=3))
    some = ["hidden.1", "label"]
    _assert_same(arrow.gather(ids[:23], fields=some), zarr.gather(ids[:23], fields=some))
    for i in ("ex000", "ex003", "ex059"):
        _assert_same(arrow.get(i), zarr.get(i))
    _assert_same(arrow.gather_torch(batch), zarr.gather_torch(batch))
    assert zarr.gather_torch(batch)["hidden.1"].dtype == torch.bfloat16
    batches = [ids[i : i + 7] for i in range(0, 60, 7)]
    for x, y in zip(arrow.prefetch(batches, depth=3), zarr.prefetch(batches, depth=3), strict=True):
        _assert_same(x, y)
    # The values themselves, not only agreement: bf16 bits round-trip exactly.
    arrays = _data()[2]
    got = zarr.get("ex005")
    assert np.array_equal(got["hidden.1"], arrays["hidden.1"][5].view(torch.int16).numpy().view(np.uint16))


def test_manifest_records_the_format_and_old_readers_refuse_it(both, monkeypatch):
    m = json.loads((both[1] / "manifest.json").read_text())
    assert m["shard_format"] == "zarr" and m["format_version"] == 2
    assert "shard_format" not in json.loads((both[0] / "manifest.json").read_text())  # Arrow caches: unchanged
    monkeypatch.setattr(_manifest, "SUPPORTED_VERSIONS", (1,))  # a reader from before the zarr format
    with pytest.raises(CacheVersionError, match="upgrade kd-pipeline"):
        CacheReader(both[1])
    CacheReader(both[0]).gather(["ex001"])


def test_info_verify_and_reopen_as_writer(both):
    arrow, zarr = cf.cache_info(both[0]), cf.cache_info(both[1])
    assert zarr["shard_format"] == "zarr" and zarr["tokens"] == arrow["tokens"] and zarr["count"] == 60
    assert zarr["bytes_on_disk"] > 0
    assert verify_cache(both[1]).ok, verify_cache(both[1]).problems
    from click.testing import CliRunner

    from pipeline.cli import cli

    r = CliRunner().invoke(cli, ["cache", "info", str(both[1])])
    assert r.exit_code == 0 and "v2, zarr shards" in r.output, r.output
    assert CliRunner().invoke(cli, ["cache", "verify", str(both[1])]).exit_code == 0
    # Same identity, finished: complete; another format at the same path: refused, not overwritten.
    assert CacheWriter(both[1], FIELDS, shard_format="zarr", **KW).complete
    with pytest.raises(cf.CacheExistsError, match="shard_format 'zarr' there vs 'arrow' now"):
        CacheWriter(both[1], FIELDS, **KW)
    # The default folder name differs by format (Arrow names stay what they were).
    names = {f: cf.cache_dir_name("m", "t", "d", {}, f) for f in ("arrow", "zarr")}
    assert names["arrow"] == cf.cache_dir_name("m", "t", "d", {}) != names["zarr"]


def _flip_noise(data: bytearray, example: int) -> None:
    """Flip the low bit of the first "noise" value of `example` (an index into `_data()`) in a chunk's bytes."""
    flip_value_bit(data, _data()[2]["noise"][example].tobytes())


def _assert_one_value_changed(reader: CacheReader, example: int) -> None:
    """The control: the damaged shard parses, and serves `example` with only its flipped value changed."""
    want = _data()[2]["noise"][example]
    got = reader.get(f"ex{example:03d}")["noise"]
    assert got[0] == want[0] ^ 1 and np.array_equal(got[1:], want[1:])


def test_corrupt_zarr_shard_refused_by_verify_and_lazy_check(both):
    shard = both[1] / "shard-0-000001.zarr"  # ex023 .. ex045
    chunk = shard / "noise" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    _flip_noise(data, 25)  # same size: only the content hash can tell
    chunk.write_bytes(bytes(data))
    report = verify_cache(both[1])
    assert not report.ok and any(shard.name in p and "content hash" in p for p in report.problems)
    reader = CacheReader(both[1])  # lazy: opening is fine, reading the damaged shard is not
    first, second = reader.manifest.shards[0], reader.manifest.shards[1]
    assert second.file == shard.name
    reader.gather([first.first_id])  # other shards keep serving
    with pytest.raises(CacheCorruptError, match=f"{shard.name} content hash differs"):
        reader.gather([second.first_id])
    with pytest.raises(CacheCorruptError, match=f"{shard.name} content hash differs"):
        CacheReader(both[1], verify="open")
    _assert_one_value_changed(CacheReader(both[1], verify="off"), 25)
    # A missing array file changes the size: refused at open in every mode.
    next(shard.glob("label/c/*")).unlink()
    with pytest.raises(CacheCorruptError, match="bytes, the manifest says"):
        CacheReader(both[1], verify="off")


def test_sigkill_mid_write_then_resume(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "c"
    producer = PRODUCER.replace("settings={},", 'settings={}, shard_format="zarr",')
    assert producer != PRODUCER

    def run(*kill_before: str):
        cmd = [sys.executable, "-c", producer, str(path), "0", "0", "0", str(N), "1", *kill_before]
        return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE)

    # Killed with shards 0-2 committed and shard 3's folder written in full but not yet in place.
    proc = run("shard-0-000003.zarr")
    proc.wait(120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (path / "manifest.json").exists()
    [partial] = path.glob("shard-0-000003.zarr.*.partial")
    assert list(partial.rglob("zarr.json")) and not (path / "shard-0-000003.zarr").exists()
    # What a kill can also leave: a renamed shard without its sidecar.
    committed = sorted(path.glob("shard-0-*.json"))
    assert [p.name for p in committed] == [f"shard-0-00000{i}.json" for i in range(3)]
    last = committed[-1]
    shard = path / last.name.replace(".json", ".zarr")
    last.unlink()
    assert shard.is_dir()
    resumed = run()
    assert resumed.wait(120) == 0, resumed.stderr.read().decode()
    assert not list(path.glob("*.partial"))
    report = verify_cache(path)
    assert report.ok, report.problems
    reader = CacheReader(path, verify="open")
    assert reader.manifest.shard_format == "zarr"
    assert sorted(reader.ids) == [f"ex{i:04d}" for i in range(N)]
    _check_values(reader, reader.ids)


def _child_gather(reader: CacheReader, ids: list[str], q) -> None:
    q.put(reader.gather(ids)["input_ids"].sum().item())


def test_reader_used_before_fork_works_in_the_child(both):
    # A reader that read through zarr in the parent (its I/O thread started) is inherited by a forked child,
    # as in a fork-based DataLoader: the child reopens its own handles instead of hanging.
    reader = CacheReader(both[1])
    ids = reader.ids[:30]
    expect = int(reader.gather(ids)["input_ids"].sum())
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_gather, args=(reader, ids, q))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and q.get(timeout=5) == expect


def test_shard_at_an_fsspec_url_round_trips():
    # The shard read/write functions take fsspec URLs as well (memory:// here, s3:// the same way).
    ids, lengths, arrays = _data(10)
    specs = {f.name: f for f in FIELDS}
    values = {"logits": arrays["logits"], "input_ids": np.concatenate(arrays["input_ids"]).astype(np.int32)}
    offsets = {"input_ids": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    fields = [specs["logits"], specs["input_ids"]]
    objects = _zarr.encode_shard(fields, ids, lengths, values, offsets)
    _zarr.upload_shard(resolve_path("memory://kd-test/cache"), "shard-0-000000.zarr", objects)
    url = "memory://kd-test/cache/shard-0-000000.zarr"
    assert _zarr.shard_size(url) == sum(map(len, objects.values()))
    assert _zarr.shard_hash(url, "sha256") == _zarr.objects_hash(objects, "sha256")
    shard = _zarr.ZarrShard(url, {f.name: f for f in fields})
    assert shard.id_list() == ids
    rows = shard.take(np.array([2, 5]), ["logits", "input_ids"])
    assert np.array_equal(rows.values["logits"], arrays["logits"][[2, 5]])
    assert np.array_equal(rows.values["input_ids"], np.concatenate([arrays["input_ids"][2], arrays["input_ids"][5]]))


def test_zarr_cache_trains_the_same_student_as_arrow(tmp_path, tiny_data_dir, tiny_teacher_dir):
    files = {split: str(tiny_data_dir / f"{split}.csv") for split in ("train", "dev", "test")}
    students = {}
    for fmt in ("arrow", "zarr"):
        cfg = config_from_dict(stage_params(tmp_path, tiny_teacher_dir, files,
                                            precompute={"format": fmt, "hidden_layers": [4]},
                                            distill={"output": str(tmp_path / f"s_{fmt}"), "epochs": 0.5}))
        [res] = precompute(cfg)
        assert res.status == "written" and res.written == 200
        assert CacheReader(res.path).manifest.shard_format == fmt
        out = distill(cfg)
        assert out.caches == [str(res.path)]
        students[fmt] = out
    assert students["arrow"].caches != students["zarr"].caches  # one folder per format
    from transformers import AutoModelForSequenceClassification

    a, b = (AutoModelForSequenceClassification.from_pretrained(tmp_path / f"s_{f}").state_dict()
            for f in ("arrow", "zarr"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zarr_cache_on_s3_server(tmp_path, monkeypatch):
    # The same cache through s3:// against a real S3-compatible server (moto, localhost): write, resume after an
    # upload cut short, read equal to the local cache, verify, and a corrupted object refused.
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import uuid

    import s3fs

    from tests.helpers import start_moto_server

    server, env = start_moto_server()
    try:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        bucket = f"kd-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem()
        fs.mkdir(bucket)
        url = f"s3://{bucket}/caches/zarr"
        ids, lengths, arrays = _data()
        with CacheWriter(url, FIELDS, shard_format="zarr", commit_examples=23, **KW) as w:
            w.append(ids[:30], lengths[:30], {k: v[:30] for k, v in arrays.items()})
            w.close(finalize=False)
        # An upload cut short: the shard's objects without its sidecar (not committed), redone on resume.
        fs.rm(f"{bucket}/caches/zarr/shard-0-000001.json")
        w = CacheWriter(url, FIELDS, shard_format="zarr", commit_examples=23, **KW)
        assert len(w.done_ids) == 23
        todo = [k for k, i in enumerate(ids) if i not in w.done_ids]
        w.append([ids[k] for k in todo], lengths[todo], {n: [v[k] for k in todo] if isinstance(v, list) else v[todo]
                                                         for n, v in arrays.items()})
        w.close()
        local = CacheReader(_write(tmp_path / "local", "arrow"))
        remote = CacheReader(url)
        assert remote.manifest.shard_format == "zarr" and sorted(remote.ids) == sorted(local.ids)
        batch = ["ex059", "ex003", "ex000", "ex024", "ex040"]
        _assert_same(local.gather(batch), remote.gather(batch))
        _assert_same(local.get("ex007"), remote.get("ex007"))
        assert verify_cache(url).ok, verify_cache(url).problems
        assert cf.cache_info(url)["shard_format"] == "zarr"
        shard = remote.manifest.shards[0].file  # ex000 .. ex022
        key = f"{bucket}/caches/zarr/{shard}/noise/c/0/0"
        data = bytearray(fs.cat_file(key))
        _flip_noise(data, 5)
        fs.pipe_file(key, bytes(data))
        report = verify_cache(url)
        assert not report.ok and any(shard in p and "content hash" in p for p in report.problems)
        with pytest.raises(CacheCorruptError, match=f"{shard} content hash differs"):
            CacheReader(url).gather([remote.manifest.shards[0].first_id])
        _assert_one_value_changed(CacheReader(url, verify="off"), 5)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_two_writers_then_finalize(tmp_path):
    # Ranks write their own zarr shards into one folder; one process finalizes (as precompute under torchrun).
    ids, lengths, arrays = _data()
    path = tmp_path / "c"
    for rank, part in enumerate((slice(0, 25), slice(25, 60))):
        w = CacheWriter(path, FIELDS, shard_format="zarr", writer_id=str(rank), **KW)
        w.append(ids[part], lengths[part], {k: v[part] for k, v in arrays.items()})
        w.close(finalize=False)
    manifest = cf.finalize_cache(path, expected_count=60)
    assert manifest.shard_format == "zarr" and [s.writer for s in manifest.shards] == ["0", "1"]
    assert verify_cache(path).ok
    _assert_same(CacheReader(_write(tmp_path / "a", "arrow")).gather(ids), CacheReader(path).gather(ids))
