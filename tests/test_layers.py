"""The import layers of docs/ARCHITECTURE.md: scripts -> engine -> data, models, utils -> base, one way.

Read from the source (nothing is imported or run), so a new import that breaks a layer fails here.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "evaluate", "infer", "pretrain"}
# which top-level parts of the project each part may import (itself included)
ALLOWED = {
    "base": {"base"},
    "models": {"base", "models"},
    "utils": {"base", "utils"},
    "data": {"base", "utils", "data"},
    "engine": {"base", "utils", "data", "models", "engine"},
    "bench": {"base", "utils", "data", "models", "engine"},
    "scripts": {"base", "utils", "data", "models", "engine"},
}
PARTS = {"base", "models", "utils", "data", "engine"} | SCRIPTS


def _imports(path: Path) -> set[str]:
    """The project's top-level names a file imports (absolute imports; relative ones stay in the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PARTS


def _part(path: Path) -> str:
    rel = path.relative_to(REPO)
    if len(rel.parts) == 1:
        return "scripts" if rel.stem in SCRIPTS else rel.stem
    return rel.parts[0]


def _sources():
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("*/**/*.py")):
        if path.parts[len(REPO.parts)] not in ("tests", ".venv") and _part(path) in ALLOWED:
            yield path


def test_every_module_imports_only_the_layers_below_it():
    wrong = [f"{p.relative_to(REPO)} imports {sorted(_imports(p) - ALLOWED[_part(p)])}"
             for p in _sources() if _imports(p) - ALLOWED[_part(p)]]
    assert not wrong, "\n".join(wrong)


def test_no_script_imports_another_script():
    assert all(not (_imports(p) & SCRIPTS) for p in _sources()), "a script or library module imports a script"


def test_the_rule_itself_has_no_cycle():
    # a layer may import another only if that one does not import it back (checked on ALLOWED, so the
    # test above then rules out every cycle between packages)
    for a, allowed in ALLOWED.items():
        for b in allowed - {a}:
            assert a not in ALLOWED.get(b, set()), (a, b)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import train\nfrom engine.predict import Predictor\nfrom .x import y\n")
    assert _imports(bad) == {"train", "engine"}
