"""Settings shared by the task kinds' end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def stage_params(tmp: Path, teacher: Path, data: dict[str, Any], *, keep_layers: Sequence[int] = (0, 3),
                 kd: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict:
    """Params that run every stage on tiny models in a few seconds, writing under `tmp`.

    `teacher` is fine-tuned by train-teacher, cached by precompute (float32, so cached == online) and cut to
    `keep_layers` for the student; `data` is the data section and `kd` the distill.kd section. Each of
    `sections` then updates its section (one level deep), as the tests' overrides.
    """
    p = {
        "data": data,
        "train_teacher": {"model": str(teacher), "output": str(tmp / "teacher"), "epochs": 1, "batch_size": 16,
                          "max_length": 32, "lr": 1e-3, "metrics": str(tmp / "m_teacher.json")},
        "precompute": {"teachers": [str(teacher)], "cache_root": str(tmp / "caches"), "batch_size": 16,
                       "max_length": 32, "dtype": "float32"},
        "distill": {"student": {"from_teacher": str(teacher), "keep_layers": list(keep_layers)}, "epochs": 1,
                    "batch_size": 16, "max_length": 32, "lr": 1e-3, "output": str(tmp / "student"),
                    "log_dir": str(tmp / "live"), "metrics": str(tmp / "m_distill.json"), "kd": dict(kd or {})},
        "evaluate": {"models": {"teacher": str(teacher), "student": str(tmp / "student")}, "max_length": 32,
                     "throughput_batches": 1, "output": str(tmp / "m_eval.json"),
                     "predictions": str(tmp / "m_preds.json")},
    }
    for section, values in sections.items():
        p.setdefault(section, {}).update(values)
    return p
