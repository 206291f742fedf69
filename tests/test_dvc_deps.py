"""dvc.yaml lists, for every stage, exactly the code that stage runs (checked from the imports).

A stage that misses a module it imports would not re-run when that module changes; a stage that
depends on `pipeline/` (the CLI) would re-run the teacher when a help text changes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "cache_format")
# The module whose function each DVC stage's `kd` command calls.
ENTRY = {
    "prepare": "stages/prepare.py",
    "augment": "stages/augment.py",
    "train_teacher": "stages/train_teacher.py",
    "precompute": "stages/precompute.py",
    "distill": "stages/distill.py",
    "baseline": "stages/distill.py",
    "fastbert": "stages/distill.py",
    "evaluate": "stages/evaluate.py",
}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*parts)
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def _imports(file: Path) -> set[Path]:
    """Project files imported by `file`, at any depth of the module (function-level imports included).

    Importing `stages.data.examples` runs `stages/data/__init__.py` first, which imports the whole room, so
    the package `__init__` of every imported module counts too."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            for i in range(1, len(parts) + 1):
                f = _module_file(".".join(parts[:i]))
                if f is not None:
                    out.add(f)
    return out


def closure(entry: str) -> set[str]:
    todo, seen = [ROOT / entry], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f))
    return {str(f.relative_to(ROOT)) for f in seen}


def _deps(stage: str) -> list[str]:
    return [str(d) for d in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]]


@pytest.mark.parametrize("stage", sorted(ENTRY))
def test_stage_depends_on_every_module_it_imports(stage):
    deps = _deps(stage)
    missing = [f for f in sorted(closure(ENTRY[stage]))
               if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not list them as deps"


@pytest.mark.parametrize("stage", sorted(ENTRY))
def test_stage_does_not_depend_on_the_cli_or_unused_modules(stage):
    used = closure(ENTRY[stage])
    code = [d for d in _deps(stage) if d.startswith(("pipeline", "stages"))]
    assert not [d for d in code if d.startswith("pipeline")], f"{stage} depends on the CLI: a help text edit re-runs it"
    unused = [d for d in code if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in used)]
    assert not unused, f"dvc.yaml stage {stage} lists {unused}, which it does not run"
