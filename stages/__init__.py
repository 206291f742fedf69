"""The pipeline stages as Python functions; `kd <stage>` calls exactly these.

    from pipeline.config import load_config
    from stages import precompute, distill
    cfg = load_config("params.yaml", ["distill.epochs=1"])
    precompute(cfg)
    distill(cfg)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["prepare", "train_teacher", "precompute", "distill", "evaluate"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import stages.data` should not pull in every stage (and torch-heavy deps).
    if name in __all__:
        return getattr(importlib.import_module(f"stages.{name}"), name)
    raise AttributeError(f"module 'stages' has no attribute {name!r}")
