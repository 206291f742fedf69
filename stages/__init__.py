"""The kd-pipeline library. `kd <stage>` calls exactly the stage functions, one module each:

    from stages.config import load_config
    from stages.precompute import precompute
    from stages.distill import distill
    cfg = load_config("params.yaml", ["distill.epochs=1"])
    precompute(cfg)
    distill(cfg)

Stage commands: prepare, augment, train_teacher, precompute, distill, evaluate, report. The rooms they build on,
from the bottom up: kinds/config (settings), data, models, losses, tasks, teacher, train, methods; see
docs/architecture.md.
"""
