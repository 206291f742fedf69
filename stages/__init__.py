"""The pipeline stages as Python functions; `kd <stage>` calls exactly these.

    from stages.config import load_config
    from stages import precompute, distill
    cfg = load_config("params.yaml", ["distill.epochs=1"])
    precompute(cfg)
    distill(cfg)

Each stage lives in the module of its name (`stages/distill.py`, ...); the names below are the
functions, which the `from ... import` binds over the module attributes of the same name.
"""

from stages.augment import augment
from stages.distill import distill
from stages.evaluate import evaluate
from stages.precompute import precompute
from stages.prepare import prepare
from stages.train_teacher import train_teacher

__all__ = ["prepare", "augment", "train_teacher", "precompute", "distill", "evaluate"]
