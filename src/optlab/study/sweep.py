"""``optlab sweep``: a grid of experiments, run by DVC's own queue on this machine, or as Ray tasks on
a cluster of machines, with every experiment brought back to this repository.

The grid is written as for ``dvc exp run --queue -S`` and expanded by DVC's own code (Hydra's
sweep syntax: ``-S 'optimizer=adam,sgd' -S 'seed=range(0,3)'``). Each grid point is one
experiment with a name that depends only on the commit and its params (:func:`experiment_name`),
which is what makes a sweep idempotent: a point whose experiment is already in the git remote is
not run again, so a sweep started again after a crash runs only what is missing.

- ``local``: ``dvc exp run --queue`` for each point, then ``dvc queue start -j N``: DVC's queue,
  supervised until every point is done or has failed (:mod:`optlab.study.sweep_local`): a point
  whose queue worker dies is cleaned up and queued again, and so is a failed one (``--retries``).
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from optlab.core.errors import OptlabError
from optlab.study import queue, shell
from optlab.study.shell import LOG_TAIL

EXECUTORS = ("local", "ray")
PREPARED_STAGES = ("download", "prepare")  # what every point shares: pulled, not recomputed
DONE = ("done", "already run", "pushed", "already pushed")  # what a point that needs nothing more is


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
def ls_remote_experiments(git_remote: str, commit: str) -> list[str]:
    """The git command that lists the experiments of ``commit`` in ``git_remote``: DVC keeps each as
    the ref ``refs/exps/<commit[:2]>/<commit[2:]>/<name>`` (its ``ExpRefInfo``)."""
    from dvc.repo.experiments.refs import ExpRefInfo

    return ["git", "ls-remote", git_remote, f"{ExpRefInfo(commit)}/*"]


def names_of(ls_remote: str) -> set[str]:
    """The experiment names in the output of :func:`ls_remote_experiments`."""
    return {line.rsplit("/", 1)[-1] for line in ls_remote.splitlines() if line.strip()}


def pushed_experiments(repo: Path, git_remote: str, commit: str) -> set[str]:
    """The names of the experiments of ``commit`` that the git remote holds (read with git itself:
    no DVC process to start, and only this commit's refs)."""
    return names_of(shell.run(ls_remote_experiments(git_remote, commit), repo).stdout)


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
    dirty = shell.run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout.strip()
    if dirty:
        raise OptlabError(
            f"uncommitted changes ({', '.join(line[3:] for line in dirty.splitlines()[:5])}): a clone of the git "
            "remote would not see them; commit and push them first"
        )
    url = shell.run(["git", "remote", "get-url", git_remote], repo, check=False)
    if url.returncode != 0:
        raise OptlabError(
            f"no git remote {git_remote!r}: each task clones the repository from it; add one with "
            f"`git remote add {git_remote} <url>` and push (or pass --git-remote)"
        )
    commit = shell.run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    contains = shell.run(["git", "branch", "-r", "--contains", commit], repo, check=False).stdout.strip()
    if not contains:
        raise OptlabError(f"commit {commit[:7]} is not in any remote branch: push it first (`git push {git_remote}`)")
    remote = shell.run(shell.dvc("remote", "default"), repo, check=False)
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
        listed = step(*ls_remote_experiments("origin", checkout.commit))
        if name in names_of(listed.stdout):
            return {"name": name, "status": "already pushed", "log": "\n".join(lines)}
        pulled = step(*shell.dvc("pull", "-q", *PREPARED_STAGES), check=False)
        if pulled.returncode != 0:  # the remote lacks them: compute them here
            step(*shell.dvc("repro", "-q", *PREPARED_STAGES))
        step(*shell.dvc("exp", "run", "--name", name, *[a for o in overrides for a in ("-S", o)]))
        step(*shell.dvc("exp", "push", "origin", name))
        return {"name": name, "status": "pushed", "log": "\n".join(lines)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver --------------------------------------------------------------------------------
@dataclass
class Account:
    """What became of every grid point."""

    points: list[tuple[str, list[str]]]  # (name, overrides), in grid order
    # name -> done | already run (local), pushed | already pushed (ray), failed; never run if absent
    status: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # name -> the tail of its (last try's) log
    tries: dict[str, int] = field(default_factory=dict)  # name -> tries it took, where more than one
    notes: dict[str, list[str]] = field(default_factory=dict)  # name -> how each earlier try ended
    seconds: float = 0.0

    def result(self, name: str) -> str:
        status = self.status.get(name, "never run")
        tries = self.tries.get(name, 1)
        return f"{status} ({tries} tries)" if tries > 1 else status

    def table(self) -> str:
        rows = [f"| {n} | {' '.join(o)} | {self.result(n)} |" for n, o in self.points]
        lines = ["| experiment | params | result |", "|---|---|---|", *rows]
        for name, notes in self.notes.items():
            lines += ["", f"{name}: " + "; ".join(notes)]
        for name, error in self.errors.items():
            lines += ["", f"{name} failed:", error]
        return "\n".join(lines)

    @property
    def failed(self) -> list[str]:
        return [n for n, _ in self.points if self.status.get(n) not in DONE]

    def summary(self) -> str:
        """One line: how many points ended each way, and how many needed more than one try."""
        counts = Counter(self.status.get(n, "never run") for n, _ in self.points)
        parts = [f"{counts[s]} {s}" for s in DONE if counts[s]] + [f"{counts['failed']} failed"]
        parts += [f"{counts['never run']} never run"] if counts["never run"] else []
        retried = sum(1 for n, _ in self.points if self.tries.get(n, 1) > 1)
        again = f" ({retried} tried again)" if retried else ""
        return f"{len(self.points)} experiments in {self.seconds:.0f} s: {', '.join(parts)}{again}"


def sweep(repo: str | Path, sets: Sequence[str], executor: str = "local", address: str | None = None,
          **options) -> Account:  # fmt: skip
    """Run every point of the grid ``sets`` with ``executor``; see the module's docstring and
    :func:`run_points` for the options."""
    return run_points(repo, grid(sets), executor, address, **options)


def run_points(
    repo: str | Path,
    points: Sequence[Sequence[str]],
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
    """Run one experiment per point (its ``-S`` overrides; a sweep's grid, a study's trials) with
    ``executor``, each named by the commit and its overrides, so one that exists is not run again."""
    repo = Path(repo).resolve()
    if executor not in EXECUTORS:
        raise OptlabError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if jobs < 1 or retries < 0:
        raise OptlabError(f"-j must be at least 1 and --retries at least 0 (got -j {jobs}, --retries {retries})")
    commit = shell.head(repo)
    named = [(experiment_name(commit, o), list(o)) for o in points]
    account = Account(list(dict((n, (n, o)) for n, o in named).values()))  # a point listed twice runs once
    started = time.perf_counter()
    if executor == "local":
        from optlab.study import sweep_local

        sweep_local.run(repo, account, jobs, cpus_per_run, retries, progress)
    else:
        _sweep_ray(repo, account, address, cpus_per_run, gpus_per_run, git_remote, retries, log_dir, progress)
    account.seconds = time.perf_counter() - started
    return account


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
    pushed = pushed_experiments(repo, git_remote, checkout.commit)
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
        bar = queue.bar(len(account.points), progress, initial=len(account.points) - len(todo))
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
        shell.run(shell.dvc("exp", "pull", git_remote, *names), repo)
