"""dvc.yaml declares what each stage really imports: the stage script and every module of the
package it imports, directly or through other modules (imports inside functions included), as
files or through a directory that holds them (the package's role directories), and no directory
it does not import from. A change to any of them reruns the stage, a change elsewhere (the study
tools) reruns none; and `optlab compare` hashes the code that produced a result."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "optlab"


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "optlab":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _executed_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (never run: type hints only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def runs_code(path: Path) -> bool:
    """Whether importing ``path`` executes anything: a package ``__init__.py`` that holds only its
    docstring runs nothing, so a stage need not declare it (editing it to hold code would)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def _imported_files(path: Path) -> set[Path]:
    """Package files that ``path`` imports (``import optlab.x``, ``from optlab import x``, ...),
    with the packages on the way (importing ``optlab.x`` runs ``optlab/__init__.py``)."""
    names = set()
    for node in _executed_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    files = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if (found := _module_file(".".join(parts[:i]))) is not None:
                files.add(found)
    return files


def imports_of(script: Path) -> set[str]:
    """Every package file ``script`` imports, transitively, relative to the repository."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for found in _imported_files(todo.pop()) - seen:
            seen.add(found)
            todo.append(found)
    return {str(p.relative_to(REPO)) for p in seen if p.name != "__init__.py" or runs_code(p)}


def _covered(path: str, declared: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def code_problems(stages: dict) -> list[str]:
    """What dvc.yaml gets wrong about each stage's code dependencies (empty when nothing)."""
    problems = []
    for name, stage in stages.items():
        words = shlex.split(stage["cmd"])
        assert words[:2] == ["python", f"stages/{name}.py"], words  # python stages/<name>.py
        script = words[1]
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
        needed = imports_of(REPO / script) | {script}
        declared = {d for d in deps if d.split("/")[0] in ("src", "stages")}
        problems += [
            f"{name}: imports {p} but does not declare it in deps" for p in sorted(needed) if not _covered(p, declared)
        ]
        problems += [
            f"{name}: declares {d} but never imports it" for d in sorted(declared)
            if not any(_covered(p, {d}) for p in needed)
        ]  # fmt: skip
    return problems


def test_every_stage_declares_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert code_problems(stages) == []


def test_a_missing_import_is_caught():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "src/optlab/training/backend.py" in imports_of(REPO / "stages/evaluate.py")
    stages["evaluate"]["deps"].remove("src/optlab/training")
    problems = code_problems(stages)
    assert "evaluate: imports src/optlab/training/backend.py but does not declare it in deps" in problems, problems
    stages["evaluate"]["deps"] += ["src/optlab/training", "src/optlab/study"]
    assert "evaluate: declares src/optlab/study but never imports it" in code_problems(stages)


def test_no_stage_runs_the_study_tools():
    # Editing optlab compare, the gate, sweeps or the CLI must rerun no stage.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert not any(p.startswith("src/optlab/study/") for p in imports_of(REPO / f"stages/{name}.py")), name


def test_a_package_init_that_runs_code_must_be_declared(tmp_path):
    (tmp_path / "quiet.py").write_text('"""Only a docstring."""\n')
    (tmp_path / "loud.py").write_text('"""A docstring."""\nimport os\n')
    assert not runs_code(tmp_path / "quiet.py") and runs_code(tmp_path / "loud.py")
    assert runs_code(PACKAGE / "__init__.py") is False  # every stage imports it: it must stay code-free


def test_bytecode_in_the_package_is_not_code_dvc_hashes():
    # src/optlab is a directory dependency: __pycache__ appearing on a user's machine must not
    # look like a code change (it would rerun the whole pipeline).
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


def _imports_keras(rel: str) -> bool:
    """Whether importing a package module imports Keras, JAX or TensorFlow (at module level:
    directly, or optlab.training.backend's ``keras``); a function that imports one when called
    (a model loader) does not count."""
    for node in ast.parse((REPO / rel).read_text()).body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module.split(".")[0] in HEAVY or any(a.name == "keras" for a in node.names))
        ):
            return True
    return False


HEAVY = ("keras", "jax", "tensorflow")


def test_stages_that_need_no_keras_import_none_of_its_modules():
    # The cheap stages stay cheap: no module that imports Keras is in their closure.
    for stage in ("download", "prepare", "plot"):
        heavy = sorted(p for p in imports_of(REPO / f"stages/{stage}.py") if p.startswith("src/") and _imports_keras(p))
        assert not heavy, (stage, heavy)
