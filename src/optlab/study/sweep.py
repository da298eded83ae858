"""``optlab sweep``: a grid of experiments, run by DVC's own queue on this machine, or as Ray tasks on
a cluster of machines, with every experiment brought back to this repository.

The grid is written as for ``dvc exp run --queue -S`` and expanded by DVC's own code (Hydra's
sweep syntax: ``-S 'optimizer=adam,sgd' -S 'seed=range(0,3)'``). Each grid point is one
experiment with a name that depends only on the commit and its params (:func:`experiment_name`),
which is what makes a sweep idempotent: a point whose experiment is already in the git remote is
not run again, so a sweep started again after a crash runs only what is missing.

- ``local``: ``dvc exp run --queue`` for each point, then ``dvc queue start -j N``: DVC's queue.
- ``ray``: one Ray task per point (:func:`run_point`): a fresh clone of the git remote at the
  commit, the prepared data from the DVC remote (or the prepare stage where the remote lacks
  it), ``dvc exp run`` with the point's params and name, then ``dvc exp push`` (git refs and
  cached outputs). A task that fails or whose worker dies is retried by Ray (``max_retries``),
  then reported with the tail of its log. The driver pulls every pushed experiment back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from optlab.core.errors import OptlabError

EXECUTORS = ("local", "ray")
PREPARED_STAGES = ("download", "prepare")  # what every point shares: pulled, not recomputed
LOG_TAIL = 2000  # characters of a failed task's log in the account
QUEUE_IDLE_S = 120  # queued experiments and no DVC queue worker this long: an error, not a wait


# --- the grid ---------------------------------------------------------------------------------
def grid(sets: Sequence[str]) -> list[list[str]]:
    """The experiments of ``-S`` overrides, each as its list of overrides, by DVC's own expansion
    (``dvc exp run --queue`` expands them the same way)."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import get_hydra_sweeps, to_hydra_overrides

    if not sets:
        raise OptlabError("the grid is empty: give it at least one -S, e.g. -S 'optimizer=adam,sgd'")
    by_path = to_path_overrides(list(sets))
    sweeping = any(o.is_sweep_override() for ovs in by_path.values() for o in to_hydra_overrides(ovs))
    points = get_hydra_sweeps(by_path) if sweeping else [by_path]
    out = []
    for point in points:
        out.append([o if path == "params.yaml" else f"{path}:{o}" for path, ovs in point.items() for o in ovs])
    if not out or not all(out):
        raise OptlabError(f"the grid {' '.join(sets)} expands to no experiment")
    return out


def experiment_name(commit: str, overrides: Sequence[str]) -> str:
    """A name that depends on the commit and the params only: the same point of the same sweep has
    the same name on every machine and every try."""
    digest = hashlib.sha256(json.dumps(sorted(overrides)).encode()).hexdigest()[:10]
    return f"sweep-{commit[:7]}-{digest}"


# --- git and DVC around the repository ---------------------------------------------------------
def _run(args: Sequence[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        list(args), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
    )
    if check and done.returncode != 0:
        raise OptlabError(f"`{' '.join(args)}` failed in {cwd}: {(done.stderr or done.stdout).strip()[-LOG_TAIL:]}")
    return done


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def pushed_experiments(repo: Path, git_remote: str) -> set[str]:
    """The names of the experiments the git remote holds (``dvc exp list <remote>``)."""
    done = _run(_dvc("exp", "list", "--all-commits", "--name-only", git_remote), repo)
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


@dataclass(frozen=True)
class Checkout:
    """What a remote task needs to rebuild this repository: the remote's URL and the commit."""

    url: str
    commit: str
    git_remote: str


def check_repository(repo: Path, git_remote: str) -> Checkout:
    """Refuse, before anything is submitted, what a remote clone could not reproduce."""
    if not (repo / ".git").exists() or not (repo / "dvc.yaml").is_file():
        raise OptlabError(f"{repo} is not an optlab checkout (a git repository with dvc.yaml)")
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout.strip()
    if dirty:
        raise OptlabError(
            f"uncommitted changes ({', '.join(line[3:] for line in dirty.splitlines()[:5])}): a clone of the git "
            "remote would not see them; commit and push them first"
        )
    url = _run(["git", "remote", "get-url", git_remote], repo, check=False)
    if url.returncode != 0:
        raise OptlabError(
            f"no git remote {git_remote!r}: each task clones the repository from it; add one with "
            f"`git remote add {git_remote} <url>` and push (or pass --git-remote)"
        )
    commit = _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    contains = _run(["git", "branch", "-r", "--contains", commit], repo, check=False).stdout.strip()
    if not contains:
        raise OptlabError(f"commit {commit[:7]} is not in any remote branch: push it first (`git push {git_remote}`)")
    remote = _run(_dvc("remote", "default"), repo, check=False)
    if remote.returncode != 0 or not remote.stdout.strip():
        raise OptlabError(
            "no default DVC remote: each task pulls the prepared data from it and pushes its outputs to it; add one "
            "with `dvc remote add -d storage <url>`, commit .dvc/config and push"
        )
    return Checkout(url.stdout.strip(), commit, git_remote)


# --- one grid point, on a Ray worker ------------------------------------------------------------
class PointFailed(RuntimeError):
    """A grid point's experiment could not be run or pushed; the message ends with its log."""


def _die_with_parent() -> None:
    """In a task's child processes: end when the task's worker ends (Linux), so a killed worker
    leaves no `dvc exp run` behind to finish on its own."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_point(checkout: Checkout, overrides: Sequence[str], name: str, threads: int, log_dir: str | None) -> dict:
    """Clone, get the prepared data, run the experiment, push it. Idempotent: an experiment the
    remote already holds is left alone. Runs as a Ray task (any process with git, DVC and optlab)."""
    log_path = Path(log_dir) / f"{name}.log" if log_dir else None
    # A retry (Ray's, after a lost worker) appends to the log of the tries before it.
    before = log_path.read_text().splitlines() if log_path is not None and log_path.exists() else []
    lines: list[str] = [*before, f"pid {os.getpid()} on {os.uname().nodename}: {name} {' '.join(overrides)}"]

    def say(text: str) -> None:
        lines.append(text)
        if log_path is not None:
            log_path.write_text("\n".join(lines) + "\n")

    say(lines.pop())
    work = Path(tempfile.mkdtemp(prefix="optlab-sweep-"))
    # The stages run the commit's own package (the clone's src/), with this interpreter's tools.
    env = {
        "OPTLAB_THREADS": str(threads),
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(work / "repo" / "src"), os.environ.get("PYTHONPATH")])),
    }
    try:

        def step(*args: str, check: bool = True) -> subprocess.CompletedProcess:
            say(f"$ {' '.join(args)}")
            done = subprocess.run(
                args, cwd=work / "repo", env={**os.environ, **env}, capture_output=True, text=True,
                preexec_fn=_die_with_parent, check=False,
            )  # fmt: skip
            say((done.stdout + done.stderr).strip()[-LOG_TAIL:])
            if check and done.returncode != 0:
                raise PointFailed(
                    f"{name}: `{' '.join(args)}` exited {done.returncode}\n" + "\n".join(lines)[-LOG_TAIL:]
                )
            return done

        (work / "repo").mkdir()
        step("git", "clone", "-q", checkout.url, ".")
        step("git", "checkout", "-q", checkout.commit)
        listed = step(*_dvc("exp", "list", "--all-commits", "--name-only", "origin"))
        if name in listed.stdout.split():
            return {"name": name, "status": "already pushed", "log": "\n".join(lines)}
        pulled = step(*_dvc("pull", "-q", *PREPARED_STAGES), check=False)
        if pulled.returncode != 0:  # the remote lacks them: compute them here
            step(*_dvc("repro", "-q", *PREPARED_STAGES))
        step(*_dvc("exp", "run", "--name", name, *[a for o in overrides for a in ("-S", o)]))
        step(*_dvc("exp", "push", "origin", name))
        return {"name": name, "status": "pushed", "log": "\n".join(lines)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver --------------------------------------------------------------------------------
@dataclass
class Account:
    """What became of every grid point."""

    points: list[tuple[str, list[str]]]  # (name, overrides), in grid order
    status: dict[str, str] = field(default_factory=dict)  # name -> pushed | already pushed | failed | never run
    errors: dict[str, str] = field(default_factory=dict)  # name -> the tail of its log
    seconds: float = 0.0

    def table(self) -> str:
        rows = [f"| {n} | {' '.join(o)} | {self.status.get(n, 'never run')} |" for n, o in self.points]
        lines = ["| experiment | params | result |", "|---|---|---|", *rows]
        for name, error in self.errors.items():
            lines += ["", f"{name} failed:", error]
        return "\n".join(lines)

    @property
    def failed(self) -> list[str]:
        return [
            n for n, _ in self.points if self.status.get(n) not in ("pushed", "already pushed", "already run", "done")
        ]


def sweep(
    repo: str | Path,
    sets: Sequence[str],
    executor: str = "local",
    address: str | None = None,
    jobs: int = 2,
    cpus_per_run: int = 1,
    gpus_per_run: float = 0,
    git_remote: str = "origin",
    retries: int = 2,
    log_dir: str | Path | None = None,
    progress: bool = True,
) -> Account:
    """Run every point of the grid ``sets`` with ``executor``; see the module's docstring."""
    repo = Path(repo).resolve()
    if executor not in EXECUTORS:
        raise OptlabError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    points = grid(sets)
    commit = _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    named = [(experiment_name(commit, o), o) for o in points]
    account = Account(named)
    started = time.perf_counter()
    if executor == "local":
        _sweep_local(repo, account, jobs, cpus_per_run, progress)
    else:
        _sweep_ray(repo, account, address, cpus_per_run, gpus_per_run, git_remote, retries, log_dir, progress)
    account.seconds = time.perf_counter() - started
    return account


def _sweep_local(repo: Path, account: Account, jobs: int, threads: int, progress: bool) -> None:
    """DVC's own queue on this machine."""
    # DVC's queue workers, and the `python` of each stage, from this interpreter's environment
    # (a venv used without activating it would otherwise leave them to whatever PATH finds).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {"OPTLAB_THREADS": str(threads), "DVC_NO_ANALYTICS": "1", "PATH": path}
    existing = set(_run(_dvc("exp", "list", "--all-commits", "--name-only"), repo).stdout.split())
    todo = []
    for name, overrides in account.points:
        if name in existing:
            account.status[name] = "already run"  # an experiment of this repository already
            continue
        _run(_dvc("exp", "run", "--queue", "--name", name, *[a for o in overrides for a in ("-S", o)]), repo, env)
        todo.append(name)
    if todo:
        _run(_dvc("queue", "start", "-j", str(jobs)), repo, env)
    bar = _bar(len(account.points), progress, initial=len(account.points) - len(todo))
    idle_since = None
    try:
        while todo:
            status = _queue_status(repo)
            if status.get("Worker") == "0" and not any(status.get(n) == "Running" for n in todo):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > QUEUE_IDLE_S:
                    raise OptlabError(
                        f"DVC's queue has {len(todo)} experiments queued and no worker for {QUEUE_IDLE_S} s: see "
                        "`dvc queue status` and `dvc queue logs <name>`; `dvc queue start -j N` starts workers"
                    )
            else:
                idle_since = None
            for name in list(todo):
                state = status.get(name)
                if state in ("Success", "Failed"):
                    todo.remove(name)
                    account.status[name] = "done" if state == "Success" else "failed"
                    if state == "Failed":
                        account.errors[name] = _run(_dvc("queue", "logs", name), repo, check=False).stdout[-LOG_TAIL:]
                    bar.update(1)
            running = sum(1 for n in todo if status.get(n) == "Running")
            bar.set_postfix(running=running, failed=len(account.errors))
            time.sleep(1)
    finally:
        bar.close()
        _run(_dvc("queue", "stop"), repo, check=False)


def _queue_status(repo: Path) -> dict[str, str]:
    out = _run(_dvc("queue", "status"), repo).stdout.splitlines()
    status = {}
    for line in out[1:]:
        words = line.split()
        if line.startswith("Worker status:") and len(words) >= 3:
            status["Worker"] = words[2]  # "Worker status: N active, M idle"
        elif len(words) >= 2:
            status[words[1]] = words[-1]
    return status


def _bar(total: int, shown: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not shown, unit="exp", desc="sweep", file=sys.stderr)


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Refuse an unreachable head node in seconds (ray.init retries a dead address for minutes)."""
    if not address or address == "auto" or "://" in address:
        return  # a local cluster, the one this machine runs, or Ray Client: ray.init checks those
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise OptlabError(f"--address {address!r} is not host:port (e.g. 10.0.0.5:6379, the head's `ray start` port)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise OptlabError(
            f"cannot reach the Ray cluster at {address}: {exc}; start its head with `ray start --head --port={port}`"
            " and check the address, or leave --address out to run on a local cluster"
        ) from None


def _sweep_ray(repo, account, address, cpus, gpus, git_remote, retries, log_dir, progress) -> None:
    try:
        import ray
    except ImportError:
        raise OptlabError("the ray executor needs Ray: pip install 'optlab[ray]' (make install includes it)") from None
    checkout = check_repository(repo, git_remote)
    pushed = pushed_experiments(repo, git_remote)
    todo = [(n, o) for n, o in account.points if n not in pushed]
    for name, _ in account.points:
        if name in pushed:
            account.status[name] = "already pushed"
    address = address or os.environ.get("RAY_ADDRESS")
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False, include_dashboard=False) if address else ray.init(
            log_to_driver=False, include_dashboard=False
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise OptlabError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=True)(run_point)
        threads = max(1, int(cpus))
        logs = str(Path(log_dir).resolve()) if log_dir else None
        if logs:
            Path(logs).mkdir(parents=True, exist_ok=True)
        refs = {task.remote(checkout, o, n, threads, logs): n for n, o in todo}
        bar = _bar(len(account.points), progress, initial=len(account.points) - len(todo))
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1, timeout=5.0)
            for ref in done:
                name = refs[ref]
                try:
                    account.status[name] = ray.get(ref)["status"]
                except Exception as exc:  # noqa: BLE001 (a task's failure, after Ray's retries, is reported)
                    account.status[name] = "failed"
                    account.errors[name] = str(exc)[-LOG_TAIL:]
                bar.update(1)
            bar.set_postfix(running=len(waiting), failed=len(account.errors))
        bar.close()
    finally:
        ray.shutdown()
    names = [n for n, _ in account.points if account.status.get(n) in ("pushed", "already pushed")]
    if names:
        _run(_dvc("exp", "pull", git_remote, *names), repo)
