"""The layout of docs/architecture.md holds: imports point down the floors, no cycles, no private store imports.

Read from the source with `ast` (every import at any depth, function-level ones included), so a new upward
import or cycle fails here before it shows up as an import error somewhere else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "cache_format")

# The floor of each room (docs/architecture.md): a room may import rooms on its own floor's lower neighbours
# only, i.e. a strictly lower floor, or itself.
FLOORS = {
    "cache_format": 0,
    "stages.kinds": 0,
    "stages.config": 1,
    "stages.losses": 1,
    "stages.report": 1,  # reads result files, no model code; evaluate writes predictions in its format
    "stages._io": 2,
    "stages.data": 3,
    "stages.models": 4,
    "stages.train": 4,
    "stages.tasks": 5,
    "stages.teacher": 6,
    "stages.methods": 7,
    "stages.init": 8,
    "stages.prepare": 8,
    "stages.augment": 8,
    "stages.train_teacher": 8,
    "stages.precompute": 8,
    "stages.distill": 8,
    "stages.evaluate": 8,
    "pipeline": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for n in names if n.split(".")[0] in PACKAGES and (t := _target(n))}
    return found


EDGES = {(m, t) for m, path in MODULES.items() for t in _imports(path) if t != m}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[0] if parts[0] != "stages" else ".".join(parts[:2])


def test_every_room_has_a_floor():
    rooms = {room(m) for m in MODULES} - {"stages"}
    assert not rooms - set(FLOORS), f"add {sorted(rooms - set(FLOORS))} to FLOORS and docs/architecture.md"


def test_imports_point_down():
    up = sorted((a, b) for a, b in EDGES
                if room(a) != room(b) and room(b) != "stages" and FLOORS[room(b)] >= FLOORS[room(a)])
    assert not up, f"imports that do not point to a lower floor: {up}"


def _cycles(nodes: set[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    graph = {n: sorted(b for a, b in edges if a == n) for n in nodes}
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return found


def test_no_import_cycles_between_modules():
    # A package's __init__ re-exporting its own submodules is not a cycle of the design.
    edges = {(a, b) for a, b in EDGES if not b.startswith(a + ".")}
    assert _cycles(set(MODULES), edges) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a", "b", "c"}, {("a", "b"), ("b", "a"), ("b", "c")}) == [["a", "b"]]


def test_nothing_outside_the_store_imports_its_private_modules():
    private = sorted((a, b) for a, b in EDGES if b.startswith("cache_format._") and not a.startswith("cache_format"))
    assert not private, private
    for path in list((ROOT / "tests").rglob("*.py")) + list((ROOT / "bench").rglob("*.py")):
        text = path.read_text()
        private = "cache_format." + "_"  # split, so that this file does not match its own check (or a grep)
        assert f"from {private}" not in text and f"import {private}" not in text, path


@pytest.mark.parametrize("package", ["stages", "pipeline"])
def test_no_function_over_80_lines_without_a_reason(package):
    """A function longer than about a screen needs a comment right above it saying why."""
    long = []
    for path in (ROOT / package).rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if not lines[first - 2].lstrip().startswith("#"):
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
