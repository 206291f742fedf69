"""Issue 13: lazy shard hash check, commit cadence, one writer per cache, no half-written folders, bad JSON."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from filelock import FileLock

from cache_format import (
    file_hash,
    CacheCorruptError,
    CacheLockedError,
    CacheReader,
    CacheValueError,
    CacheWriter,
    FieldSpec,
    verify_cache,
)
from pipeline.cli import cli

REPO = Path(__file__).resolve().parents[1]
FIELDS = [FieldSpec("logits", "float32", (3,))]
KW = dict(teacher_fingerprint="t", data_fingerprint="d", settings={})


def _ids(lo: int, hi: int) -> list[str]:
    return [f"ex{i:03d}" for i in range(lo, hi)]


def _logits(lo: int, hi: int) -> np.ndarray:
    """Distinct, recognisable values: example i holds 1000 * i + (1, 2, 3)."""
    return (1000.0 * np.arange(lo, hi)[:, None] + np.arange(1, 4)).astype(np.float32)


def _append(w: CacheWriter, lo: int, hi: int) -> None:
    w.append(_ids(lo, hi), np.zeros(hi - lo, int), {"logits": _logits(lo, hi)})


def _sidecars(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("shard-*.json"))


def _run_script(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- 1. a corrupt shard is never served ----------------------------------------------------------

@pytest.fixture
def three_shards(tmp_path):
    """A finished cache of 30 examples in 3 shards of 10; returns (path, the shards in order)."""
    path = tmp_path / "c"
    with CacheWriter(path, FIELDS, **KW, commit_examples=10) as w:
        for s in range(0, 30, 5):
            _append(w, s, s + 5)
    return path, sorted(path.glob("shard-*.arrow"))


def _flip_in_logits(shard: Path, example: int) -> None:
    """Flip one bit of example `example`'s first logit inside the shard's logits buffer."""
    data = bytearray(shard.read_bytes())
    at = bytes(data).find(_logits(example, example + 1)[0, 0].tobytes())
    assert at > 0
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))


def test_flipped_logits_byte_is_never_served(three_shards):
    path, shards = three_shards
    _flip_in_logits(shards[1], 12)  # shard 1 holds ex010 .. ex019
    reader = CacheReader(path)  # lazy: opening does not read whole shards
    for call in (lambda: reader.gather(["ex000", "ex012"]), lambda: reader.get("ex015"),
                 lambda: list(reader.prefetch([["ex001"], ["ex011"]], torch=False))):
        with pytest.raises(CacheCorruptError, match=rf"shard .*{shards[1].name} content hash differs.*"
                                                    rf"kd cache verify {path}`.*rerun precompute into a new folder"):
            call()
    # Intact shards still serve their (correct) data.
    got = reader.gather(_ids(0, 10) + _ids(20, 30))["logits"]
    np.testing.assert_array_equal(got, np.concatenate([_logits(0, 10), _logits(20, 30)]))
    assert [b["logits"].shape for b in reader.prefetch([["ex000"], ["ex025"]], torch=False)] == [(1, 3), (1, 3)]
    # The flip really is in the served values: with verification off the damaged value comes back.
    assert CacheReader(path, verify="off").gather(["ex012"])["logits"][0, 0] != 12001.0
    with pytest.raises(CacheCorruptError, match=shards[1].name):
        CacheReader(path, verify="open")


def test_verify_option_survives_pickling(three_shards):
    path, shards = three_shards
    _flip_in_logits(shards[0], 3)
    off = pickle.loads(pickle.dumps(CacheReader(path, verify="off")))
    assert off.gather(["ex003"])["logits"].shape == (1, 3)
    lazy = pickle.loads(pickle.dumps(CacheReader(path)))
    with pytest.raises(CacheCorruptError, match=shards[0].name):
        lazy.gather(["ex003"])


def test_each_shard_hashed_once_per_process_across_threads(three_shards, monkeypatch):
    path, shards = three_shards
    hashed: list[str] = []
    real = file_hash

    def counting(file, algo):
        hashed.append(Path(file).name)
        return real(file, algo)

    monkeypatch.setattr("cache_format._reader.file_hash", counting)  # the reader's own binding
    reader = CacheReader(path)
    assert hashed == []  # lazy: nothing hashed at open
    ids = reader.ids
    threads = [threading.Thread(target=lambda: [reader.gather(ids[i::7]) for i in range(7)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    list(reader.prefetch([ids[:5], ids[-5:]]))
    reader.get("ex029")
    assert sorted(hashed) == [s.name for s in shards]
    CacheReader(path, verify="off").gather(ids)
    assert len(hashed) == 3


def test_verify_mode_is_validated(three_shards):
    with pytest.raises(CacheValueError, match="verify='yes'"):
        CacheReader(three_shards[0], verify="yes")


# --- 2. commit cadence -------------------------------------------------------------------------

def test_commit_examples_commits_shards_before_close(tmp_path):
    path = tmp_path / "c"
    w = CacheWriter(path, FIELDS, **KW, commit_examples=10)
    for s in range(0, 35, 7):
        _append(w, s, s + 7)
    assert len(_sidecars(path)) == 3 and w.done_ids == set(_ids(0, 30))
    manifest = w.close()
    assert [s.count for s in manifest.shards] == [10, 10, 10, 5]
    np.testing.assert_array_equal(CacheReader(path).gather(_ids(0, 35))["logits"], _logits(0, 35))


def test_commit_seconds_commits_on_next_append_after_interval(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr("cache_format._writer._clock", lambda: now[0])
    path = tmp_path / "c"
    w = CacheWriter(path, FIELDS, **KW, commit_seconds=5)
    _append(w, 0, 2)
    now[0] = 104.9
    _append(w, 2, 4)
    assert _sidecars(path) == []
    now[0] = 105.0
    _append(w, 4, 6)  # 5 s since opening: everything buffered becomes one shard
    assert _sidecars(path) == ["shard-0-000000.json"] and w.done_ids == set(_ids(0, 6))
    now[0] = 109.0
    _append(w, 6, 8)  # the interval counts from the last commit
    assert len(_sidecars(path)) == 1
    w.close()


def test_commit_arguments_validated(tmp_path):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(CacheValueError, match=rf"commit_examples={bad!r}"):
            CacheWriter(tmp_path / "c", FIELDS, **KW, commit_examples=bad)
    for bad in (0, -1.0, float("nan"), "60"):
        with pytest.raises(CacheValueError, match=rf"commit_seconds={bad!r}"):
            CacheWriter(tmp_path / "c", FIELDS, **KW, commit_seconds=bad)


KILLED_WRITER = """
    import os, signal, sys
    import numpy as np
    from cache_format import CacheWriter, FieldSpec
    w = CacheWriter(sys.argv[1], [FieldSpec("logits", "float32", (3,))], teacher_fingerprint="t",
                    data_fingerprint="d", settings={}, commit_examples=int(sys.argv[2]))
    for s in range(0, 25, 5):
        w.append([f"ex{i:03d}" for i in range(s, s + 5)], np.zeros(5, int),
                 {"logits": (1000.0 * np.arange(s, s + 5)[:, None] + np.arange(1, 4)).astype(np.float32)})
    print(os.getpid(), flush=True)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    import time; time.sleep(60)
"""


def test_killed_writer_resumes_from_committed_shards(tmp_path):
    path = tmp_path / "c"
    proc = _run_script(KILLED_WRITER, path, 10, "kill")
    assert proc.wait(60) == -signal.SIGKILL, proc.stderr.read()
    w = CacheWriter(path, FIELDS, **KW)  # the dead writer's lock does not block
    assert w.done_ids == set(_ids(0, 20))  # the 5 buffered rows were lost, the 2 shards were not
    _append(w, 20, 25)
    w.close()
    np.testing.assert_array_equal(CacheReader(path).gather(_ids(0, 25))["logits"], _logits(0, 25))


# --- 3. one writer per cache -------------------------------------------------------------------

def test_second_writer_is_refused_until_the_first_dies(tmp_path):
    path = tmp_path / "c"
    first = _run_script(KILLED_WRITER, path, 10, "sleep")
    try:
        pid = int(first.stdout.readline())  # printed after its appends: it holds the lock
        with pytest.raises(CacheLockedError) as err:
            CacheWriter(path, FIELDS, **KW)
        msg = str(err.value)
        assert msg.startswith(f"{path} is being written by pid {pid} on host {socket.gethostname()} since 20")
        assert "wait for it to finish (then rerun: the cache will be up to date) or stop that process" in msg
        assert "\n" not in msg
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    w = CacheWriter(path, FIELDS, **KW)
    assert w.done_ids == set(_ids(0, 20))
    _append(w, 20, 25)
    w.close()
    assert not list(path.glob("writer-*")), "lock files outlive the finished cache"
    assert verify_cache(path).ok and len(CacheReader(path)) == 25


def test_writer_ids_lock_separately_and_finished_cache_needs_no_lock(tmp_path):
    path = tmp_path / "c"
    w0 = CacheWriter(path, FIELDS, **KW, writer_id="0")
    w1 = CacheWriter(path, FIELDS, **KW, writer_id="1")  # another rank: not blocked
    with pytest.raises(CacheLockedError, match=f"pid {os.getpid()} on host"):
        CacheWriter(path, FIELDS, **KW, writer_id="0")
    _append(w0, 0, 3)
    _append(w1, 3, 6)
    w1.close(finalize=False)
    w0.close()
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith("shard-")) == [
        "manifest.json", "pending.json"]
    with FileLock(path / "writer-0.lock"):  # even if someone held a lock, a finished cache opens
        assert CacheWriter(path, FIELDS, **KW).complete


def test_stale_lock_files_are_cache_files(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    (path / "writer-0.lock").write_bytes(b"")
    (path / "writer-0.holder.json").write_text('{"pid": 1, "host": "gone", "started": "then"}')
    with CacheWriter(path, FIELDS, **KW) as w:  # not refused as a foreign folder
        _append(w, 0, 2)
    (path / "writer-7.lock").write_bytes(b"")  # a killed finalize's leftover is harmless to verify
    assert verify_cache(path).ok


# --- 4. nothing half-written on early failure ------------------------------------------------------

def test_error_in_first_batch_leaves_no_folder(tmp_path):
    path = tmp_path / "new"
    with pytest.raises(CacheValueError, match="example id ''"):
        with CacheWriter(path, FIELDS, **KW) as w:
            w.append([""], np.zeros(1, int), {"logits": _logits(0, 1)})
    assert not path.exists()
    CacheWriter(path, FIELDS, **KW).close(finalize=False)  # closed without rows: removed too
    assert not path.exists()


def test_folder_with_committed_shards_stays_for_resume(tmp_path):
    path = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with CacheWriter(path, FIELDS, **KW, commit_examples=2) as w:
            _append(w, 0, 3)
            raise RuntimeError("teacher crashed")
    assert CacheWriter(path, FIELDS, **KW).done_ids == set(_ids(0, 2))


def test_existing_folder_is_not_removed(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    CacheWriter(path, FIELDS, **KW).abort()
    assert path.is_dir()


# --- 5. bad JSON and the verify report ----------------------------------------------------------

def test_non_utf8_manifest_is_a_one_line_corrupt_error(three_shards):
    path, _ = three_shards
    (path / "manifest.json").write_bytes(b'{"format_version": "\xe9"}')
    with pytest.raises(CacheCorruptError, match=r"manifest.json is not valid UTF-8 JSON"):
        CacheReader(path)
    res = CliRunner().invoke(cli, ["cache", "verify", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output and not isinstance(res.exception, UnicodeError)
    lines = [line for line in res.output.splitlines() if "manifest.json" in line]
    assert len(lines) == 1 and "not valid UTF-8 JSON" in lines[0] and "rerun precompute" in lines[0]
    res = CliRunner().invoke(cli, ["cache", "info", str(path)])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and len(res.output.splitlines()) == 1


def test_non_utf8_pending_and_sidecar(tmp_path):
    path = tmp_path / "c"
    w = CacheWriter(path, FIELDS, **KW, commit_examples=2)
    _append(w, 0, 2)
    w.close(finalize=False)
    (path / "shard-0-000000.json").write_bytes(b"\xff\xff")
    with pytest.raises(CacheCorruptError, match="shard-0-000000.json is not valid UTF-8 JSON"):
        CacheWriter(path, FIELDS, **KW)
    (path / "pending.json").write_bytes(b'{"x": "\xe9"}')
    with pytest.raises(CacheCorruptError, match="pending.json is not valid UTF-8 JSON"):
        CacheWriter(path, FIELDS, **KW)


def test_verify_report_states_only_counts_it_read(three_shards):
    path, shards = three_shards
    _flip_in_logits(shards[2], 25)
    res = CliRunner().invoke(cli, ["cache", "verify", str(path)])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"FAILED {path}: 1 problem(s)",
        f"  {shards[2].name}: content hash differs from the manifest (corrupt)",
    ]
