"""Batches of row indices for the training loop, resumable mid-epoch: `fit` saves a sampler's state in every
checkpoint and loads it back on --resume, so the resumed run sees exactly the batches an uninterrupted one would.

`EpochSampler` is the default (one data set); `TaskSampler` draws each batch from one of the tasks of a
`TaskMix` (multi-task distillation hands it to `fit`). Under torchrun every rank walks the same global batches and
computes on its share of each (`rank_share`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from stages.data import DataError, Encoded, collate

__all__ = ["Sampler", "EpochSampler", "TaskMix", "TaskSampler", "rank_share", "collate_fn"]


class Sampler(Protocol):
    """What `fit` draws batches from (`EpochSampler`, `TaskSampler`).

    Iterating yields the row-index batches left in the current epoch, then moves to the next epoch (`position`
    back to 0); `copy.copy` gives an independent walker; `state_dict()` after a step resumes the exact stream.
    """

    position: int  # batches or rows of the current epoch already handed out (0: at an epoch's start)

    @property
    def batches_per_epoch(self) -> int: ...

    def __iter__(self) -> Iterator[np.ndarray]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class EpochSampler:
    """Yields batches of row indices; the order of epoch e is a permutation seeded by (seed, e).

    Iterating yields the rest of the current epoch, then moves to the next epoch. `state_dict()` counts the rows
    already handed out, so saving it after a training step and loading it into a new sampler continues with
    exactly the remaining batches. A consumer that prefetches must save the state as of the batch it trained on.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 lengths: np.ndarray | None = None):
        """`lengths` (one per row) turns on length grouping: batches of similar length, in random order."""
        if n < 1 or batch_size < 1:
            raise DataError(f"EpochSampler needs n >= 1 and batch_size >= 1 (got n={n}, batch_size={batch_size})")
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != n:
            raise DataError(f"EpochSampler: {len(self.lengths)} lengths for {n} rows; give one length per row")
        self.epoch = 0
        self.position = 0  # rows of the current epoch already handed out
        self._taken: tuple[tuple[int, int], np.ndarray] | None = None  # `take`'s (epoch, seed) and its order

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one full epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start; a no-op for the current epoch, so a resumed position is kept."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n)
        if self.lengths is None:
            return order
        # Length grouping (as transformers' LengthGroupedSampler): sort random groups of 50 batches by
        # length, cut into batches, shuffle the batches. Padding drops ~2x on short-sentence data.
        group = 50 * self.batch_size
        order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                for c in np.array_split(order, range(group, self.n, group))])
        full = self.n // self.batch_size * self.batch_size
        batches = order[:full].reshape(-1, self.batch_size)[rng.permutation(self.n // self.batch_size)]
        return np.concatenate([batches.ravel(), order[full:]])

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._order()
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        while self.position < end:
            batch = order[self.position : self.position + self.batch_size]
            self.position += len(batch)
            yield batch
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        return -(-max(end - self.position, 0) // self.batch_size)

    def take(self) -> np.ndarray:
        """The next batch, moving on to the next epoch at the end of one (a stream that never ends)."""
        end = self.n - self.n % self.batch_size if self.drop_last else self.n
        if self.position >= end:
            self.epoch, self.position = self.epoch + 1, 0
        if self._taken is None or self._taken[0] != (self.epoch, self.seed):
            self._taken = ((self.epoch, self.seed), self._order())  # one permutation per epoch, not per batch
        batch = self._taken[1][self.position : self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the stream is: epoch, rows handed out in it, seed (and n, to catch a changed data set)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a saved `state_dict()`."""
        n = int(state.get("n", self.n))
        position = int(state["position"])
        if n != self.n or not 0 <= position <= self.n:
            raise DataError(
                f"sampler state (n={n}, position={position}) does not fit this data set of {self.n} examples; "
                "resume with the same data or start without --resume"
            )
        self.epoch = int(state["epoch"])
        self.position = position
        self.seed = int(state["seed"])


class TaskMix:
    """The training rows of several tasks as one indexable set (multi-task distillation).

    Row r of task t has the global index `starts[t] + r` and the id `<task name>/<row id>`; a batch never mixes
    tasks (`TaskSampler` draws whole batches from one task), so `collate` hands it to that task's data.
    """

    def __init__(self, names: Sequence[str], data: Sequence[Encoded]):
        self.names = list(names)
        self.data = list(data)
        self.starts = np.concatenate([[0], np.cumsum([len(d) for d in self.data])]).astype(np.int64)
        self.ids = [f"{name}/{i}" for name, d in zip(self.names, self.data) for i in d.ids]
        self.lengths = np.concatenate([d.lengths for d in self.data])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def task_of(self, rows: np.ndarray) -> int:
        """The task index of a batch's rows (all from one task)."""
        return int(np.searchsorted(self.starts, rows[0], side="right") - 1)

    def collate(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], list[str]]:
        t = self.task_of(rows)
        batch, _ = collate(self.data[t], np.asarray(rows) - self.starts[t])
        return batch, [self.ids[r] for r in rows.tolist()]


class TaskSampler:
    """Batches for multi-task training: each batch comes from one task, drawn with probability |D_t|^tau / sum.

    tau = 1 samples tasks in proportion to their size, 0 uniformly (TextBrewer's MultiTaskDistiller uses
    proportional sampling). Each task keeps its own `EpochSampler` (seed + task index), cycling through its
    epochs as often as it is drawn. An "epoch" here is as many batches as one pass over every task takes; the
    task order of epoch e is drawn from a generator seeded by (seed, e), so `state_dict()` (the epoch, the
    batches handed out in it and every task sampler's state) resumes the exact same stream.
    """

    def __init__(self, mix: TaskMix, batch_size: int, *, seed: int, tau: float, group_by_length: bool):
        self.mix = mix
        self.seed = seed
        sizes = np.array([len(d) for d in mix.data], dtype=np.float64)
        weights = sizes ** tau
        self.probs = weights / weights.sum()
        self.samplers = [EpochSampler(len(d), batch_size, shuffle=True, seed=seed + t,
                                      lengths=d.lengths if group_by_length else None)
                         for t, d in enumerate(mix.data)]
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    @property
    def batches_per_epoch(self) -> int:
        return sum(s.batches_per_epoch for s in self.samplers)

    def _tasks(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        return rng.choice(len(self.samplers), size=self.batches_per_epoch, p=self.probs)

    def __iter__(self) -> Iterator[np.ndarray]:
        tasks = self._tasks()
        while self.position < len(tasks):
            t = int(tasks[self.position])
            self.position += 1
            yield self.mix.starts[t] + self.samplers[t].take()
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch - self.position

    def __copy__(self) -> "TaskSampler":
        other = TaskSampler.__new__(TaskSampler)
        other.__dict__.update(self.__dict__)
        other.samplers = [copy.copy(s) for s in self.samplers]
        return other

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "tasks": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state.get("tasks", ())) != len(self.samplers):
            raise DataError(f"sampler state has {len(state.get('tasks', ()))} task(s), this run {len(self.samplers)}; "
                            "resume with the same tasks or start without --resume")
        for s, sub in zip(self.samplers, state["tasks"]):
            s.load_state_dict(sub)
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def collate_fn(train: Encoded | TaskMix) -> Callable[[np.ndarray], tuple[dict[str, torch.Tensor], list[str]]]:
    """How `fit` turns a batch of `train`'s row indices into tensors (and ids): a data set's own `collate(rows)`
    (a `TaskMix`, whose rows come from several tasks' data), else `stages.data.collate`."""
    own = getattr(train, "collate", None)
    return own if callable(own) else functools.partial(collate, train)


def rank_share(rows: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """Rank `rank`'s rows of a global batch and the weight of its loss (its share of the batch x `world`).

    Ranks take every `world`-th row (length-grouped batches stay balanced). DDP averages the ranks'
    gradients, so weighting each rank's mean loss by its share gives the gradient of the global batch's
    mean even when the shares differ. A rank left without rows takes the first row at weight 0: it must
    still run forward and backward for the gradient all-reduce.
    """
    part = rows[rank::world]
    return (part, world * len(part) / len(rows)) if len(part) else (rows[:1], 0.0)


def _remaining_batches(sampler: Sampler, ids: np.ndarray, rank: int = 0, world: int = 1
                       ) -> tuple[list[np.ndarray], list[list[str]], list[int], list[float]]:
    """The rest of the current epoch without advancing `sampler` (a copy walks it): this rank's rows and ids
    of each global batch, the global batch sizes and this rank's loss weights (`rank_share`)."""
    full = list(copy.copy(sampler))
    shares = [rank_share(r, rank, world) for r in full]
    return [r for r, _ in shares], [ids[r].tolist() for r, _ in shares], [len(r) for r in full], [w for _, w in shares]
