"""User callbacks (`callbacks:` in the settings): imported before any work, called at each evaluation.

Each is called as fn(step=, metrics=, model=) on rank 0, isolated from training (RNG, train mode, gradients come
back as they were), and its return value is recorded with the evaluation and logged.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from cache_format import KDError
from stages._io import import_object, one_line
from stages.config import ConfigError
from stages.train.checkpoints import rng_state, set_rng_state

__all__ = ["CallbackError", "load_callbacks"]

Callbacks = Sequence[tuple[str, Callable[..., Any]]]


class CallbackError(KDError, RuntimeError):
    """A `callbacks` function raised; the checkpoint of that evaluation is kept, so --resume continues."""


def load_callbacks(paths: Sequence[str]) -> list[tuple[str, Callable[..., Any]]]:
    """Import each `package.module:function` (from sys.path, then the current folder), with its path.

    A path that does not import, or names something that is not callable, is a one-line ConfigError.
    """
    out = []
    for path in paths:
        fn = import_object(path, "callbacks", "a function as package.module:function")
        if not callable(fn):
            raise ConfigError(f"callbacks: {path!r} is a {type(fn).__name__}, not a function; name a function")
        out.append((path, fn))
    return out


def call_callbacks(callbacks: Callbacks, start: int, record: dict[str, Any], model: nn.Module,
                   optimizer: torch.optim.Optimizer, *, live: Any, say: Callable[[str], None], desc: str,
                   kept_in: Path) -> tuple[int, CallbackError] | None:
    """Call `callbacks[start:]` on the evaluation `record`, adding their returns to it (and to the `live` log).

    The first that raises stops the rest: its index and the CallbackError to raise once the checkpoint of that
    evaluation is written (in `kept_in`), so --resume calls it and the ones after it again.
    """
    for i, (path, fn) in enumerate(callbacks[start:], start):
        try:
            with _isolated(model, optimizer):
                value = fn(step=record["step"], metrics=dict(record.get("dev", {})), model=model)
        except Exception as e:
            error = CallbackError(
                f"{desc}: callback {path} raised at step {record['step']} ({one_line(e)}); the checkpoint of "
                f"that step is kept in {kept_in}: fix the callback and rerun with --resume"
            )
            error.__cause__ = e
            return i, error
        record.setdefault("callbacks", {})[path] = _plain(value)
        say(f"{desc}: step {record['step']} callback {path} -> {value!r}")
        if live is not None:
            for k, v in _numbers(value).items():
                live.log_metric("/".join(filter(None, ("callbacks", path.replace(":", "."), k))), v, plot=True)
    return None


def _plain(value: Any) -> Any:
    """A callback's return value as JSON (anything JSON cannot hold becomes its str)."""
    return json.loads(json.dumps(value, default=str))


def _numbers(value: Any) -> dict[str, float]:
    """The numbers in a callback's return value, for the metrics log: a number, or a mapping's number values."""
    items = value.items() if isinstance(value, Mapping) else [("", value)]
    return {str(k): float(v) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def _isolated(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """User code run between steps leaves training as it found it: RNG, train mode, no gradients.

    So a run with callbacks trains the same weights as one without, and a resume that reruns a callback
    matches a run that never stopped.
    """
    rng, was_training = rng_state(), model.training
    try:
        yield
    finally:
        set_rng_state(rng)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
