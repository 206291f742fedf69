"""`kd precompute`: run each teacher once over a split and write its outputs to a cache."""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import cache_format as cf
from cache_format import path_exists, is_remote, join_path, resolve_path
from cache_format import MANIFEST_NAME, SHARD_RE
from stages.train import dist
from stages.config import Config
from stages._io import check_outputs, progress_bar
from stages.train import pick_device
from stages.data import Encoded, Examples, collate
from stages.models import load_model_config, load_tokenizer
from stages.tasks import Task, TeacherSpec, checked, get_task, load_split
from stages.teacher import cache_fields, cache_target, teacher_outputs
from stages.models import resolve_model

__all__ = ["PrecomputeResult", "precompute"]


@dataclass(frozen=True)
class PrecomputeResult:
    teacher: str
    path: Path
    examples: int
    written: int  # rows this run wrote, all torchrun processes together
    seconds: float  # the teacher loop and the writes (tokenising and loading the model come before)
    status: str  # "written", "resumed" or "up to date"


class _BackgroundWriter:
    """Appends batches to the cache on its own thread so the teacher never waits on the disk."""

    def __init__(self, writer: cf.CacheWriter, depth: int = 4):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kd-cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.writer.append(*item)
                except BaseException as e:  # re-raised on the producer's thread
                    self.error = e

    def put(self, ids: list[str], lengths: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((ids, lengths, arrays))

    def join(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _writer_id(rank: int, world: int) -> str:
    """The cache writer id of one rank: "0" for a single process, `w{world}r{rank}` under torchrun.

    The shards' file names thus record how many processes wrote them, so a resume with another number
    of processes is refused (`_check_writers`) instead of splitting the examples another way.
    """
    return "0" if world == 1 else f"w{world}r{rank}"


def _writers_world(writer: str) -> int | None:
    """The number of processes a shard's writer id says wrote it (None: not written by precompute)."""
    m = re.fullmatch(r"w(\d+)r\d+", writer)
    return 1 if writer == "0" else int(m[1]) if m else None


def _check_writers(path: str | Path, world: int) -> None:
    """Refuse to resume an unfinished cache that a run with another number of processes started."""
    folder = resolve_path(path)
    if isinstance(folder, Path):
        names = os.listdir(folder) if folder.is_dir() else []
    else:  # an object store
        names = list(folder.listdir())
    if MANIFEST_NAME in names:
        return
    # Writers of other names (the CacheWriter API) are left alone, as a single process always did.
    worlds = {_writers_world(m["writer"]) for name in names if (m := SHARD_RE.match(name))}
    others = sorted(w for w in worlds - {None, world})
    if others:
        raise dist.DistError(
            f"{path} is an unfinished cache started by {' or '.join(map(str, others))} process(es), this run has "
            f"{world}; finish it with the same number of processes (torchrun --nproc-per-node), or delete the "
            "folder to start over"
        )


def _precompute_one(cfg: Config, teacher: str, examples: Examples, device: torch.device) -> PrecomputeResult:
    """Cache `teacher`'s outputs over `examples`: resume an unfinished cache, leave a finished one as it is."""
    p = cfg.precompute
    spec = TeacherSpec.from_config(p)
    task = get_task(cfg.data)
    path_or_name = resolve_model(teacher)
    # Everything that can fail cheaply comes before the cache folder is opened and the weights are loaded:
    # the head and layers (config only) and the cache's identity (hashes of the files).
    config = load_model_config(path_or_name)
    task.check_teacher(config, teacher, spec)
    spec.check_layers(int(config.num_hidden_layers), teacher)
    target = cache_target(cfg, teacher, examples)
    rank, world = dist.rank(), dist.world_size()
    identity = [str(target.path), target.teacher_fingerprint, target.data_fingerprint, target.settings]
    dist.all_same(json.dumps(identity, sort_keys=True, default=str),
                  f"the cache of teacher {teacher} (folder {Path(str(target.path)).name})")
    _check_writers(target.path, world)

    def tokenize_and_load() -> tuple[Encoded, torch.nn.Module]:
        enc = task.encode(load_tokenizer(path_or_name), examples, p.max_length)  # refuses a too small max_length
        task.check_rows(config, teacher, spec, enc)
        return enc, task.load_teacher(path_or_name, eager_attention=bool(spec.attention_layers))

    # A finished cache needs neither tokens nor model; any other is written from both, so they come before the
    # writer creates its folder.
    finished = path_exists(join_path(target.path, MANIFEST_NAME))
    if not finished:
        enc, model = tokenize_and_load()
    t0 = time.perf_counter()
    writer = cf.CacheWriter(target.path, cache_fields(spec, config, examples.labels is not None, task),
                            teacher_fingerprint=target.teacher_fingerprint, data_fingerprint=target.data_fingerprint,
                            settings=target.settings, commit_examples=p.commit_examples,
                            commit_seconds=p.commit_seconds, writer_id=_writer_id(rank, world),
                            shard_format=target.shard_format)
    if writer.complete:
        return PrecomputeResult(teacher, target.path, len(examples), 0, 0.0, "up to date")
    if finished:  # the manifest vanished between the check and the open
        enc, model = tokenize_and_load()
    dist.barrier()  # all writers hold their locks: none removes the folder as unused under another
    status = "resumed" if writer.done_ids else "written"  # read now: the writer adds the ids it writes
    todo = _rows_to_do(enc, writer.done_ids, rank, world)
    _write_outputs(model, enc, todo, writer, spec, task, device, p.batch_size, f"precompute {Path(teacher).name}")
    written = _job_total(len(todo), target.path, len(enc))
    return PrecomputeResult(teacher, target.path, len(examples), written, time.perf_counter() - t0, status)


def _rows_to_do(enc: Encoded, done: set[str], rank: int, world: int) -> np.ndarray:
    """This rank's rows of `enc` not yet in the cache, longest first."""
    # Rank r takes every world-th example (all of them in one process), as the order of `enc` says.
    todo = np.array([i for i, x in enumerate(enc.ids) if i % world == rank and x not in done], dtype=np.int64)
    # Longest first, in batches of similar length: far less padding than file order, and the
    # cache is keyed by id so the order it is written in does not matter.
    return todo[np.argsort(-enc.lengths[todo], kind="stable")]


def _write_outputs(model: torch.nn.Module, enc: Encoded, todo: np.ndarray, writer: cf.CacheWriter, spec: TeacherSpec,
                   task: Task, device: torch.device, batch_size: int, desc: str) -> None:
    """Run the teacher over the rows `todo` in batches and append its outputs to the cache (on a background
    thread); close the writer, finalizing the cache in a single process. On any error the committed shards are
    kept, so the next run resumes from them."""
    model.to(device).eval()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
                if device.type == "cuda" else torch.autocast("cpu", enabled=False))
    store_label = task.cache_label() is not None
    bg = _BackgroundWriter(writer)
    try:
        with progress_bar(total=len(enc), initial=len(enc) - len(todo), desc=desc, unit="ex") as bar, \
                torch.inference_mode(), autocast:
            for start in range(0, len(todo), batch_size):
                rows = todo[start : start + batch_size]
                batch, ids = collate(enc, rows)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                outs = teacher_outputs(model, batch, spec, task, ids)
                lengths = outs.pop("length").to(torch.int32)
                # One device-to-host copy per tensor; the writer converts and checks on its thread.
                arrays = {k: v.cpu() for k, v in outs.items()}
                if store_label and "labels" in batch:
                    arrays["label"] = batch["labels"].cpu()
                bg.put(list(ids), lengths.cpu().numpy(), arrays)
                bar.update(len(rows))
        bg.join()
        writer.close(finalize=dist.world_size() == 1)
    except BaseException:
        if bg.thread.is_alive():
            bg.q.put(None)
            bg.thread.join()
        writer.close(finalize=False)  # keep the committed shards: the next run resumes from them
        raise


def _job_total(written: int, path: str | Path, count: int) -> int:
    """The rows the whole job wrote (`written` is this rank's); under torchrun, rank 0 then writes the manifest."""
    if dist.world_size() == 1:
        return written
    written = int(dist.all_reduce_sum(torch.tensor(written)).item())  # the job's, not this rank's share
    dist.barrier()  # every rank's shards are committed
    if dist.rank() == 0:  # the manifest, the one commit marker, is written once all rows are there
        cf.finalize_cache(path, expected_count=count)
    dist.barrier()
    return written


def precompute(cfg: Config) -> list[PrecomputeResult]:
    """Cache every teacher in `cfg.precompute.teachers` over `cfg.precompute.split`.

    Resumes an interrupted cache and does nothing for a finished one with the same teacher,
    data and settings (the folder name is derived from all three). With `tasks:`, every task's teachers over
    its own data. Under torchrun, each rank runs the teacher over every world-th example and commits its own
    shards; rank 0 then writes the manifest: the same cache as one process writes.
    """
    dist.init()
    if cfg.tasks:
        return [r for name in cfg.task_names() for r in precompute(cfg.for_task(name))]
    cfg = checked(cfg)  # every data file before any model, string labels named from data.train
    p = cfg.precompute
    if not is_remote(p.cache_root):  # an object store is checked when the writer opens it
        check_outputs({"precompute.cache_root": (p.cache_root, "folder")})
    examples = load_split(cfg, p.split, transfer=p.split == "train")
    device = pick_device(p.device)
    return [_precompute_one(cfg, t, examples, device) for t in p.teachers]
