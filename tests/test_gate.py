"""optlab gate: the verdicts on recorded `dvc metrics diff --all --json` output, then the real
command path on a git + DVC repository whose baseline commit holds metrics/test.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optlab.core.errors import OptlabError
from optlab.study import cli, gate

FILE = "metrics/test.json"  # what the evaluate stage's --metrics names in the test repository


def diff(old, new) -> dict:
    # The shape `dvc metrics diff <rev> --all --json` prints (DVC 3.67).
    entry = {"old": old, "new": new}
    if all(isinstance(v, float) for v in (old, new)):
        entry["diff"] = new - old
    return {"metrics/test.json": {"accuracy": entry, "loss": {"old": 0.4, "new": 0.4, "diff": 0.0}}}


@pytest.mark.parametrize(
    "old, new, passed",
    [
        (0.87, 0.84, False),  # a regression
        (0.87, 0.90, True),  # an improvement
        (0.87, 0.865, True),  # a drop within the threshold
        (0.87, 0.86, True),  # exactly the threshold: 0.87 - 0.86 > 0.01 in floating point
        (0.87, None, False),  # could not load the new value
        (None, 0.87, False),  # no baseline value
        (0.87, "0.9", False),  # not a number
        (0.87, float("nan"), False),
    ],
)
def test_verdicts(old, new, passed):
    result = gate.judge(diff(old, new), FILE, max_drop=0.01)
    assert result.passed is passed, result.reason


def test_metric_absent_on_both_sides_fails():
    result = gate.judge({"metrics/train/metrics.json": {"step": {"old": 1, "new": 1}}}, FILE)
    assert not result.passed and "missing on both sides" in result.reason


def test_negative_threshold_is_a_user_error():
    with pytest.raises(OptlabError, match="--max-drop"):
        gate.judge(diff(0.8, 0.8), FILE, max_drop=-0.1)


def test_summary_is_a_markdown_table():
    md = gate.summary_markdown(gate.judge(diff(0.87, 0.84), FILE), "origin/main", FILE)
    assert md.startswith("### Regression gate ❌ failed")
    assert "| `metrics/test.json:accuracy` | 0.8700 | 0.8400 | -0.0300 | 0.0100 |" in md
    assert "Accuracy dropped by 0.0300, more than the allowed 0.0100." in md


# --- through `dvc metrics diff` on a real repository -----------------------------------------
def sh(cwd: Path, *cmd: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A baseline commit with accuracy 0.87; each test then edits the workspace's metrics."""
    path = tmp_path_factory.mktemp("gate")
    sh(path, "git", "init", "-q", "-b", "main")
    sh(path, "git", "config", "user.name", "optlab test")
    sh(path, "git", "config", "user.email", "test@optlab.invalid")
    sh(path, sys.executable, "-m", "dvc", "init", "-q")
    # The gate reads the test metrics' path from the evaluate stage's command line, as in optlab.
    # and the training summary (where a diverged run says so) from the train stage's --live.
    (path / "dvc.yaml").write_text(
        "stages:\n"
        "  train:\n    cmd: python train.py --live metrics/train\n"
        "    metrics:\n      - metrics/train/metrics.json:\n          cache: false\n"
        "  evaluate:\n    cmd: python evaluate.py --metrics metrics/test.json\n"
        "    metrics:\n      - metrics/test.json:\n          cache: false\n"
    )
    (path / "metrics/train").mkdir(parents=True)
    (path / "metrics/test.json").write_text(json.dumps({"accuracy": 0.87, "loss": 0.4}))
    (path / "metrics/train/metrics.json").write_text(json.dumps({"diverged": 0, "epochs_run": 20}))
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", "baseline")
    sh(path, "git", "branch", "baseline")
    return path


@pytest.mark.parametrize(
    "accuracy, code, message",
    [
        (0.84, 1, "dropped by 0.0300, more than the allowed 0.0100"),
        (0.87, 0, "did not drop"),  # unchanged: only `--all` makes DVC print it
        (0.90, 0, "did not drop"),
        (0.865, 0, "within the allowed"),
        (None, 1, "missing or not a number in this change"),
    ],
)
def test_gate_command(repo, capsys, monkeypatch, accuracy, code, message):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    metrics = {"loss": 0.4} if accuracy is None else {"accuracy": accuracy, "loss": 0.4}
    (repo / "metrics/test.json").write_text(json.dumps(metrics))
    assert cli.main(["gate", "--baseline", "baseline", "--repo", str(repo)]) == code
    out = capsys.readouterr()
    assert message in out.out and out.out.startswith("### Regression gate")
    assert ("gate failed" in out.err) is (code == 1)


def test_a_diverged_change_fails_the_gate_whatever_its_accuracy(repo, capsys):
    (repo / "metrics/test.json").write_text(json.dumps({"accuracy": 0.90, "loss": 0.4}))
    (repo / "metrics/train/metrics.json").write_text(json.dumps({"diverged": 1, "diverged_epoch": 3}))
    try:
        assert cli.main(["gate", "--baseline", "baseline", "--repo", str(repo)]) == 1
    finally:
        (repo / "metrics/train/metrics.json").write_text(json.dumps({"diverged": 0, "epochs_run": 20}))
    assert "Training diverged in this change" in capsys.readouterr().out


def test_gate_with_a_looser_threshold_passes(repo, capsys):
    (repo / "metrics/test.json").write_text(json.dumps({"accuracy": 0.84}))
    assert cli.main(["gate", "--baseline", "baseline", "--max-drop", "0.05", "--repo", str(repo)]) == 0


def test_unknown_baseline_is_a_user_error(repo, capsys):
    assert cli.main(["gate", "--baseline", "no-such-branch", "--repo", str(repo)]) == 2
    assert "error: `dvc metrics diff no-such-branch` failed" in capsys.readouterr().err


def test_ci_workflow_runs_the_gate_on_pull_requests():
    import yaml

    workflow = yaml.safe_load((Path(__file__).parents[1] / ".github/workflows/ci.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    assert workflow["permissions"] == {} and job["permissions"]["pull-requests"] == "write"  # the job's own
    steps = job["steps"]
    assert steps[0]["with"]["fetch-depth"] == 0
    runs = "\n".join(step.get("run", "") for step in steps)
    for command in (
        "make test",
        "make repro",
        'dvc metrics diff "origin/$BASE" --md',
        "optlab compare",
        'optlab gate --baseline "origin/$BASE"',
        "gh pr comment",
    ):
        assert command in runs
    assert "|| echo" in next(s["run"] for s in steps if "dataset-fashion-mnist" in s.get("run", ""))
