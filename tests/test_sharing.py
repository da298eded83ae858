"""Two machines share one experiment through a git remote and a DVC remote, and see the same
results: machine A runs and pushes it, machine B clones, pulls it and compares it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optlab.study import cli, experiments
from optlab.study.pipeline import Pipeline

# The fake pipeline and its helpers live with the compare tests (tests/ is not a package, so
# pytest puts this directory on sys.path).
from test_compare import dvc, exp_run, git_identity, git_init, make_project, sh


def _states(repo: Path) -> dict[str, dict]:
    return {s["name"]: s for s in experiments.iter_states(experiments.exp_show(repo))}


@pytest.mark.slow  # DVC and two trainings: `make test`, not test-fast
def test_experiment_round_trip_between_machines(tmp_path):
    remote = tmp_path / "remote.git"
    storage = tmp_path / "dvc-storage"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(remote))

    # Machine A: the project, its baseline pushed, then one experiment with new prepared data
    # (another split), so only the experiment's own cache holds it.
    a = tmp_path / "a"
    a.mkdir()
    git_init(a)
    sh(a, "git", "remote", "add", "origin", str(remote))
    make_project(a)
    dvc(a, "remote", "add", "-d", "storage", str(storage))
    sh(a, "git", "commit", "-q", "-am", "DVC remote")
    sh(a, "git", "push", "-q", "origin", "main")
    dvc(a, "push", "-q")
    exp_run(a, "shared", optimizer="sgd", seed=1, **{"prepare.val_fraction": 0.2})
    dvc(a, "exp", "push", "origin", "shared")  # the experiment's commit and its cached outputs
    dvc(a, "push", "-q")
    sent = _states(a)["shared"]

    # Machine B: a fresh clone sees nothing until it pulls the experiment.
    b = tmp_path / "b"
    sh(tmp_path, "git", "clone", "-q", str(remote), str(b))
    git_identity(b)
    assert "shared" not in _states(b)
    dvc(b, "exp", "pull", "origin", "shared")
    dvc(b, "pull", "-q")
    got = _states(b)["shared"]

    assert got["rev"] == sent["rev"]
    for key in ("params", "metrics", "deps"):
        assert got["data"][key] == sent["data"][key], key
    assert experiments.read_curve(b, got["rev"], Pipeline.load(b)) == experiments.read_curve(
        a, sent["rev"], Pipeline.load(a)
    )

    # The experiment's prepared data came through the DVC remote, not from A's disk.
    dvc(b, "exp", "apply", "shared")
    assert (b / "data/prepared/x.txt").read_text() == (a / "data/prepared/x.txt").read_text()
    assert "0.2" in (b / "data/prepared/x.txt").read_text()

    # Compare on B: the experiment is there, refused against the baseline for its other split.
    assert cli.main(["compare", "--repo", str(b)]) == 0
    report = (b / "reports/compare.md").read_text()
    assert "`shared`" in report and "prepare.val_fraction: 0.2 vs 0.1" in report
    assert json.loads((b / "metrics/test.json").read_text())["accuracy"] == pytest.approx(
        sent["data"]["metrics"]["metrics/test.json"]["data"]["accuracy"]
    )
