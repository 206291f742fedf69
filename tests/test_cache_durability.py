"""Crash safety, resume, corruption detection, multi-writer finalize and concurrent readers."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cache_format import CacheCorruptError, CacheReader, CacheWriter, FieldSpec, finalize_cache, verify_cache

REPO = Path(__file__).resolve().parents[1]
N = 120

# The producer: deterministic values per example index, so any process can check them. An optional 7th argument
# names a shard file: the process kills itself (SIGKILL) when that shard is written in full, just before it is
# renamed into place, so a kill test stops at the same point every time instead of racing the producer.
PRODUCER = textwrap.dedent(
    """
    import os, signal, sys, time
    import numpy as np
    from cache_format import CacheWriter, FieldSpec
    path, delay, writer_id, start, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    if len(sys.argv) > 7:
        kill_before, real_replace = sys.argv[7], os.replace

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(dst) == kill_before:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace  # every atomic write of cache_format renames with os.replace
    fields = [FieldSpec("logits", "float32", ("T", 4)), FieldSpec("label", "int64", ())]
    w = CacheWriter(path, fields, teacher_fingerprint="t", data_fingerprint="d", settings={}, writer_id=writer_id,
                    shard_bytes=400)
    for s in range(start, stop, 4):
        idx = [i for i in range(s, min(s + 4, stop)) if f"ex{i:04d}" not in w.done_ids]
        if not idx:
            continue
        lengths = np.array([i % 7 + 1 for i in idx])
        logits = np.zeros((len(idx), 7, 4), np.float32)
        for k, i in enumerate(idx):
            logits[k, : lengths[k]] = i * 1000 + np.arange(lengths[k] * 4).reshape(-1, 4)
        w.append([f"ex{i:04d}" for i in idx], lengths, {"logits": logits, "label": np.array(idx)})
        time.sleep(delay)
    w.close(finalize=sys.argv[6] == "1")
    """
)


def _run_producer(path, delay=0.0, writer_id="0", start=0, stop=N, finalize=True, kill_before=None):
    cmd = [sys.executable, "-c", PRODUCER, str(path), str(delay), writer_id, str(start), str(stop),
           "1" if finalize else "0", *([kill_before] if kill_before else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)


def flip_value_bit(data: bytearray, value: bytes) -> int:
    """Flip the low bit of the first byte of `value` where it is stored in `data` (a shard's bytes), in place.

    `value` (the bytes of a known stored value) must be there exactly once, so the flip changes that value and
    nothing of the file's structure: a reader that does not hash the shard still parses it and serves the
    changed value, so only the content hash can tell. Returns where the flipped byte is.
    """
    at = data.find(value)
    assert at >= 0 and data.find(value, at + 1) < 0, f"{value.hex()} is stored {data.count(value)} times, not once"
    data[at] ^= 0x01
    return at


def _check_values(reader: CacheReader, ids) -> None:
    out = reader.gather(ids)
    for k, eid in enumerate(ids):
        i = int(eid[2:])
        n = i % 7 + 1
        assert out["length"][k] == n and out["label"][k] == i
        np.testing.assert_array_equal(out["logits"][k, :n].reshape(-1), i * 1000 + np.arange(n * 4))


def test_sigkill_mid_write_then_resume(tmp_path):
    path = tmp_path / "c"
    # Killed with shards 0-2 committed and shard 3 written in full but not yet in place.
    proc = _run_producer(path, kill_before="shard-0-000003.arrow")
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (path / "manifest.json").exists()
    assert sorted(p.name for p in path.glob("shard-*.json")) == [f"shard-0-00000{i}.json" for i in range(3)]
    [partial] = path.glob("shard-0-000003.arrow.*.partial")
    assert partial.stat().st_size > 0 and not (path / "shard-0-000003.arrow").exists()
    # A fresh process resumes: it skips committed ids, cleans leftovers and finalizes.
    resumed = _run_producer(path)
    assert resumed.wait(60) == 0, resumed.stderr.read().decode()
    assert not list(path.glob("*.partial"))
    report = verify_cache(path)
    assert report.ok, report.problems
    reader = CacheReader(path, verify="open")
    assert sorted(reader.ids) == [f"ex{i:04d}" for i in range(N)]  # none missing, none twice
    _check_values(reader, reader.ids)


def test_resume_removes_uncommitted_leftovers(tmp_path):
    path = tmp_path / "c"
    fields = [FieldSpec("x", "int32", ())]
    kw = dict(teacher_fingerprint="t", data_fingerprint="d", settings={}, shard_bytes=1)
    w = CacheWriter(path, fields, **kw)
    w.append(["a", "b"], np.zeros(2, int), {"x": np.array([1, 2])})
    w.close(finalize=False)
    # What a kill leaves: a partial file, and a renamed shard whose sidecar was never written.
    (path / "shard-0-000001.json").unlink()
    (path / "shard-0-000007.arrow.abc.partial").write_bytes(b"junk")
    w2 = CacheWriter(path, fields, **kw)
    assert w2.done_ids == {"a"}
    assert not (path / "shard-0-000001.arrow").exists() and not list(path.glob("*.partial"))
    w2.append(["b"], np.zeros(1, int), {"x": np.array([2])})
    w2.close()
    assert verify_cache(path).ok and CacheReader(path).gather(["a", "b"])["x"].tolist() == [1, 2]


def test_exception_in_context_manager_commits_nothing_half_done(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(RuntimeError):
        with CacheWriter(path, [FieldSpec("x", "int32", ())], teacher_fingerprint="t", data_fingerprint="d",
                         settings={}) as w:
            w.append(["a"], np.zeros(1, int), {"x": np.array([1])})
            raise RuntimeError("producer failed")
    assert not (path / "manifest.json").exists() and not list(path.glob("shard-*"))


def test_two_writers_and_finalize(tmp_path):
    path = tmp_path / "c"
    procs = [_run_producer(path, writer_id=str(r), start=r * N // 2, stop=(r + 1) * N // 2, finalize=False)
             for r in range(2)]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read().decode()
    assert not (path / "manifest.json").exists()
    manifest = finalize_cache(path, expected_count=N)
    assert {s.writer for s in manifest.shards} == {"0", "1"} and manifest.count == N
    assert verify_cache(path).ok
    reader = CacheReader(path)
    assert sorted(reader.ids) == [f"ex{i:04d}" for i in range(N)]
    _check_values(reader, reader.ids[::-1])


def test_flipped_byte_caught_by_verify_and_reader(tmp_path):
    path = tmp_path / "c"
    assert _run_producer(path, stop=40).wait(60) == 0
    shard = sorted(path.glob("shard-*.arrow"))[1]
    [info] = [s for s in CacheReader(path).manifest.shards if s.file == shard.name]
    i = int(info.first_id[2:])
    want = i * 1000 + np.arange((i % 7 + 1) * 4)  # the producer's values of that example
    data = bytearray(shard.read_bytes())
    flip_value_bit(data, np.float32(want[1]).tobytes())  # its second logit
    shard.write_bytes(bytes(data))
    report = verify_cache(path)
    assert not report.ok and any(shard.name in p and "content hash differs" in p for p in report.problems)
    with pytest.raises(CacheCorruptError, match=shard.name):
        CacheReader(path, verify="open")
    with pytest.raises(CacheCorruptError, match=f"{shard.name} content hash differs"):
        CacheReader(path).gather([info.first_id])
    # The control: unhashed, the shard still parses and serves the changed value, the others as written.
    got = CacheReader(path, verify="off").get(info.first_id)["logits"].reshape(-1)
    assert got[1] != want[1] and np.array_equal(np.delete(got, 1), np.delete(want, 1))


def test_verify_reports_stray_and_missing_files(tmp_path):
    path = tmp_path / "c"
    assert _run_producer(path, stop=40).wait(60) == 0
    (path / "stray.bin").write_bytes(b"x")
    sorted(path.glob("shard-*.arrow"))[0].unlink()
    problems = verify_cache(path).problems
    assert any("stray.bin: file not listed" in p for p in problems)
    assert any("missing" in p for p in problems)
    assert not any("shards hold" in p for p in problems)  # a total that skips the missing shard would mislead


def _reader_worker(path: str, seed: int) -> int:
    reader = CacheReader(path)
    rng = np.random.default_rng(seed)
    for _ in range(30):
        ids = [reader.ids[i] for i in rng.choice(len(reader), size=8, replace=False)]
        _check_values(reader, ids)
    return len(reader)


def test_concurrent_readers_in_processes(tmp_path):
    path = tmp_path / "c"
    assert _run_producer(path).wait(60) == 0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        counts = pool.starmap(_reader_worker, [(str(path), s) for s in range(3)])
    assert counts == [N, N, N]


def test_reader_pickles_by_path(tmp_path):
    import pickle

    path = tmp_path / "c"
    assert _run_producer(path, stop=20).wait(60) == 0
    clone = pickle.loads(pickle.dumps(CacheReader(path)))
    assert clone.ids == CacheReader(path).ids


@pytest.mark.parametrize("shard_format", ["arrow", "zarr"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_resume_refuses_a_kept_shard_damaged_while_stopped(tmp_path, shard_format, where):
    """A resumed writer hashes the shards it committed before it stopped: a damaged one is named, not finalized."""
    path = tmp_path / "c" if where == "local" else f"memory://kd-resume-{shard_format}/{tmp_path.name}"
    # 16 rows of 8 KiB of random bits: one full zarr chunk, which blosc cannot compress and so stores as it is,
    # so a stored value can be found in either format.
    fields = [FieldSpec("x", "uint16", (4096,))]
    ids = [f"e{i:02d}" for i in range(16)]
    x = np.random.default_rng(0).integers(0, 2**16, (16, 4096), dtype=np.uint16)
    kw = dict(teacher_fingerprint="t", data_fingerprint="d", settings={}, commit_examples=16,
              shard_format=shard_format)
    w = CacheWriter(path, fields, **kw)
    w.append(ids, np.zeros(16, int), {"x": x})  # one shard
    w.close(finalize=False)
    # Control: an undamaged stop resumes.
    w2 = CacheWriter(path, fields, **kw)
    assert w2.done_ids == set(ids)
    w2.close(finalize=False)
    # Flip a bit of example e05's stored values in shard 0 (whichever of its objects holds them).
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(path))
    objects = [p for p in fs.find(root) if "shard-0-000000" in p and not p.endswith(".json")]
    [(obj, data)] = [(o, d) for o in objects if (d := bytearray(fs.cat_file(o))).find(x[5].tobytes()) >= 0]
    flip_value_bit(data, x[5].tobytes())
    fs.pipe_file(obj, bytes(data))
    with pytest.raises(CacheCorruptError, match=r"committed shard .*shard-0-000000.* damaged"):
        CacheWriter(path, fields, **kw)
    # The control: without the resume's hash check the damaged shard parses, and the cache serves the changed value.
    from cache_format import _writer

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_writer, "_check_kept_shard", lambda *args: None)
        CacheWriter(path, fields, **kw).close()
    got = CacheReader(path, verify="off").gather(ids)["x"]
    assert got[5, 0] == x[5, 0] ^ 1
    assert np.array_equal(np.delete(got.reshape(-1), 5 * 4096), np.delete(x.reshape(-1), 5 * 4096))
