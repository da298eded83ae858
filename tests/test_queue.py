"""DVC's queue and interruptions, in a private copy of the baseline project (tests/project.py): a
running queued experiment followed by `dvc exp show`, a queued sweep on two parallel workers, and
recovery after `dvc repro` is killed mid-train."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from project import (
    QUEUE_TIMEOUT_S,
    metrics_of,
    params_of,
    ran,
)

pytestmark = pytest.mark.slow


# --- 5d. a queued experiment can be watched while it runs ------------------------------------
def test_dvc_exp_show_follows_a_running_queued_experiment(project):
    long_run = ("-S", "train.epochs=400", "-S", "model.hidden=[1024,1024]", "-S", "train.batch_size=8")
    with project.scratch():
        queued = project.dvc("exp", "run", "--queue", *long_run)
        name = re.search(r"Queued experiment '([^']+)'", queued).group(1)
        project.dvc("queue", "start", "-j", "1")
        steps, deadline = [], time.time() + 300
        try:
            while len(set(steps)) < 3 and time.time() < deadline:
                for exp_range in project.baseline_state().get("experiments") or []:
                    for state in exp_range["revs"]:
                        running = (exp_range.get("executor") or {}).get("state") == "running"
                        summary = ((state.get("data") or {}).get("metrics") or {}).get("metrics/train/metrics.json")
                        # dvclive's running summary counts the epochs done in `step` (the final
                        # summary, and the workspace copy it starts from, have none).
                        step = ((summary or {}).get("data") or {}).get("step")
                        if state.get("name") == name and running and step is not None:
                            steps.append(step)
                time.sleep(1)
        finally:
            project.dvc_run("queue", "kill", name)
            project.dvc_run("queue", "stop")  # no idle worker left for the sweep below
            project.dvc_run("queue", "remove", "--all")
            deadline = time.time() + 60
            while "0 active, 0 idle" not in project.dvc_run("queue", "status").stdout and time.time() < deadline:
                time.sleep(1)
        assert len(set(steps)) >= 3 and steps == sorted(steps), f"the running experiment's steps: {steps}"


# --- 7. a queued sweep on two parallel workers ----------------------------------------------
def _queue_table(status: str) -> dict[str, str]:
    """name -> Queued | Running | Success | Failed, from `dvc queue status`."""
    rows = {}
    for line in status.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[-1] in {"Queued", "Running", "Success", "Failed"}:
            rows[cols[1]] = cols[-1]
    return rows


def test_queued_sweep_runs_on_two_workers_without_interference(project):
    with project.scratch():
        # Queued without OPTLAB_THREADS, so a value seen by the stages came from `queue start`.
        queue_env = {k: v for k, v in project.env.items() if k != "OPTLAB_THREADS"}
        queued = project.dvc(
            "exp", "run", "--queue", "-S", "optimizer=adam,sgd", "-S", "seed=range(0,2)", env=queue_env
        )
        combos = [(o, int(s)) for o, s in re.findall(r"'optimizer=(\w+)', 'seed=(\d+)'", queued)]
        names = re.findall(r"Queued experiment '([^']+)' for future execution", queued)
        assert sorted(combos) == [("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)], queued
        assert len(names) == 4
        wanted = dict(zip(names, combos, strict=False))

        project.dvc("queue", "start", "-j", "2")  # with OPTLAB_THREADS=1 in its environment
        most_running, table, seen, deadline = 0, {}, [], time.time() + QUEUE_TIMEOUT_S
        while time.time() < deadline:
            status = project.dvc("queue", "status")
            table = {n: s for n, s in _queue_table(status).items() if n in wanted}
            seen.append(table)
            most_running = max(most_running, sum(s == "Running" for s in table.values()))
            if len(table) == 4 and all(s in {"Success", "Failed"} for s in table.values()):
                break
            time.sleep(2)
        # The idle workers would wait 10 s for more work before exiting: stop them now, and wait.
        project.dvc_run("queue", "stop")
        while "0 active, 0 idle" not in project.dvc_run("queue", "status").stdout and time.time() < deadline:
            time.sleep(1)
        logs = {n: project.dvc_run("queue", "logs", n).stdout for n in wanted}
        failed = {n: logs[n][-3000:] for n, s in table.items() if s != "Success"}
        assert len(table) == 4 and not failed, f"queue: {table}\n{failed}"
        assert most_running == 2, f"the two workers never ran experiments at the same time: {seen}"

        exps = project.experiments()
        runs = {}
        for name, (optimizer, seed) in wanted.items():
            state, executor = exps[name]["state"], exps[name]["executor"]
            assert state["error"] is None and executor["state"] == "success", executor
            assert (params_of(state)["optimizer"]["name"], params_of(state)["seed"]) == (optimizer, seed)
            # What the train stage itself read, from the experiment's commit: each worker trained
            # its own params in its own workspace.
            run = project.git_json(state["rev"], "metrics/train/run.json")
            assert (run["params"]["optimizer"]["name"], run["params"]["seed"]) == (optimizer, seed)
            runs[name] = {"test": metrics_of(state), "run": run, "trained_here": "trainable_params=" in logs[name]}
            if runs[name]["trained_here"]:  # `dvc queue logs` keeps the progress lines
                assert "epoch 3/3: loss " in logs[name], logs[name][-2000:]
            assert runs[name]["test"]["accuracy"] > 0.5

        # Different optimizers and seeds give different models; the baseline's recipe
        # (adam, seed 0) gives the baseline's numbers exactly, even on a worker.
        losses = [r["test"]["loss"] for r in runs.values()]
        assert len(set(losses)) == 4, losses
        adam0 = next(n for n, c in wanted.items() if c == ("adam", 0))
        assert runs[adam0]["test"] == project.baseline["test"]

        # OPTLAB_THREADS set for `dvc queue start` reaches the stage processes of its workers.
        # (Runs that DVC restored from its run cache, or found up to date, trained nowhere: only
        # the logs that show training count. The seed-1 runs are new, so they trained there.)
        trained = [n for n, r in runs.items() if r["trained_here"]]
        assert {n for n, (_, seed) in wanted.items() if seed == 1} <= set(trained), {n: logs[n][-2000:] for n in wanted}
        assert {n: runs[n]["run"]["threads"] for n in trained} == {n: "1" for n in trained}

        # The shared cache is intact: an experiment applies, checks out and matches its record.
        sgd1 = next(n for n, c in wanted.items() if c == ("sgd", 1))
        project.dvc("exp", "apply", sgd1)
        project.assert_clean()
        assert project.json("metrics/test.json") == runs[sgd1]["test"]
        assert project.json("metrics/train/run.json")["params"]["seed"] == 1


# --- 8. a repro killed mid-train ------------------------------------------------------------
def _alive_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in {"Z", "X"}:
            alive.append(int(stat.parent.name))
    return alive


def test_a_repro_killed_mid_train_recovers_with_the_next_repro(project):
    with project.scratch():
        project.set_params(seed=7)  # a run no cache holds, so train really trains
        backups = project.root / ".optlab/backup"
        proc = subprocess.Popen(
            [project.dvc_bin, "repro"],
            cwd=project.root,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            # Kill once the first epoch is backed up: DVC and the train stage, like a closed terminal.
            while time.time() < deadline and proc.poll() is None and not list(backups.glob("[!.]*.npz")):
                time.sleep(0.05)
            assert proc.poll() is None, "repro finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            killed_out = proc.communicate(timeout=60)[0]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        deadline = time.time() + 30
        while _alive_in_group(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive_in_group(proc.pid), "the killed stage is still running"
        assert proc.returncode == -signal.SIGKILL and ran("train") in killed_out, killed_out

        # The kill left DVC's lock entries behind, and no half-written training outputs.
        rwlock = json.loads((project.root / ".dvc/tmp/rwlock").read_text())
        assert any(e["pid"] == proc.pid for e in rwlock["write"].values()), rwlock
        assert not (project.root / "models/model.keras").exists()
        # dvclive wrote the epochs as they ended: what is left says it is incomplete.
        assert project.json("metrics/train/run.json")["status"] == "running"

        # Recovery is the next `dvc repro`: DVC sees the holder is dead, drops its lock entries,
        # and the train stage resumes from the epoch it had backed up.
        again = project.dvc("repro")
        stale = re.findall(
            rf"Process '[^']*' with \(Pid {proc.pid}\), in RWLock-file '[^']+' had been killed\. "
            r"Auto removed it from the lock file\.",
            again,
        )
        assert stale, again
        assert "resuming from the backup of epoch" in again, again
        for stage in ("train", "evaluate", "plot"):
            assert ran(stage) in again, again
        assert project.json("metrics/train/metrics.json")["epochs_run"] == 3
        assert project.json("metrics/train/run.json")["status"] == "complete"
        timings = project.json("metrics/train/run.json")["timings"]
        assert math.isfinite(timings["seconds_per_epoch"]) and timings["seconds_per_epoch"] > 0, timings
        assert project.json("metrics/test.json")["accuracy"] > 0.8
        assert not list(backups.glob("*")), "the backup is removed once the run completes"
        project.assert_clean()
