"""Soak test of ``optlab sweep --executor local``: a long grid on DVC's queue, two at a time, with
a queue worker SIGKILLed while it trains at two moments; every point must end done exactly once.

    python benchmarks/sweep_soak.py [--optimizers adam,sgd,rmsprop,nadam,adamw] [--seeds 8] [--kills 2]

A temporary clone of this repository's committed HEAD runs the experiment on scikit-learn's
digits (an MLP of 32 units, 1 epoch at a constant rate): 5 optimizers x 8 seeds = 40 experiments by default. The
kills come once a third and two thirds of the points are done. It prints the sweep's account
(every point's result), the count, the kills and the wall time, then one JSON line; it exits 1
if a point is lost (no experiment), duplicated (two), or stuck (still queued or running in DVC's
queue, or an executor process left alive). Not run by the tests: it takes 15-25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
DIGITS = {"dataset": "digits", "model": {"hidden": [32]}, "train": {"epochs": 1, "batch_size": 64}}


def sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def make_clone(root: Path, env: dict) -> None:
    """HEAD of this repository, its experiment shrunk to digits, committed (queued runs need that)."""
    sh(root.parent, "git", "clone", "-q", str(REPO), str(root))
    for key, value in (("user.name", "optlab soak"), ("user.email", "soak@optlab.invalid")):
        sh(root, "git", "config", key, value)
    conf_path = root / "conf/config.yaml"
    conf = yaml.safe_load(conf_path.read_text())
    conf["dataset"] = DIGITS["dataset"]
    # A constant rate, as the tests' digits runs: the default schedule's one-epoch warm-up would be the whole run.
    chosen = [{"schedule": "constant"} if isinstance(d, dict) and "schedule" in d else d for d in conf["defaults"]]
    conf["defaults"] = chosen
    for section in ("model", "train"):
        conf[section].update(DIGITS[section])
    conf_path.write_text(yaml.safe_dump(conf, sort_keys=False))
    sh(root, sys.executable, "-m", "optlab.study.cli", "params", env=env)
    sh(root, "git", "commit", "-q", "-am", "the soak's experiment: digits, 1 epoch")


def done_count(root: Path) -> int:
    refs = sh(root, "git", "for-each-ref", "--format=%(refname)", "refs/exps/")
    return sum(1 for r in refs.split() if r.count("/") == 4 and not r.startswith("refs/exps/celery/"))


def kill_a_training_worker(root: Path) -> tuple[str, int] | None:
    """SIGKILL the queue worker of an experiment whose train stage runs: its name and pid."""
    from optlab.study import queue

    snap = queue.snapshot(root)
    for entry in snap.entries:
        executor = snap.executors.get(entry.rev)
        if executor is None or not executor.alive or executor.parent not in snap.workers:
            continue
        with contextlib.suppress(psutil.Error):
            stages = psutil.Process(executor.pid).children(recursive=True)
            if any("stages/train.py" in " ".join(p.cmdline()) for p in stages):
                os.kill(executor.parent, signal.SIGKILL)
                return entry.name, executor.parent
    return None


def check(root: Path, names: list[str], out: str, env: dict) -> list[str]:
    """What is wrong at the end: points lost, duplicated or stuck, and the account's verdict."""
    from optlab.study import queue

    listed = sh(root, sys.executable, "-m", "dvc", "exp", "list", "--all-commits", "--name-only", env=env).split()
    problems = [f"{n}: {listed.count(n)} experiments" for n in names if listed.count(n) != 1]
    snap = queue.snapshot(root)
    problems += [f"{e.name}: still {e.state} in DVC's queue" for e in snap.entries if e.state != queue.FINISHED]
    for p in psutil.process_iter(["cmdline"]):
        if "exec-run" in (p.info["cmdline"] or []) and str(root) in " ".join(p.info["cmdline"]):
            problems.append(f"executor {p.pid} still alive")
    problems += [f"{n}: not done in the account" for n in names if f"| {n} |" not in out or not _done_row(out, n)]
    return problems


def idle_workers_exit(root: Path, timeout: float = 60.0) -> None:
    """Wait for DVC's queue workers to leave, as they do 10 s after the queue empties."""
    from optlab.study import queue

    deadline = time.time() + timeout
    while queue.snapshot(root).workers and time.time() < deadline:
        time.sleep(1)


def _done_row(out: str, name: str) -> bool:
    row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
    return row.rstrip(" |").split("|")[-1].strip().startswith("done")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", default="adam,sgd,rmsprop,nadam,adamw")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--kills", type=int, default=2)
    args = ap.parse_args()
    from optlab.study import sweep

    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    grid = [f"optimizer={args.optimizers}", f"seed=range(0,{args.seeds})"]
    with tempfile.TemporaryDirectory(prefix="optlab-soak-") as tmp:
        root = Path(tmp) / "optlab"
        make_clone(root, env)
        commit = sh(root, "git", "rev-parse", "HEAD").strip()
        names = [sweep.experiment_name(commit, p) for p in sweep.grid(grid)]
        moments = [len(names) * (k + 1) // (args.kills + 1) for k in range(args.kills)]
        log = Path(tmp) / "sweep.log"
        cmd = [sys.executable, "-m", "optlab.study.cli", "sweep", *[a for g in grid for a in ("-S", g)], "-j", "2",
               "--repo", str(root)]  # fmt: skip
        started, kills = time.perf_counter(), []
        with log.open("w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **env})
            while proc.poll() is None:
                due = len(kills) < len(moments) and done_count(root) >= moments[len(kills)]
                if due and (victim := kill_a_training_worker(root)):
                    kills.append({"after_s": round(time.perf_counter() - started), "experiment": victim[0],
                                  "worker_pid": victim[1], "done_before": done_count(root)})  # fmt: skip
                time.sleep(1)
        wall = time.perf_counter() - started
        out = log.read_text().replace("\r", "\n")
        print("\n".join(line for line in out.splitlines() if not line.startswith("sweep:")))
        problems = check(root, names, out, env)
        idle_workers_exit(root)  # before the directory goes: they write their logs into it
    print(f"\n{len(names)} experiments, {len(kills)} queue workers killed, {wall:.0f} s wall time")
    for k in kills:
        print(f"  killed worker {k['worker_pid']} of {k['experiment']} at {k['after_s']} s ({k['done_before']} done)")
    print("\n".join(["problems:", *problems]) if problems else "no point lost, duplicated or stuck")
    print(json.dumps({"experiments": len(names), "kills": kills, "wall_s": round(wall), "exit": proc.returncode,
                      "problems": problems}))  # fmt: skip
    sys.exit(1 if problems or proc.returncode != 0 or len(kills) < args.kills else 0)


if __name__ == "__main__":
    main()
