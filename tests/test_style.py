"""The code passes the linter and the formatter configured in pyproject.toml (ruff)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    assert ruff, "ruff is not installed in the test environment; run `make test`"
    return subprocess.run([ruff, *args], cwd=REPO, capture_output=True, text=True)


def test_lint():
    done = _ruff("check", "--output-format", "concise", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_format():
    done = _ruff("format", "--check", ".")
    assert done.returncode == 0, f"run `ruff format .`:\n{done.stdout}{done.stderr}"


# --- the shape of the package (docs/extending.md) -------------------------------------------------
PACKAGE = REPO / "src" / "optlab"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _exceptions() -> dict[str, str]:
    """The size exceptions docs/extending.md lists, each with its reason: path (or path::function)
    -> reason."""
    text = (REPO / "docs" / "extending.md").read_text()
    section = text.split("## Size exceptions", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip().strip("`"): cells[1].strip() for cells in rows}


def test_no_module_or_function_is_longer_than_a_screenful_or_two_but_the_listed_ones():
    import ast

    allowed, found = _exceptions(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found.add(rel)
        for node in ast.walk(ast.parse(path.read_text())):
            too_long = isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            if too_long:
                found.add(f"{rel}::{node.name}")
    assert found <= set(allowed), (
        f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function, "
        f"and not listed with a reason in docs/extending.md: {sorted(found - set(allowed))}"
    )
    assert set(allowed) <= found, f"listed in docs/extending.md but no longer too long: {sorted(set(allowed) - found)}"
    assert all(allowed.values()), "every exception says why"


def test_the_package_has_no_import_cycle():
    import ast
    import graphlib

    from test_dvc_yaml import _executed_nodes

    def module(path):
        rel = path.relative_to(REPO / "src").with_suffix("")
        return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)

    modules = {module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _executed_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("optlab"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}  # fmt: skip
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("optlab")}
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"an import cycle in optlab: {' -> '.join(exc.args[1])}") from None
    assert len(order) == len(modules)
