"""Caches on object stores: write, read, resume and inspect a cache through s3:// against a real S3-compatible
HTTP server (moto's server mode on localhost: the real s3fs/botocore client code path), and memory://."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import cache_format as cf
from pipeline.cache_cli import cache
from tests.helpers import start_moto_server
from tests.test_cache_durability import flip_value_bit

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

FIELDS = [cf.FieldSpec("logits", "float32", (3,)), cf.FieldSpec("hidden.1", "bfloat16", ("T", 8)),
          cf.FieldSpec("attention.1", "float16", (2, "T", "T")), cf.FieldSpec("label", "int64", ())]
IDENTITY = {"teacher_fingerprint": "t" * 16, "data_fingerprint": "d" * 16, "settings": {"max_length": 32}}


@pytest.fixture(scope="module")
def moto_env():
    server, env = start_moto_server()
    yield env
    server.stop()


@pytest.fixture
def bucket(moto_env, monkeypatch) -> str:
    """A fresh bucket on the module's server; the test's environment points s3fs at it."""
    for key, value in moto_env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the environment they were made in
    name = f"kd-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


def _batches(n: int = 8, size: int = 16, seed: int = 0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        ids = [f"ex{b:02d}{i:02d}" for i in range(size)]
        lengths = rng.integers(0, 24, size)
        out.append((ids, lengths, {
            "logits": rng.standard_normal((size, 3), dtype=np.float32),
            "hidden.1": [rng.standard_normal((t, 8), dtype=np.float32) for t in lengths],
            "attention.1": [rng.random((2, t, t)).astype(np.float16) for t in lengths],
            "label": np.arange(size) % 2,
        }))
    return out


def _write(path, batches, **kw) -> cf.CacheWriter:
    with cf.CacheWriter(path, FIELDS, shard_bytes=6000, **IDENTITY, **kw) as w:
        for ids, lengths, arrays in batches:
            keep = [k for k, i in enumerate(ids) if i not in w.done_ids]
            if keep:
                w.append([ids[k] for k in keep], lengths[keep], {n: [a[k] for k in keep] if isinstance(a, list)
                                                                  else a[keep] for n, a in arrays.items()})
    return w


def _assert_same(local: cf.CacheReader, remote: cf.CacheReader) -> None:
    assert sorted(local.ids) == sorted(remote.ids)
    ids = sorted(local.ids)
    rng = np.random.default_rng(1)
    rng.shuffle(ids)
    for k in range(0, len(ids), 24):
        a, b = local.gather(ids[k : k + 24]), remote.gather(ids[k : k + 24])
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    one = ids[0]
    for name, value in local.get(one).items():
        np.testing.assert_array_equal(value, remote.get(one)[name])


def test_s3_cache_reads_back_equal_to_the_local_one(tmp_path, bucket):
    batches = _batches()
    _write(tmp_path / "c", batches)
    url = f"{bucket}/caches/c"
    _write(url, batches)
    local, remote = cf.CacheReader(tmp_path / "c"), cf.CacheReader(url)
    # Same rows in the same shards: byte-identical objects.
    assert [s.hash for s in remote.manifest.shards] == [s.hash for s in local.manifest.shards]
    assert len(remote.manifest.shards) > 3 and remote.path == url
    _assert_same(local, remote)
    # Every shard was read in full above, so each one's hash has been checked.
    assert all(s.verified for s in remote._remote)

    # prefetch reads ahead from the store and yields the same batches.
    fresh = cf.CacheReader(url)
    ids = sorted(local.ids)
    batches_ids = [ids[k : k + 10] for k in range(0, len(ids), 10)]
    got = list(fresh.prefetch(batches_ids, depth=3, torch=False))
    assert len(got) == len(batches_ids)
    for want_ids, arrays in zip(batches_ids, got):
        want = local.gather(want_ids)
        for name in want:
            np.testing.assert_array_equal(want[name], arrays[name])

    # A finished remote cache is reused, never overwritten by another configuration.
    again = cf.CacheWriter(url, FIELDS, **IDENTITY)
    assert again.complete and again.done_ids == set(local.ids)
    with pytest.raises(cf.CacheExistsError, match="finished cache of another configuration"):
        cf.CacheWriter(url, FIELDS, **{**IDENTITY, "settings": {"max_length": 64}})


def _logits_of(batches: list[tuple], example_id: str) -> np.ndarray:
    """The logits `_batches` made for `example_id` ("ex<batch><row>")."""
    return batches[int(example_id[2:4])][2]["logits"][int(example_id[4:6])]


def test_remote_lazy_verification_catches_a_damaged_shard(bucket):
    url = f"{bucket}/c"
    batches = _batches(4)
    _write(url, batches)
    fs = s3fs.S3FileSystem()
    shard = cf.CacheReader(url).manifest.shards[-1]
    key = f"{url[5:]}/{shard.file}"
    want = _logits_of(batches, shard.last_id)
    data = bytearray(fs.cat_file(key))
    flip_value_bit(data, want.tobytes())  # a value byte: the Arrow metadata still parses
    fs.pipe_file(key, bytes(data))
    off = cf.CacheReader(url, verify="off")  # "off" reads it without hashing
    ids = sorted(off.ids)
    with pytest.raises(cf.CacheCorruptError, match=f"{shard.file} content hash differs"):
        # Small shards are fetched whole at open, so their hash is checked there; big ones on the first full read.
        cf.CacheReader(url).gather(ids)
    res = CliRunner().invoke(cache, ["verify", url])
    assert res.exit_code == 1 and f"{shard.file}: content hash differs" in res.output
    # The control: unhashed, the shard parses and serves the changed value (and only that one).
    got = off.get(shard.last_id)["logits"]
    assert (got != want).tolist() == [True, False, False]


def test_remote_reads_fetch_only_what_is_read(bucket):
    """Ranged requests: opening reads metadata, ids and offsets; an example's values come on first read."""
    url = f"{bucket}/big"
    rng = np.random.default_rng(0)
    fields = [cf.FieldSpec("hidden.1", "float16", ("T", 512))]
    ids = [f"e{i:03d}" for i in range(256)]
    values = rng.standard_normal((256, 64, 512)).astype(np.float16)
    with cf.CacheWriter(url, fields, **IDENTITY) as w:  # one 16 MiB shard
        w.append(ids, np.full(256, 64), {"hidden.1": values})
    reader = cf.CacheReader(url)
    [shard] = reader._remote
    assert shard.filled.mean() < 0.2
    one = reader.get("e100")["hidden.1"]
    assert shard.filled.mean() < 0.3 and not shard.verified
    assert one.shape == (64, 512) and np.array_equal(one, values[100])
    reader.gather(ids)  # every byte read: the hash is checked
    assert shard.filled.all() and shard.verified

    # The same with a damaged value of e200: the first full read fails, and so does every later one.
    fs = s3fs.S3FileSystem()
    key = f"{url[5:]}/{shard.name}"
    data = bytearray(fs.cat_file(key))
    flip_value_bit(data, values[200].tobytes())
    fs.pipe_file(key, bytes(data))
    reader = cf.CacheReader(url)
    assert np.array_equal(reader.get("e100")["hidden.1"], values[100])  # a partial read is not hashed
    for _ in range(2):
        with pytest.raises(cf.CacheCorruptError, match=f"{shard.name} content hash differs"):
            reader.gather(ids)
    # The control: unhashed, the shard parses and serves e200 with its first value changed.
    got = cf.CacheReader(url, verify="off").get("e200")["hidden.1"]
    changed = np.argwhere(got.view(np.uint16) != values[200].view(np.uint16))
    assert changed.tolist() == [[0, 0]]


def test_interrupted_upload_is_not_complete_and_resumes(tmp_path, bucket):
    batches = _batches()
    url = f"{bucket}/c"
    w = cf.CacheWriter(url, FIELDS, shard_bytes=6000, **IDENTITY)
    for b in batches[:4]:
        w.append(*b)
    w.flush()
    w.abort()  # the process stops here: shards and sidecars uploaded, no manifest
    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(url[5:]))
    assert "manifest.json" not in names and "pending.json" in names
    # A kill between a shard's upload and its sidecar's: the shard is there, uncommitted.
    last_sidecar = [n for n in names if n.startswith("shard-") and n.endswith(".json")][-1]
    fs.rm_file(f"{url[5:]}/{last_sidecar}")
    with pytest.raises(cf.CacheIncompleteError, match="precompute did not finish"):
        cf.CacheReader(url)
    listed = cf.list_caches(bucket)
    assert [(c["path"], c["status"]) for c in listed] == [(url, "unfinished")]

    resumed = cf.CacheWriter(url, FIELDS, shard_bytes=6000, **IDENTITY)
    assert 0 < len(resumed.done_ids) < 4 * 16  # the committed shards only
    resumed.abort()
    _write(url, batches)
    _write(tmp_path / "c", batches)
    _assert_same(cf.CacheReader(tmp_path / "c"), cf.CacheReader(url))
    assert cf.verify_cache(url).ok


def test_cli_info_verify_ls_on_a_url(tmp_path, bucket):
    url = f"{bucket}/caches/c"
    _write(url, _batches(3))
    _write(tmp_path / "c", _batches(3))
    runner = CliRunner()
    res = runner.invoke(cache, ["info", url, "--json"])
    assert res.exit_code == 0, res.output
    remote, local = json.loads(res.output), cf.cache_info(tmp_path / "c")
    assert remote["path"] == url and remote["count"] == 48
    for key in ("bytes_on_disk", "tokens", "fields", "shards"):
        assert remote[key] == local[key], key
    res = runner.invoke(cache, ["verify", url])
    assert res.exit_code == 0 and res.output.startswith(f"OK {url}: 48 examples"), res.output
    res = runner.invoke(cache, ["ls", bucket])
    assert res.exit_code == 0 and res.output.split()[0] == "finished" and res.output.split()[-1] == url


def test_memory_url_round_trip(tmp_path):
    url = f"memory://kd-test-{uuid.uuid4().hex[:8]}/c"
    batches = _batches(3)
    _write(url, batches)
    _write(tmp_path / "c", batches)
    _assert_same(cf.CacheReader(tmp_path / "c"), cf.CacheReader(url))
    assert cf.verify_cache(url).ok
    assert cf.CacheWriter(url, FIELDS, **IDENTITY).complete


def _one_line_error(args: list[str]) -> str:
    res = CliRunner().invoke(cache, args)
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def test_url_without_its_filesystem_package_names_it():
    try:  # gcsfs is not a dependency of kd-pipeline or of its extras
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    assert "needs the package gcsfs" in _one_line_error(["info", "gs://some-bucket/cache"])


def test_missing_bucket_and_missing_credentials_are_one_line_errors(bucket, monkeypatch):
    line = _one_line_error(["info", "s3://kd-no-such-bucket/cache"])
    assert "bucket 'kd-no-such-bucket'" in line and "does not exist" in line
    with pytest.raises(cf.CacheStoreError, match="does not exist"):
        cf.CacheWriter("s3://kd-no-such-bucket/cache", FIELDS, **IDENTITY)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    line = _one_line_error(["ls", bucket])
    assert "no usable credentials" in line and "AWS_ACCESS_KEY_ID" in line
    with pytest.raises(cf.CacheStoreError, match="no usable credentials"):
        cf.CacheWriter(f"{bucket}/c", FIELDS, **IDENTITY)


def test_no_secret_in_output_or_errors(bucket, monkeypatch, capfd, caplog):
    secret = "kd-SECRET-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    url = f"{bucket}/c"
    _write(url, _batches(2))
    runner = CliRunner()
    outputs = [runner.invoke(cache, args).output for args in (
        ["info", url], ["verify", url], ["ls", bucket], ["info", f"{bucket}/missing"],
        ["info", "s3://kd-no-such-bucket/c"], ["info", f"s3://user:{secret}@{bucket[5:]}/c"],
    )]
    assert "no cache at" in outputs[3] and "does not exist" in outputs[4]
    assert "must not hold credentials" in outputs[5]
    captured = capfd.readouterr()
    for text in (*outputs, captured.out, captured.err, caplog.text):
        assert secret not in text


def test_precompute_to_s3_then_distill_from_it(tmp_path, bucket, tiny_data_dir, tiny_teacher_dir):
    """The stages with precompute.cache_root an s3:// URL: the same cache as a local run, and distill reads it."""
    from stages.distill import distill
    from stages.precompute import precompute
    from stages.config import config_from_dict
    from tests.helpers import stage_params

    files = {split: str(tiny_data_dir / f"{split}.csv") for split in ("train", "dev", "test")}
    remote_cfg = stage_params(tmp_path, tiny_teacher_dir, files,
                              precompute={"cache_root": f"{bucket}/caches"}, distill={"epochs": 0.25})
    [res] = precompute(config_from_dict(remote_cfg))
    assert res.status == "written" and str(res.path).startswith(f"{bucket}/caches/")
    [again] = precompute(config_from_dict(remote_cfg))
    assert again.status == "up to date" and again.path == res.path
    local_cfg = stage_params(tmp_path / "local", tiny_teacher_dir, files, distill={"epochs": 0.25})
    [local] = precompute(config_from_dict(local_cfg))
    _assert_same(cf.CacheReader(local.path), cf.CacheReader(res.path))

    out = distill(config_from_dict(remote_cfg))
    assert out.caches == [res.path]
    # The same seed from the cache on local disk: the student read from S3 must be the same, weight for weight
    # (a teacher row read from the wrong example, or batches served out of order, would change it).
    from_disk = distill(config_from_dict(local_cfg))
    assert from_disk.caches == [str(local.path)] and out.fit.steps == from_disk.fit.steps > 0
    remote_metrics = json.loads((tmp_path / "m_distill.json").read_text())
    local_metrics = json.loads((tmp_path / "local" / "m_distill.json").read_text())
    assert remote_metrics["steps"] == local_metrics["steps"] == out.fit.steps
    remote_student = load_file(str(tmp_path / "student" / "model.safetensors"))
    local_student = load_file(str(tmp_path / "local" / "student" / "model.safetensors"))
    assert remote_student.keys() == local_student.keys()
    for name, weight in local_student.items():
        assert torch.equal(remote_student[name], weight), name
    initial = load_file(str(tiny_teacher_dir / "model.safetensors"))
    assert not torch.equal(remote_student["classifier.weight"], initial["classifier.weight"])  # it trained
