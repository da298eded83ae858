"""The environment is the one the results came from: every package the code imports is declared in
pyproject.toml, `make install` installs exactly the versions pinned in requirements.lock, and
those pins lie within pyproject.toml's ranges (so `make lock` could have produced them)."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FIRST_PARTY = {"optlab", "conftest", "archives", "project"} | {p.stem for p in (REPO / "tests").glob("test_*.py")}


def _requirements(*extras: str) -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs}


def _imported_distributions(*roots: str) -> dict[str, set[str]]:
    """distribution -> the files importing it, for every third-party import under ``roots``."""
    owners = metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
                        continue
                    for dist in owners.get(top, [top]):
                        found.setdefault(canonicalize_name(dist), set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    # optlab.sweep imports Ray (the [ray] extra) only inside the ray executor.
    runtime = _requirements("ray")
    undeclared = {d: f for d, f in _imported_distributions("src", "benchmarks").items() if d not in runtime}
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"
    with_tests = _requirements("test")
    undeclared = {d: f for d, f in _imported_distributions("tests").items() if d not in with_tests}
    assert not undeclared, f"imported by the tests but not declared (dependencies or the test extra): {undeclared}"


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_the_installed_versions_are_the_pinned_ones():
    # What `make install` gives (pip install -c requirements.lock): a run on a fresh clone uses
    # the versions the committed dvc.lock and metrics came from.
    pins = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {name: (pin, installed.get(name)) for name, pin in pins.items() if installed.get(name) != pin}
    assert not wrong, (
        f"installed versions differ from requirements.lock (pinned, installed): {wrong}; run `make clean-venv install`"
    )


def test_the_pins_satisfy_pyproject_ranges():
    pins = _lock()
    for name, req in _requirements("test", "ray").items():
        assert name in pins, f"{name} is a dependency but requirements.lock does not pin it: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}: run `make lock`"
        )


def test_dvc_reads_yaml_with_the_c_parser():
    # ruamel.yaml >= 0.19.1 falls back to its pure-Python parser when ruamel.yaml.clib is missing;
    # DVC's "safe" reads (dvc.yaml, dvc.lock, params.yaml: dozens per experiment) then run about
    # six times slower (54 parses: 0.59 s against 0.10 s).
    # Checked against ruamel.yaml 0.19.1: YAML(typ="safe").Parser is CParser.
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is not installed: run `make install`"
    yaml = YAML(typ="safe")
    assert yaml.Parser is CParser
    assert yaml.load("train: {cmd: python stages/train.py}") == {"train": {"cmd": "python stages/train.py"}}
