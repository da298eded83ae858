"""optlab sweep on a real local Ray cluster (started here: `ray start --head` with 2 CPUs, so two
worker processes run tasks at once), with a local bare git repository as the git remote and a
local directory as the DVC remote: every experiment pushed once, pulled back by a separate clone
and ranked by optlab compare, with a worker killed mid-run and its task retried; a repeated
sweep that trains nothing; and what is refused before anything is submitted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_experiment
from optlab.core.errors import OptlabError
from optlab.study import sweep

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray is optlab's [ray] extra, which make install installs")

SMALL = {"dataset": "digits", "model.hidden": [32], "train.epochs": 2, "train.batch_size": 64,
         "schedule": "constant", "train.diagnostics": False}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, env) -> Path:
    """optlab on digits, committed and pushed to a bare git remote, with a local DVC remote."""
    from test_pipeline import copy_checkout

    base = tmp_path_factory.mktemp("sweep")
    root, remote, storage = base / "optlab", base / "remote.git", base / "storage"
    root.mkdir()
    copy_checkout(REPO, root)
    sh(base, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "config", "user.name", "optlab test")
    sh(root, "git", "config", "user.email", "test@optlab.invalid")
    write_experiment(root, **SMALL)
    sh(root, sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(storage), env=env)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "optlab on digits")
    sh(root, "git", "remote", "add", "origin", str(remote))
    sh(root, "git", "push", "-q", "origin", "main")
    return root


@pytest.fixture(scope="module")
def cluster(env, project):
    """A real local Ray cluster: a head node with 2 CPUs, its workers running this interpreter."""
    port = _free_port()
    # The workers import optlab from the project's own source, as any node of a real cluster would.
    ray_env = {**env, "PYTHONPATH": str(project / "src")}
    ray_bin = str(Path(sys.executable).parent / "ray")
    sh(project, ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
       "--disable-usage-stats", env=ray_env)  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env={**os.environ, **env})


GRID = ["optimizer=adam,sgd", "seed=range(0,2)"]


def _remote_experiments(project: Path, env: dict) -> list[str]:
    refs = sh(project, "git", "ls-remote", "origin", "refs/exps/*", env=env)
    return [line.rsplit("/", 1)[-1] for line in refs.splitlines()]


def test_a_sweep_runs_on_the_cluster_survives_a_killed_worker_and_every_experiment_comes_back(
    project, cluster, env, tmp_path
):
    commit = sh(project, "git", "rev-parse", "HEAD").strip()
    names = [sweep.experiment_name(commit, p) for p in sweep.grid(GRID)]
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "optlab.study.cli", "sweep", *[a for g in GRID for a in ("-S", g)],
           "--executor", "ray", "--address", cluster, "--repo", str(project), "--logs", str(logs)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})  # fmt: skip
    # Mid-run, kill the worker process running one task (SIGKILL: no clean-up, as a lost node).
    killed, deadline = None, time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            text = log.read_text()
            if " exp run " in text:
                os.kill(int(re.match(r"pid (\d+)", text).group(1)), signal.SIGKILL)
                killed = log.stem
                break
        time.sleep(0.5)
    out = proc.communicate(timeout=900)[0]
    seconds = time.perf_counter() - started
    print(f"\n[record] 4 experiments on a 2-CPU local Ray cluster, one worker killed: {seconds:.0f} s")
    assert killed, f"no task was caught mid-run:\n{out}"
    assert proc.returncode == 0, out
    assert out.count("| pushed |") == 4 and "0 failed" in out, out
    pushed = _remote_experiments(project, env)
    assert sorted(pushed) == sorted(names)  # the killed one retried: none lost, none duplicated
    assert (logs / f"{killed}.log").read_text().count("pid ") >= 2, "the killed task was not tried again"

    # A separate clone pulls every experiment, with its metrics, and optlab compare ranks them.
    other = tmp_path / "other"
    sh(tmp_path, "git", "clone", "-q", str(project / ".." / "remote.git"), str(other), env=env)
    sh(other, sys.executable, "-m", "dvc", "exp", "pull", "origin", *names, env=env)
    shown = sh(other, sys.executable, "-m", "dvc", "exp", "show", "--csv", "--all-commits", env=env)
    assert all(n in shown for n in names)
    from optlab.study import cli

    assert cli.main(["compare", "--repo", str(other), "--all-commits", "--baseline", names[0]]) == 0
    report = (other / "reports/compare.md").read_text()
    assert "optimizer=sgd" in report and "| 2 |" in report  # two seeds per variant, ranked


def test_the_same_sweep_again_trains_nothing(project, cluster, env):
    started = time.perf_counter()
    account = sweep.sweep(project, GRID, "ray", cluster, progress=False)
    assert [account.status[n] for n, _ in account.points] == ["already pushed"] * 4
    assert not account.failed
    print(f"\n[record] the same 4-experiment sweep again: {time.perf_counter() - started:.1f} s")


def test_the_local_executor_runs_the_grid_on_dvcs_queue_and_not_twice(project):
    grid = ["optimizer=adam", "seed=range(8,10)"]
    account = sweep.sweep(project, grid, "local", jobs=2, progress=False)
    assert [account.status[n] for n, _ in account.points] == ["done", "done"] and not account.failed
    shown = sh(project, sys.executable, "-m", "dvc", "exp", "show", "--csv")
    assert all(n in shown for n, _ in account.points)  # the deterministic names, as experiments here
    again = sweep.sweep(project, grid, "local", progress=False)
    assert [again.status[n] for n, _ in again.points] == ["already run", "already run"]


def test_what_a_cluster_could_not_reproduce_is_refused_before_anything_runs(project, tmp_path, env):
    with pytest.raises(OptlabError, match="expands to no experiment|grid is empty"):
        sweep.grid([])
    (project / "conf/config.yaml").write_text((project / "conf/config.yaml").read_text() + "\n# edited\n")
    try:
        with pytest.raises(OptlabError, match="uncommitted changes"):
            sweep.sweep(project, GRID, "ray", "127.0.0.1:1", progress=False)
    finally:
        sh(project, "git", "checkout", "conf/config.yaml")
    with pytest.raises(OptlabError, match="no git remote 'nowhere'"):
        sweep.sweep(project, GRID, "ray", "127.0.0.1:1", git_remote="nowhere", progress=False)
    # A commit that is not pushed, then a pushed one without a DVC remote.
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone), env=env)
    for key in ("user.name", "user.email"):
        sh(clone, "git", "config", key, "optlab test" if key == "user.name" else "test@optlab.invalid")
    sh(clone, sys.executable, "-m", "dvc", "remote", "remove", "storage", env=env)
    sh(clone, "git", "commit", "-q", "-am", "no DVC remote")
    with pytest.raises(OptlabError, match="is not in any remote branch"):
        sweep.check_repository(clone, "origin")
    sh(clone, "git", "push", "-q", "origin", "HEAD:refs/heads/no-remote", env=env)
    sh(clone, "git", "fetch", "-q", "origin", env=env)
    with pytest.raises(OptlabError, match="no default DVC remote"):
        sweep.check_repository(clone, "origin")
    bare = tmp_path / "bare"
    bare.mkdir()
    sh(bare, "git", "init", "-q")
    (bare / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(OptlabError, match="not an optlab checkout|no git remote"):
        sweep.check_repository(bare, "origin")
    with pytest.raises(OptlabError, match="unknown executor"):
        sweep.sweep(project, GRID, "slurm", progress=False)
    with pytest.raises(OptlabError, match="cannot reach the Ray cluster"):
        sweep.sweep(project, GRID, "ray", "127.0.0.1:1", progress=False)


def test_the_grid_is_dvcs_own_expansion():
    points = sweep.grid(["optimizer=adam,sgd", "seed=range(0,3)", "train.epochs=5"])
    assert len(points) == 6 and ["optimizer=sgd", "seed=2", "train.epochs=5"] in points
    a, b = (sweep.experiment_name("0123456789", p) for p in (["seed=1", "optimizer=sgd"], ["optimizer=sgd", "seed=1"]))
    assert a == b and a.startswith("sweep-0123456") and re.fullmatch(r"[\w-]+", a)
