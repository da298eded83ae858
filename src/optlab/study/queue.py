"""DVC's experiment queue on this machine, read and repaired: what ``optlab sweep --executor local``
needs to see an experiment whose queue worker died, and to clean up after it.

DVC runs a queued experiment in three processes: a Celery worker (``dvc exp queue-worker``, one
per ``dvc queue start -j``), its child the executor (``dvc exp exec-run``), and the stages under
that. If the worker is killed, nothing marks the experiment done: ``dvc queue status`` shows it
Running for ever, the executor (orphaned) may finish training but its result is never collected,
and ``Worker status: 0 active`` leaves the rest queued. This module tells such an experiment
apart from a healthy one by its processes, cleans it up the way DVC's maintainers advise (what
``dvc queue kill`` does for a task no worker holds, then ``dvc queue remove``; its run directory
and temporary copy; stale Celery control messages, as ``dvc exp clean`` and treeverse/dvc#10427
and #10562), and reads a failed experiment's log (``dvc queue logs``, or DVC's Celery worker logs
where that is empty: treeverse/dvc#10673, #10779).

DVC internals this relies on, checked against dvc 3.67.1, dvc-task 0.40.2 and kombu 5.7.0
(``tests/test_sweep.py::test_the_dvc_queue_internals_the_sweep_relies_on`` fails if they change):

- ``LocalCeleryQueue``: ``iter_queued()``; ``_iter_processed()`` (a taken task's broker message,
  whose ``id`` header is its Celery task id); ``proc`` (``.dvc/tmp/exps/run/<rev>/<rev>.json``:
  the executor's pid and return code, ``<rev>.out``: what ``dvc queue logs`` prints;
  ``<rev>.run``: the executor info, whose ``root_dir`` is its temporary copy);
  ``_mark_inactive_tasks_failure`` (what ``dvc queue kill`` does when the process is gone);
  ``remove`` (``dvc queue remove``); ``celery.clean()`` (``dvc exp clean``); ``wdir``
  (``.dvc/tmp/exps/celery``: ``broker/in/*.msg`` and the workers' logs ``dvc-exp-worker-<n>.out``).
- A worker's command line ends ``exp queue-worker dvc-exp-<sha256(wdir)[:6]>-<n>@localhost``; its
  executors are its children and run ``dvc exp exec-run``.
- ``Repo.experiments.run(params=[...], queue=True, name=...)``: the call ``dvc exp run --queue
  --name <name> -S ...`` makes (``CmdExperimentsRun``), which queues the workspace with the
  overrides applied.
- kombu's filesystem transport names a message ``<stamp>_<uuid>.<queue>.msg``, and a worker's
  control queue is ``<node>.celery.pidbox``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil  # DVC's own dependency (its rwlock checks pids with it)

from optlab.core.errors import OptlabError
from optlab.study import blobio, shell

QUEUED, RUNNING, FINISHED = "queued", "running", "finished"
HELD, ORPHANED, UNSURE = "held", "orphaned", "unsure"
PIDBOX_SUFFIX = ".celery.pidbox.msg"
INSPECT_S = 5.0  # how long Celery's workers get to say which tasks they run
STOP_WAIT_S = 15.0  # how long a stop waits for a worker that is still starting to listen
NO_LOG = "(no log: neither `dvc queue logs` nor DVC's Celery worker logs mention this run)"


@dataclass(frozen=True)
class Entry:
    """One task of DVC's queue: an experiment queued, taken by a worker, or finished."""

    name: str | None
    rev: str  # the stash commit DVC knows the task by (`dvc queue status` shows its first 7)
    state: str  # queued | running (a worker took it, no result yet) | finished
    task_id: str | None = None  # Celery's id, once a worker took it


@dataclass(frozen=True)
class Proc:
    """A running experiment's executor process (``dvc exp exec-run``)."""

    pid: int
    alive: bool
    parent: int | None = None  # its parent's pid while it lives: the queue worker that runs it


@dataclass(frozen=True)
class Snapshot:
    """DVC's queue at one moment: its tasks, the experiments in the repository, the live workers."""

    entries: list[Entry]
    experiments: set[str]  # names of the repository's experiments (their git refs)
    workers: dict[int, str]  # pid -> Celery node name of each live queue worker of this repository
    executors: dict[str, Proc | None]  # rev -> executor of each running task (None: none yet)

    def of(self, name: str) -> list[Entry]:
        return [e for e in self.entries if e.name == name]

    def count(self, state: str) -> int:
        return sum(e.state == state for e in self.entries)

    @property
    def busy(self) -> set[int]:
        """The live workers that run a task's executor."""
        return {x.parent for x in self.executors.values() if x is not None and x.alive and x.parent in self.workers}

    def verdict(self, entry: Entry) -> str:
        return verdict(self.executors.get(entry.rev), self.workers, self.busy)


def verdict(executor: Proc | None, workers: Collection[int], busy: Collection[int] = ()) -> str:
    """Whether a running task is ``held`` by a live worker, ``orphaned`` (its worker is gone), or
    ``unsure``: no executor process, and a live worker that runs no other task (``busy``: those
    that do) may be copying the repository for it or collecting its result; only Celery can tell
    (see :func:`recover`). A worker runs one task at a time (DVC starts them with concurrency 1 and
    no prefetch), so where every live worker runs another, its worker is gone."""
    if executor is not None and executor.alive:
        return HELD if executor.parent in workers else ORPHANED
    return UNSURE if set(workers) - set(busy) else ORPHANED


# --- reading ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _celery_queue(repo: Path) -> Iterator:
    from dvc.repo import Repo

    blobio.install()
    with Repo(str(repo)) as dvc_repo:
        yield dvc_repo.experiments.celery_queue


def node_prefix(wdir: str) -> str:
    """The start of the Celery node name of this repository's workers (DVC's ``_spawn_worker``)."""
    return f"dvc-exp-{hashlib.sha256(wdir.encode('utf-8')).hexdigest()[:6]}-"


def _live_workers(prefix: str) -> dict[int, str]:
    workers = {}
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if "queue-worker" in cmd[:-1] and p.info["status"] != psutil.STATUS_ZOMBIE:
            node = cmd[cmd.index("queue-worker") + 1]
            if node.startswith(prefix):
                workers[p.pid] = node
    return workers


def _executor(q, rev: str) -> Proc | None:
    info = q.proc.get(rev)  # None until the worker has made the repository's copy and started it
    if info is None:
        return None
    if info.returncode is not None:
        return Proc(info.pid, alive=False)
    try:
        p = psutil.Process(info.pid)
        if p.status() == psutil.STATUS_ZOMBIE or "exec-run" not in p.cmdline():  # gone, or a reused pid
            return Proc(info.pid, alive=False)
        return Proc(info.pid, alive=True, parent=p.ppid())
    except psutil.Error:
        return Proc(info.pid, alive=False)


def snapshot(repo: Path) -> Snapshot:
    """The queue's tasks, then the experiments (in that order, so a task seen finished without an
    experiment has really failed), the live workers and each running task's executor."""
    from celery.result import AsyncResult
    from dvc.repo.experiments.utils import exp_refs

    with _celery_queue(repo) as q:
        entries = {e.stash_rev: Entry(e.name, e.stash_rev, QUEUED) for e in q.iter_queued()}
        for msg, e in q._iter_processed():  # a message taken since the line above wins
            task_id = msg.headers["id"]
            state = FINISHED if AsyncResult(task_id, app=q.celery).ready() else RUNNING
            entries[e.stash_rev] = Entry(e.name, e.stash_rev, state, task_id)
        experiments = {ref.name for ref in exp_refs(q.scm)}
        workers = _live_workers(node_prefix(q.wdir))
        executors = {rev: _executor(q, rev) for rev, e in entries.items() if e.state == RUNNING}
    return Snapshot(list(entries.values()), experiments, workers, executors)


def task_lines(log: str, task_id: str) -> str:
    """The lines of a Celery worker's log about one task: from its first mention to its last,
    with the traceback lines that follow it (a worker runs one task at a time)."""
    lines = log.splitlines()
    hits = [i for i, line in enumerate(lines) if task_id in line]
    if not hits:
        return ""
    end = hits[-1] + 1
    while end < len(lines) and not lines[end].startswith("["):  # "[2026-...: LEVEL/...]" starts a record
        end += 1
    return "\n".join(lines[hits[0] : end])


def log_tail(repo: Path, entry: Entry) -> str:
    """The end of a task's log: what ``dvc queue logs`` prints, or where that is empty (it failed
    before its stages ran) the lines of DVC's Celery worker logs about it."""
    with _celery_queue(repo) as q:
        info = q.proc.get(entry.rev)
        out = Path(info.stdout) if info is not None and info.stdout else None
        text = out.read_text(errors="replace") if out is not None and out.is_file() else ""
        if not text.strip() and entry.task_id:
            logs = sorted(Path(q.wdir).glob("dvc-exp-worker-*.out"))
            found = [t for t in (task_lines(p.read_text(errors="replace"), entry.task_id) for p in logs) if t]
            if found:
                text = f"(`dvc queue logs` is empty; DVC's Celery worker logs, {q.wdir}/dvc-exp-worker-*.out:)\n"
                text += "\n".join(found)
    return text.strip()[-shell.LOG_TAIL :] or NO_LOG


# --- repairing ----------------------------------------------------------------------------------
def _kill_tree(pid: int) -> None:
    """SIGKILL an orphaned executor and the stages under it (nothing would collect their result)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def _remove(q, revs: Collection[str]) -> None:
    """``dvc queue remove`` of finished tasks, then their run directories (infofile, process
    record, log) and temporary copies, which DVC leaves behind."""
    from dvc.repo.experiments.exceptions import UnresolvedExpNamesError

    exps = Path(q.pid_dir).parent  # .dvc/tmp/exps
    for rev in revs:
        with contextlib.suppress(UnresolvedExpNamesError):  # gone already; one at a time, as DVC removes none
            q.remove([rev])  # of a list with one it cannot find
        run_dir = Path(q.pid_dir) / rev
        with contextlib.suppress(OSError, ValueError, KeyError):
            copy = Path(json.loads((run_dir / f"{rev}.run").read_text())["root_dir"])
            if copy.parent == exps and copy.name.startswith("tmp"):  # never anything outside DVC's tmp dir
                shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def remove(repo: Path, revs: Collection[str]) -> None:
    """Remove finished tasks from the queue, with what they left under ``.dvc/tmp/exps``."""
    if revs:
        with _celery_queue(repo) as q:
            _remove(q, revs)


def recover(repo: Path, entry: Entry, snap: Snapshot) -> bool:
    """Clean up after a running task whose worker is gone: kill its orphaned executor, then mark
    the task failed and remove it as ``dvc queue kill`` and ``dvc queue remove`` would. False, and
    nothing touched, where a live worker holds it after all: its executor's parent, or the tasks
    Celery's workers report running."""
    from dvc.repo.experiments.queue.exceptions import CannotKillTasksError

    executor = snap.executors.get(entry.rev)
    if snap.verdict(entry) == HELD:
        return False
    with _celery_queue(repo) as q:
        # What `dvc queue status` asks the workers, given 5 s to answer instead of 1 (a busy one can be slow).
        active = q.celery.control.inspect(timeout=INSPECT_S).active() or {}
        held = {t["id"] for tasks in active.values() for t in tasks}
        taken = [(msg.headers["id"], qe) for msg, qe in q._iter_processed() if qe.stash_rev == entry.rev]
        if any(task_id in held for task_id, _ in taken):
            return False
        if executor is not None and executor.alive:
            _kill_tree(executor.pid)
        if taken:
            try:  # DVC marks a task failed only where no live worker reports holding it
                q._mark_inactive_tasks_failure({taken[0][1]: entry.name or entry.rev})
            except CannotKillTasksError:
                return False
        _remove(q, [entry.rev])
    return True


def _pidbox_node(filename: str) -> str:
    """The Celery node a control message waits for, from its file name (kombu's naming)."""
    if not filename.endswith(PIDBOX_SUFFIX) or "." not in filename:
        return ""
    return filename.split(".", 1)[1][: -len(PIDBOX_SUFFIX)]


def clean_broker(repo: Path, workers: dict[int, str]) -> int:
    """Before workers start: what ``dvc exp clean`` removes (expired messages, control replies),
    and every control message waiting for a worker that is not alive. A new worker of that name
    would read them, and a stale ``shutdown`` among them (a ``dvc queue stop``, or a worker's own
    that it died before reading) stops it at once with experiments still queued
    (treeverse/dvc#10427, #10562). Returns how many of the latter it removed."""
    live = set(workers.values())
    removed = 0
    with _celery_queue(repo) as q:
        q.celery.clean()
        prefix = node_prefix(q.wdir)
        for path in (Path(q.wdir) / "broker" / "in").glob(f"*{PIDBOX_SUFFIX}"):
            node = _pidbox_node(path.name)
            if node.startswith(prefix) and node not in live:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def queue_points(repo: Path, points: Iterable[tuple[str, Sequence[str]]], attempts: int = 4) -> None:
    """Queue each point as ``dvc exp run --queue --name <name> -S ...`` does, through the call
    that command makes (``Repo.experiments.run``), all in this process: one DVC start-up for the
    lot instead of one per point (0.9 s each on an idle 2-core machine). A point is tried again
    where DVC's lock stays busy (a worker taking a task holds it for a moment); any other refusal
    (an override DVC cannot apply) is an error that names the point."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    blobio.install()
    # From the repository's root, as the command runs: DVC resolves the overrides' files (and the
    # paths it stages in git) against the working directory.
    with contextlib.chdir(repo), Repo(".") as dvc_repo:
        for name, overrides in points:
            command = f"dvc exp run --queue --name {name} " + " ".join(f"-S '{o}'" for o in overrides)
            for attempt in range(1, attempts + 1):
                try:
                    dvc_repo.experiments.run(params=list(overrides), queue=True, name=name)
                    break
                except LockError as e:
                    if attempt == attempts:
                        raise OptlabError(f"could not queue {name}: DVC's lock stayed busy ({e}); `{command}`") from e
                    time.sleep(attempt)
                except Exception as e:  # DVC's errors, and Hydra's for an override it cannot apply
                    raise OptlabError(f"could not queue {name}: `{command}` failed: {e}") from e


def start_workers(repo: Path, jobs: int, env: dict) -> None:
    """``dvc queue start -j N``: DVC starts the workers 1..N that do not answer. Its output goes
    to a file, not a pipe: the workers it forks keep the command's stdout and stderr open until
    they exit, so reading a pipe would wait for the whole queue."""
    args = shell.dvc("queue", "start", "-j", str(jobs))
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(args, cwd=repo, env={**os.environ, **env}, stdout=out, stderr=out, check=False)
        out.seek(0)
        if done.returncode != 0:
            raise OptlabError(f"`dvc queue start -j {jobs}` failed in {repo}: {out.read()[-shell.LOG_TAIL :]}")


def stop_workers(repo: Path, wait_s: float = STOP_WAIT_S) -> None:
    """What ``dvc queue stop`` does, addressed to the live workers only: each finishes the
    experiment it runs, then exits. (``dvc queue stop`` addresses every worker, and the copy that
    waits in a dead worker's queue stops the next worker of that name at once.) A worker that has
    only just started may not listen for control messages yet: it would miss the stop and run the
    whole queue. So the stop goes out once each live worker has answered a ping (``wait_s`` at
    most; a second Ctrl-C sends it at once)."""
    with _celery_queue(repo) as q:
        live = list(_live_workers(node_prefix(q.wdir)).values())
        if not live:
            return
        waiting, deadline = set(live), time.monotonic() + wait_s
        with contextlib.suppress(KeyboardInterrupt):
            while waiting and time.monotonic() < deadline:
                replies = q.celery.control.ping(destination=sorted(waiting), timeout=1.0, limit=len(waiting))
                waiting -= {node for reply in replies or () for node in reply}
        q.celery.control.shutdown(destination=live)


def bar(total: int, shown: bool, initial: int = 0):
    """A sweep's progress bar on stderr (tqdm), counting experiments."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not shown, unit="exp", desc="sweep", file=sys.stderr)
