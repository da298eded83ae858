"""``optlab sweep --executor local``: a grid on DVC's own queue, supervised until every point is
accounted for.

Each poll (:data:`POLL_S`) reads the queue (:func:`optlab.study.queue.snapshot`) and moves each
point on: an experiment in the repository is done (once DVC has let go of its task); a failed
task's log is kept, the task removed and the point queued again (``--retries``); a task still
Running whose queue worker is gone is cleaned up (:func:`optlab.study.queue.recover`) and queued
again the same way, under the same name and params; a point missing from the queue twice running
is queued again. Whenever experiments wait and fewer than ``-j`` workers live, it clears stale
control messages and starts workers (``dvc queue start -j N``), saying so on stderr: DVC's
workers also exit with experiments still queued (treeverse/dvc#10562).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from optlab.core.errors import OptlabError
from optlab.study import queue
from optlab.study.queue import FINISHED, HELD, ORPHANED, QUEUED, RUNNING

POLL_S = 2.0
# A running task with no executor process: the worker copies the repository for it (seconds; up
# to minutes while DVC's git lock is busy) or collects its result. Past this, ask Celery.
UNSURE_GRACE_S = 90.0
WORKER_START_S = 20.0  # `dvc queue start` returns at once; its workers are up within seconds
FRUITLESS_STARTS = 5  # worker starts in a row after which no task ran: an error, not a loop


def _say(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"optlab sweep: {text}", file=sys.stderr)


class Supervisor:
    """The loop of :func:`run`, with what it remembers between polls."""

    def __init__(self, repo: Path, account, todo: dict[str, list[str]], jobs: int, env: dict, retries: int):
        self.repo, self.account, self.todo = repo, account, todo
        self.jobs, self.env, self.retries = jobs, env, retries
        self.absent: dict[str, int] = {}  # name -> polls in a row it was nowhere in the queue
        self.suspect: dict[str, float] = {}  # rev -> since when its task looked orphaned or unsure
        self.why: dict[str, str] = {}  # name -> how its last try ended
        self.logs: dict[str, str] = {}  # name -> the tail of its last try's log
        self.seen_running: set[str] = set()
        self.last_start, self.fruitless, self.started = -1e9, 0, False
        self.bar = None

    def run(self, progress: bool) -> None:

        total = len(self.account.points)
        self.bar = queue.bar(total, progress, initial=total - len(self.todo))
        try:
            while self.todo:
                snap = queue.snapshot(self.repo)
                for name in list(self.todo):
                    self._step(name, snap)
                self._keep_workers(snap)
                running = sum(1 for n in self.todo for e in snap.of(n) if e.state == RUNNING)
                self.bar.set_postfix(running=running, failed=len(self.account.errors))
                if self.todo:
                    time.sleep(POLL_S)
        except BaseException:
            queue.stop_workers(self.repo)  # they finish what they run; a rerun picks up the rest
            raise
        finally:
            self.bar.close()

    def _step(self, name: str, snap: queue.Snapshot) -> None:
        entries = snap.of(name)
        running = [e for e in entries if e.state == RUNNING]
        for e in running:
            self._watch(e, snap)
        if running:
            return  # settled once DVC lets go of it, so no task of the sweep is left Running
        if name in snap.experiments:
            self._settle(name, "done")
        elif any(e.state == QUEUED for e in entries):
            self.absent.pop(name, None)
        elif finished := [e for e in entries if e.state == FINISHED]:
            self.why[name], self.logs[name] = "failed", queue.log_tail(self.repo, finished[-1])
            queue.remove(self.repo, [e.rev for e in finished])  # queued again (or failed) once seen gone
        else:
            self.absent[name] = self.absent.get(name, 0) + 1
            if self.absent[name] >= 2:  # twice: a task moving between broker folders is missing once
                self._retry_or_fail(name)

    def _watch(self, entry: queue.Entry, snap: queue.Snapshot) -> None:
        """A running task: left alone while a live worker holds it, cleaned up once its worker is
        seen gone on two polls in a row (or, unsure, past :data:`UNSURE_GRACE_S`)."""
        if entry.rev not in self.seen_running:
            self.seen_running.add(entry.rev)
            self.fruitless = 0  # a worker took a task: the last start did work
        state = snap.verdict(entry)
        if state == HELD:
            self.suspect.pop(entry.rev, None)
            return
        since = self.suspect.setdefault(entry.rev, time.monotonic())
        if time.monotonic() - since < (POLL_S if state == ORPHANED else UNSURE_GRACE_S):
            return
        log = queue.log_tail(self.repo, entry)
        if not queue.recover(self.repo, entry, snap):
            self.suspect[entry.rev] = time.monotonic()  # Celery says a live worker holds it: wait again
            return
        self.suspect.pop(entry.rev, None)
        self.why[entry.name], self.logs[entry.name] = "its DVC queue worker died while it ran", log
        _say(f"{entry.name}: Running, but no live queue worker holds it: removed from DVC's queue")

    def _retry_or_fail(self, name: str) -> None:
        tries = self.account.tries.get(name, 1)
        why = self.why.pop(name, "lost from DVC's queue")
        self.absent.pop(name, None)
        if tries > self.retries:
            self.account.errors[name] = self.logs.get(name, queue.NO_LOG)
            self._settle(name, "failed")
            return
        queue.queue_points(self.repo, [(name, self.todo[name])])
        self.account.tries[name] = tries + 1
        lines = [line.strip() for line in self.logs.pop(name, "").splitlines() if line.strip()]
        self.account.notes.setdefault(name, []).append(f"try {tries}: {why}" + (f" ({lines[-1]})" if lines else ""))
        tail = "; its log ended:\n  " + "\n  ".join(lines[-3:]) if why == "failed" and lines else ""
        _say(f"{name}: {why}; queued again (try {tries + 1} of {self.retries + 1}){tail}")

    def _settle(self, name: str, status: str) -> None:
        self.account.status[name] = status
        del self.todo[name]
        self.fruitless = 0
        self.bar.update(1)

    def _keep_workers(self, snap: queue.Snapshot) -> None:
        """Start workers while experiments wait and fewer than ``-j`` workers live (DVC starts only
        the missing ones), after removing the stale control messages that would stop them."""
        queued = snap.count(QUEUED)
        alive = len(snap.workers)
        if not queued or alive >= min(self.jobs, queued + snap.count(RUNNING)):
            return
        if time.monotonic() - self.last_start < WORKER_START_S:
            return
        if self.fruitless >= FRUITLESS_STARTS:
            raise OptlabError(
                f"DVC's queue workers were started {self.fruitless} times and ran nothing ({queued} experiments "
                f"queued): see {self.repo}/.dvc/tmp/exps/celery/dvc-exp-worker-1.out, `dvc queue status` and "
                "`dvc queue logs <name>`; `optlab sweep` again picks up where this one stopped"
            )
        stale = queue.clean_broker(self.repo, snap.workers)
        queue.start_workers(self.repo, self.jobs, self.env)
        if self.started:
            extra = f"; removed {stale} stale Celery control messages first" if stale else ""
            _say(
                f"{queued} experiments queued and {alive} of {self.jobs} DVC queue workers alive: started them "
                f"again (dvc queue start -j {self.jobs}){extra}"
            )
        self.started, self.last_start = True, time.monotonic()
        self.fruitless += 1


def _adopt(repo: Path, names: set[str]) -> dict[str, list[queue.Entry]]:
    """Before queueing: clear what earlier runs left of this sweep's points (finished tasks, extra
    queued copies of a point, stale Celery messages); return the tasks still queued or running,
    which the sweep supervises instead of queueing them twice (an earlier `optlab sweep` stopped)."""
    snap = queue.snapshot(repo)
    queue.clean_broker(repo, snap.workers)
    keep: dict[str, list[queue.Entry]] = {}
    drop = []
    for name in names:
        entries = snap.of(name)
        drop += [e.rev for e in entries if e.state == FINISHED]
        live = [e for e in entries if e.state == RUNNING] or [e for e in entries if e.state == QUEUED][:1]
        drop += [e.rev for e in entries if e.state == QUEUED and e not in live]
        if live:
            keep[name] = live
    queue.remove(repo, drop)
    return keep


def run(repo: Path, account, jobs: int, threads: int, retries: int, progress: bool) -> None:
    """Run the points of ``account`` that have no experiment yet on DVC's queue, ``jobs`` at a
    time with ``threads`` CPU threads each, until each is done or has failed ``retries + 1`` times."""
    # DVC's queue workers, and the `python` of each stage, from this interpreter's environment
    # (a venv used without activating it would otherwise leave them to whatever PATH finds).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {"OPTLAB_THREADS": str(threads), "DVC_NO_ANALYTICS": "1", "PATH": path}
    existing = queue.snapshot(repo).experiments
    todo = {}
    for name, overrides in account.points:
        if name in existing:
            account.status[name] = "already run"  # an experiment of this repository already
        else:
            todo[name] = list(overrides)
    if not todo:
        return
    adopted = _adopt(repo, set(todo))
    queue.queue_points(repo, [(name, overrides) for name, overrides in todo.items() if name not in adopted])
    Supervisor(repo, account, todo, jobs, env, retries).run(progress)
