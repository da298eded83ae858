"""optlab sweep on a real local Ray cluster (started here: `ray start --head` with 2 CPUs, so two
worker processes run tasks at once), with a local bare git repository as the git remote and a
local directory as the DVC remote: every experiment pushed once, pulled back by a separate clone
and ranked by optlab compare, with a worker killed mid-run and its task retried; a repeated
sweep that trains nothing; and what is refused before anything is submitted.

And on DVC's own queue (``--executor local``): a sweep whose queue worker is SIGKILLed while it
trains still runs every point exactly once; the DVC internals that relies on, on a tiny DVC
project whose stage sleeps; and the pieces that need no DVC (the verdict on a running task, the
Celery log, the account)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, write_experiment
from optlab.core.errors import OptlabError
from optlab.study import experiments, queue, sweep

slow = pytest.mark.slow
# The tests that share the module's project (and its Ray cluster) run on one xdist worker.
shared_project = pytest.mark.xdist_group("sweep-project")
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is optlab's [ray] extra, which make install installs"
)

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
    from project import copy_checkout

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


GRID = ["optimizer=adam,sgd", "seed=0"]  # two points: one runs while the other is killed and retried


def _remote_experiments(project: Path, env: dict) -> list[str]:
    refs = sh(project, "git", "ls-remote", "origin", "refs/exps/*", env=env)
    return [line.rsplit("/", 1)[-1] for line in refs.splitlines()]


@slow
@needs_ray
@shared_project
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
    print(f"\n[record] 2 experiments on a 2-CPU local Ray cluster, one worker killed: {seconds:.0f} s")
    assert killed, f"no task was caught mid-run:\n{out}"
    assert proc.returncode == 0, out
    assert out.count("| pushed |") == 2 and "0 failed" in out, out
    pushed = _remote_experiments(project, env)
    assert sorted(pushed) == sorted(names)  # the killed one retried: none lost, none duplicated
    assert (logs / f"{killed}.log").read_text().count("pid ") >= 2, "the killed task was not tried again"

    # The same sweep again (here, not in a test of its own that would depend on this one): every
    # point is already in the remote, and nothing trains.
    started = time.perf_counter()
    again = sweep.sweep(project, GRID, "ray", cluster, progress=False)
    print(f"\n[record] the same sweep again: {time.perf_counter() - started:.1f} s")
    if [again.status[n] for n, _ in again.points] != ["already pushed"] * 2 or again.failed:
        # What the remote held, by git and by DVC, so that the failure says why.
        pytest.fail(
            f"the repeated sweep: {again.status}; HEAD {sh(project, 'git', 'rev-parse', 'HEAD').strip()}; "
            f"points {again.points}; remote refs {sh(project, 'git', 'ls-remote', 'origin', 'refs/exps/*')!r}; "
            f"dvc exp list: {_dvc_cmd(project, 'exp', 'list', '--all-commits', '--name-only', 'origin', env=env)!r}"
        )

    # A separate clone pulls every experiment, with its metrics, and optlab compare ranks them.
    other = tmp_path / "other"
    sh(tmp_path, "git", "clone", "-q", str(project / ".." / "remote.git"), str(other), env=env)
    sh(other, sys.executable, "-m", "dvc", "exp", "pull", "origin", *names, env=env)
    shown = sh(other, sys.executable, "-m", "dvc", "exp", "show", "--csv", "--all-commits", env=env)
    assert all(n in shown for n in names)
    from optlab.study import cli

    assert cli.main(["compare", "--repo", str(other), "--all-commits", "--baseline", names[0]]) == 0
    report = (other / "reports/compare.md").read_text()
    # Both variants, ranked: the baseline, and the other named by what it changes.
    assert "2 runs in 2 variants" in report and "| baseline |" in report
    assert ("optimizer=sgd" in report) != ("optimizer=adam" in report), report


@slow
@needs_ray
@shared_project
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


# --- --executor local: DVC's queue, supervised --------------------------------------------------
def _dvc_cmd(cwd: Path, *args: str, env: dict) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args, env=env)


def _kill_a_training_worker(repo: Path) -> str | None:
    """SIGKILL the queue worker of an experiment whose train stage runs; its name, or None."""
    snap = queue.snapshot(repo)
    for entry in snap.entries:
        executor = snap.executors.get(entry.rev)
        if executor is None or not executor.alive or executor.parent not in snap.workers:
            continue
        with contextlib.suppress(psutil.Error):
            stages = psutil.Process(executor.pid).children(recursive=True)
            if any("stages/train.py" in " ".join(p.cmdline()) for p in stages):
                os.kill(executor.parent, signal.SIGKILL)
                return entry.name
    return None


def _queue_leftovers(repo: Path, names: list[str]) -> list[str]:
    """This sweep's tasks still queued or running, and executor processes still alive."""
    snap = queue.snapshot(repo)
    left = [f"{e.name} {e.state}" for e in snap.entries if e.name in names and e.state != queue.FINISHED]
    for p in psutil.process_iter(["cmdline"]):
        if "exec-run" in (p.info["cmdline"] or []) and str(repo) in " ".join(p.info["cmdline"]):
            left.append(f"executor {p.pid} alive")
    return left


LOCAL_GRID = ["optimizer=adam", "seed=range(20,22)"]  # two points, both trained at once: one worker killed


@slow
@shared_project
def test_a_local_sweep_whose_queue_worker_is_killed_still_runs_every_point_once(project, env):
    commit = sh(project, "git", "rev-parse", "HEAD").strip()
    names = [sweep.experiment_name(commit, p) for p in sweep.grid(LOCAL_GRID)]
    cmd = [sys.executable, "-m", "optlab.study.cli", "sweep", *[a for g in LOCAL_GRID for a in ("-S", g)],
           "-j", "2", "--repo", str(project)]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})  # fmt: skip
    killed, deadline = None, time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        killed = _kill_a_training_worker(project)
        time.sleep(0.5)
    out = proc.communicate(timeout=900)[0]
    seconds = time.perf_counter() - started
    print(f"\n[record] 2 digits experiments on DVC's queue -j 2, a worker SIGKILLed while it trained: {seconds:.0f} s")
    assert killed in names, f"no worker was caught while it trained:\n{out}"
    assert proc.returncode == 0, out
    assert f"optlab sweep: {killed}: Running, but no live queue worker holds it" in out, out
    assert re.search(rf"\| {killed} \| .* \| done \((2|3) tries\) \|", out), out
    assert out.count(" | done") == 2 and "2 done, 0 failed" in out, out
    listed = _dvc_cmd(project, "exp", "list", "--all-commits", "--name-only", env=env).split()
    assert sorted(n for n in listed if n in names) == sorted(names)  # each point once: none lost, none twice
    shown = json.loads(_dvc_cmd(project, "exp", "show", "--json", env=env))
    shown_names = [r.get("name") for b in shown for e in (b.get("experiments") or []) for r in e["revs"]]
    assert sorted(n for n in shown_names if n in names) == sorted(names)
    assert _queue_leftovers(project, names) == []  # nothing stuck Running or Queued, no orphan left

    started = time.perf_counter()
    again = sweep.sweep(project, LOCAL_GRID, "local", jobs=2, progress=False)
    assert [again.status[n] for n, _ in again.points] == ["already run"] * 2 and not again.failed
    assert "2 already run, 0 failed" in again.summary()
    print(f"\n[record] the same sweep again: {time.perf_counter() - started:.1f} s")


@slow
@shared_project
def test_a_point_dvc_cannot_queue_is_refused_with_its_reason_and_leaves_nothing(project):
    status = sh(project, "git", "status", "--porcelain")
    before = queue.snapshot(project).entries
    with pytest.raises(OptlabError) as refused:
        queue.queue_points(project, [("typo", ["optimizer.learnin_rate=0.1"])])
    assert "could not queue typo: `dvc exp run --queue --name typo -S 'optimizer.learnin_rate=0.1'` failed: " \
        "Could not override 'optimizer.learnin_rate'" in str(refused.value)  # fmt: skip
    assert queue.snapshot(project).entries == before and sh(project, "git", "status", "--porcelain") == status


@pytest.fixture
def napping(tmp_path, env) -> Path:
    """A tiny git + DVC project whose one stage sleeps `nap` seconds: DVC's queue without training."""
    root = tmp_path / "napping"
    root.mkdir()
    (root / "params.yaml").write_text("nap: 60\n")
    nap = "import time, yaml\ntime.sleep(yaml.safe_load(open('params.yaml'))['nap'])\nopen('out.txt', 'w').write('z')\n"
    (root / "nap.py").write_text(nap)
    (root / "dvc.yaml").write_text(
        "stages:\n  nap:\n    cmd: python nap.py\n    deps: [nap.py]\n    params: [nap]\n    outs: [out.txt]\n"
    )
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "config", "user.name", "optlab test")
    sh(root, "git", "config", "user.email", "test@optlab.invalid")
    _dvc_cmd(root, "init", "-q", env=env)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "a stage that naps")
    return root


def _wait_for(what, timeout: float = 180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := what():
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what.__doc__}")


@slow
def test_the_dvc_queue_internals_the_sweep_relies_on(napping, env, monkeypatch):
    """What optlab.study.queue reads and repairs (its docstring lists it), on the installed DVC:
    written against dvc 3.67.1 and dvc-task 0.40.2, it fails if an upgrade changes one."""
    # Queued through the call `dvc exp run --queue` makes (its -S overrides as `params`).
    from dvc.commands.experiments.run import CmdExperimentsRun
    from dvc.repo.experiments.queue.base import BaseStashQueue
    from dvc.repo.experiments.run import run

    assert {"params", "queue"} <= set(inspect.signature(run).parameters)
    assert "name" in inspect.signature(BaseStashQueue._stash_exp).parameters  # through run's **kwargs
    assert "self.repo.experiments.run(" in inspect.getsource(CmdExperimentsRun.run)
    monkeypatch.chdir(napping.parent)  # queued from elsewhere: DVC writes the overrides into the project only
    queue.queue_points(napping, [("long", ["nap=120"])])
    assert [p.name for p in napping.parent.iterdir()] == ["napping"]
    (entry,) = queue.snapshot(napping).of("long")
    assert entry.state == queue.QUEUED and re.fullmatch(r"[0-9a-f]{40}", entry.rev)
    queue.start_workers(napping, 1, env)

    def napping_executor():
        """the stage to run under a live executor"""
        snap = queue.snapshot(napping)
        ex = snap.executors.get(entry.rev)
        kids = psutil.Process(ex.pid).children(recursive=True) if ex and ex.alive else []
        return (snap, ex) if any("nap.py" in " ".join(k.cmdline()) for k in kids) else None

    snap, executor = _wait_for(napping_executor)
    (running,) = snap.of("long")
    (worker,) = snap.workers
    assert running.state == queue.RUNNING and running.task_id
    assert executor.parent == worker and re.fullmatch(r"dvc-exp-[0-9a-f]{6}-1@localhost", snap.workers[worker])
    assert queue.verdict(executor, snap.workers) == queue.HELD == snap.verdict(running)
    run_dir = napping / ".dvc/tmp/exps/run" / entry.rev
    assert {p.name for p in run_dir.iterdir()} >= {f"{entry.rev}{ext}" for ext in (".json", ".out", ".run")}
    copy = Path(json.loads((run_dir / f"{entry.rev}.run").read_text())["root_dir"])
    assert copy.parent == napping / ".dvc/tmp/exps" and copy.is_dir()
    assert queue.recover(napping, running, snap) is False  # its live worker holds it: nothing touched
    assert psutil.Process(executor.pid).is_running() and run_dir.is_dir()

    os.kill(worker, signal.SIGKILL)
    _wait_for(lambda: not queue.snapshot(napping).workers)
    snap = queue.snapshot(napping)
    orphan = snap.executors[entry.rev]
    assert [e.state for e in snap.of("long")] == [queue.RUNNING]  # what DVC still says, for ever
    assert orphan.alive and snap.verdict(snap.of("long")[0]) == queue.ORPHANED
    # Its files gone too (its executor ended, as after a Ctrl-C): DVC still counts the task active and
    # cannot read it; optlab reads every other experiment, at once.
    info = run_dir / f"{entry.rev}.run"
    info.rename(run_dir / "kept")
    started = time.monotonic()
    shown = experiments.exp_show(napping)
    assert time.monotonic() - started < experiments.SHOW_PATIENCE_S and len(shown) == 1, shown
    assert not any(state.get("name") == "long" for state in experiments.iter_states(shown))
    (run_dir / "kept").rename(info)
    _dvc_cmd(napping, "queue", "stop", env=env)  # a shutdown for every worker, waiting in the dead one's queue
    assert queue.clean_broker(napping, snap.workers) >= 1
    inbox = napping / ".dvc/tmp/exps/celery/broker/in"
    assert not [p for p in inbox.iterdir() if "@localhost.celery.pidbox" in p.name]
    assert queue.recover(napping, snap.of("long")[0], snap) is True
    assert not psutil.pid_exists(orphan.pid) or psutil.Process(orphan.pid).status() == psutil.STATUS_ZOMBIE
    assert queue.snapshot(napping).of("long") == [] and not run_dir.exists() and not copy.exists()

    # The queue works again, and one worker runs both (a stale shutdown would stop it after one).
    queue.queue_points(napping, [(name, ["nap=1"]) for name in ("short", "long")])
    queue.start_workers(napping, 1, env)

    def both_done():
        """both experiments in the repository, and DVC's queue done with them"""
        snap = queue.snapshot(napping)
        # DVC writes an experiment's ref before its queue marks the task finished: wait for both.
        done = {"short", "long"} <= snap.experiments and all(e.state != queue.RUNNING for e in snap.of("long"))
        return snap if done else None

    snap = _wait_for(both_done)
    assert [e.state for e in snap.of("long")] == [queue.FINISHED]
    assert "Reproducing experiment 'long'" in queue.log_tail(napping, snap.of("long")[0])  # dvc queue logs


def test_a_running_task_is_orphaned_once_its_worker_is_gone():
    worker, other = 100, 200
    assert queue.verdict(queue.Proc(7, alive=True, parent=worker), {worker: "n-1"}) == queue.HELD
    assert queue.verdict(queue.Proc(7, alive=True, parent=1), {other: "n-2"}) == queue.ORPHANED  # reparented
    assert queue.verdict(queue.Proc(7, alive=False), {}) == queue.ORPHANED
    assert queue.verdict(None, {}) == queue.ORPHANED  # taken, then its worker died before starting it
    # No executor process while a worker runs no other task: copying the repository for it, or collecting it.
    assert queue.verdict(None, {other: "n-2"}) == queue.UNSURE
    assert queue.verdict(queue.Proc(7, alive=False), {other: "n-2"}, busy=()) == queue.UNSURE
    # Every live worker runs another task's executor: this one's worker is gone.
    assert queue.verdict(None, {worker: "n-1", other: "n-2"}, busy={worker, other}) == queue.ORPHANED
    assert queue.verdict(None, {worker: "n-1", other: "n-2"}, busy={worker}) == queue.UNSURE


class _Control:
    """Celery's ``app.control`` as the stop sees it: workers that answer a ping from their
    ``listening_from``-th round on (a worker still starting), and the shutdowns sent."""

    def __init__(self, listening_from: dict[str, int], interrupt_at: int | None = None):
        self.listening_from, self.interrupt_at = listening_from, interrupt_at
        self.rounds, self.shutdowns = 0, []

    def ping(self, destination, timeout, limit):
        self.rounds += 1
        if self.rounds == self.interrupt_at:
            raise KeyboardInterrupt  # a second Ctrl-C while the stop waits
        return [{n: {"ok": "pong"}} for n in destination if self.listening_from[n] <= self.rounds]

    def shutdown(self, destination):
        self.shutdowns.append((self.rounds, sorted(destination)))


def test_the_stop_waits_until_every_worker_listens(monkeypatch):
    def stop(control: _Control, wait_s: float = 15.0) -> _Control:
        fake = type("Q", (), {"wdir": "w", "celery": type("App", (), {"control": control})()})()
        monkeypatch.setattr(queue, "_celery_queue", lambda repo: contextlib.nullcontext(fake))
        monkeypatch.setattr(queue, "_live_workers", lambda prefix: {1: "n-1", 2: "n-2"})
        queue.stop_workers(REPO, wait_s=wait_s)
        return control

    # n-2 answers only from the third round: the stop goes out then, to both.
    assert stop(_Control({"n-1": 1, "n-2": 3})).shutdowns == [(3, ["n-1", "n-2"])]
    # A second Ctrl-C, or a worker that never answers: the stop goes out at once, to both.
    assert stop(_Control({"n-1": 1, "n-2": 99}, interrupt_at=2)).shutdowns == [(2, ["n-1", "n-2"])]
    assert stop(_Control({"n-1": 1, "n-2": 99}), wait_s=0).shutdowns == [(0, ["n-1", "n-2"])]


CELERY_LOG = """[2026-12-01 20:50:14,772: INFO/MainProcess] dvc-exp-58aae1-1@localhost ready.
[2026-12-01 20:50:14,773: INFO/MainProcess] Task dvc.repo.experiments.queue.tasks.run_exp[abc-1] received
[2026-12-01 20:50:15,001: ERROR/MainProcess] Task dvc.repo.experiments.queue.tasks.run_exp[abc-1] raised: LockError()
Traceback (most recent call last):
  File "celery/app/trace.py", line 453, in trace_task
dvc.lock.LockError: '.dvc/tmp/exps/refs/exps/celery/stash' is busy
[2026-12-01 20:50:16,000: INFO/MainProcess] Task dvc.repo.experiments.queue.tasks.run_exp[def-2] received
"""


def test_a_tasks_lines_are_found_in_the_celery_worker_log():
    lines = queue.task_lines(CELERY_LOG, "abc-1").splitlines()
    assert lines[0].endswith("run_exp[abc-1] received") and lines[-1].startswith("dvc.lock.LockError")
    assert len(lines) == 5 and queue.task_lines(CELERY_LOG, "zzz") == ""
    # A worker's control messages, by kombu's file name; replies and tasks are no worker's.
    assert queue._pidbox_node("4032785_2541ff86.dvc-exp-3fd326-1@localhost.celery.pidbox.msg") == (
        "dvc-exp-3fd326-1@localhost"
    )
    assert not queue._pidbox_node("2815251_c815d125.01672884-e9dd.reply.celery.pidbox.msg").startswith("dvc-exp")
    assert queue._pidbox_node("2798921_55b9f448.celery.msg") == ""
    assert queue.node_prefix("/r/.dvc/tmp/exps/celery").startswith("dvc-exp-")


def test_the_account_names_what_became_of_every_point():
    points = [(f"sweep-0123456-{i}", [f"seed={i}"]) for i in range(5)]
    account = sweep.Account(points, seconds=61.4)
    account.status.update({points[0][0]: "done", points[1][0]: "already run", points[2][0]: "done",
                           points[3][0]: "failed"})  # fmt: skip
    account.tries[points[2][0]] = 2
    account.notes[points[2][0]] = ["try 1: its DVC queue worker died while it ran"]
    account.errors[points[3][0]] = "Traceback ...\nValueError: bad"
    table = account.table()
    assert "| sweep-0123456-0 | seed=0 | done |" in table and "| sweep-0123456-1 | seed=1 | already run |" in table
    assert "| sweep-0123456-2 | seed=2 | done (2 tries) |" in table
    assert "| sweep-0123456-4 | seed=4 | never run |" in table
    assert "sweep-0123456-2: try 1: its DVC queue worker died" in table
    assert "sweep-0123456-3 failed:\nTraceback ...\nValueError: bad" in table
    assert account.failed == ["sweep-0123456-3", "sweep-0123456-4"]
    assert account.summary() == ("5 experiments in 61 s: 2 done, 1 already run, 1 failed, 1 never run (1 tried again)")
    with pytest.raises(OptlabError, match="--retries at least 0"):
        sweep.sweep(REPO, ["seed=1"], "local", retries=-1, progress=False)


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(monkeypatch, capsys):
    from optlab.study import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "sweep", interrupted)  # Ctrl-C while the sweep supervises its queue
    assert cli.main(["sweep", "-S", "seed=1,2", "--repo", str(REPO)]) == cli.EXIT_INTERRUPTED == 130
    said = capsys.readouterr().err
    assert "optlab sweep: interrupted" in said and "Run the same command again" in said and "Traceback" not in said
