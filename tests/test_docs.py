"""The documentation: the generated params page is current, the site builds strictly, the README stays short,
and neither the README nor the docs talk about local paths or how the project is worked on."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "docs" / "gen_params.py"
README_MAX_LINES = 320


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_params", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_params_page_is_current():
    out = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_params_generator_refuses_stale_and_missing_help(monkeypatch: pytest.MonkeyPatch):
    gen = _load_generator()
    assert "| `distill.kd.temperature` | float | `4.0` |" in gen.generate()
    monkeypatch.setitem(gen.HELP, "distill.kd.no_such_key", "gone")
    with pytest.raises(SystemExit, match=r"HELP\['distill.kd.no_such_key'\]: no such setting"):
        gen.generate()
    monkeypatch.delitem(gen.HELP, "distill.kd.no_such_key")
    monkeypatch.delitem(gen.HELP, "distill.kd.temperature")
    with pytest.raises(SystemExit, match=r"distill.kd.temperature: no description .* and no HELP entry"):
        gen.generate()


def test_docs_site_builds_strictly(tmp_path: Path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (pip install -e '.[docs]')")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", "mkdocs.yml",
                          "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "params.html").exists()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


# Words about local machines and how the project is worked on, which belong in neither the README nor the docs.
_FORBIDDEN = {
    "a local path": r"/work/|/tmp/|/home/\w",
    "sessions": r"\bsessions?\b",
    "issues": r"\bissues?\b|\bissue\s*#\d+",
    "tickets": r"\btickets?\b",
    "the CEO": r"\bCEO\b",
    "numbered stops": r"\bstop \d+\b",
    "earlier runs of the process": r"\bearlier (?:sessions?|runs? of the (?:process|project))\b",
    "work trees": r"\bwork ?trees?\b|\bwt-i\d+\b",
    "targets to meet": r"\btargets?\s*(?::|<=|>=|of \d)|\bthe target (?:asks|is met|is not met)\b",
    "who had which machine": r"\bno (?:GPU )?machine was available\b|\bthis work\b|\bthis project's\b",
}
# Links to other projects' issue trackers are fine: they are removed before the check.
_ALLOWED = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+/(?:issues|pull)/\d+")


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "mkdocs.yml", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_hold_no_development_process_words(path: Path):
    text = _ALLOWED.sub("", path.read_text(encoding="utf-8"))
    found = []
    for what, pattern in _FORBIDDEN.items():
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{path.relative_to(ROOT)}:{line}: {what}: {m.group(0)!r}")
    assert found == []
