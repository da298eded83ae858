"""A study's grid at the speed of its training: one contender's 8 learning rates x 3 seeds (24 trials
of 10 epochs of the default MLP on Fashion-MNIST), side by side in one run, three ways:

- ``separate``: 24 experiments, ``optlab sweep -S 'optimizer.learning_rate=r1,...,r8' -S
  'seed=range(0,3)' -j 2`` (DVC's queue, two at a time, one thread each);
- ``groups``: 3 experiments, one per seed, each a group of the 8 rates trained as one program
  (``-S 'optimizer.learning_rate=[r1,...,r8]'``), also through ``optlab sweep -j 2``;
- ``one program``: 1 experiment, the 8 rates x 3 replicas (``train.replicas=3``): 24 members in
  one compiled program, with both cores (``dvc exp run``, OPTLAB_THREADS unset).

And one plain ``dvc exp run`` of the default experiment (20 epochs), against its own training
time: what a run costs beyond its training. For each: the wall time, and the sum of the training
time the train stages recorded (run.json's ``train_seconds``). Everything runs in a temporary
clone of this repository's committed HEAD, after its data is prepared once; the last line printed
is one JSON object.

    python benchmarks/grid_speed.py [--epochs 10] [--only separate,groups,one,single]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATES = [1e-4, 1.9e-4, 3.7e-4, 7.2e-4, 1.4e-3, 2.7e-3, 5.2e-3, 1e-2]  # log-spaced, two decades
SEEDS = 3


def sh(cwd: Path, *cmd: str, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def training_seconds(root: Path, env: dict) -> tuple[float, int]:
    """The sum of every experiment's recorded training time, and how many experiments, at HEAD."""
    sys.path.insert(0, str(root / "src"))
    from optlab.study import experiments

    total, n = 0.0, 0
    for state in experiments.iter_states(experiments.exp_show(root)):
        if state.get("name") and state["rev"] != "workspace":
            text = experiments.read_at(root, state["rev"], "metrics/train/run.json")
            if text:
                total += json.loads(text)["timings"]["train_seconds"]
                n += 1
    return total, n


def timed(root: Path, env: dict, *cmd: str) -> tuple[float, float, int]:
    """Wall seconds of ``cmd``, the training seconds it added, and the experiments it added."""
    before, n_before = training_seconds(root, env)
    started = time.perf_counter()
    sh(root, *cmd, env=env)
    wall = time.perf_counter() - started
    after, n_after = training_seconds(root, env)
    sh(root, sys.executable, "-m", "dvc", "exp", "remove", "--all", env=env)  # the next way starts from none
    sh(root, "git", "checkout", "-q", "--", "params.yaml", env=env)
    return wall, after - before, n_after - n_before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--only", default="separate,groups,one,single")
    args = ap.parse_args()
    ways = args.only.split(",")
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    rates, listed = ",".join(map(str, RATES)), "[" + ",".join(map(str, RATES)) + "]"
    optlab, dvc = [sys.executable, "-m", "optlab.study.cli"], [sys.executable, "-m", "dvc"]
    results = {}
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout
    print(f"machine: {cpu.split(':')[-1].strip()}, {os.cpu_count()} cores; {len(RATES)} rates x {SEEDS} seeds, "
          f"{args.epochs} epochs of the default MLP on Fashion-MNIST (single: the default experiment)")  # fmt: skip
    print(f"{'way':<20}{'experiments':>12}{'wall s':>9}{'training s':>12}{'wall / training':>17}", flush=True)

    def record(way: str, measured: tuple[float, float, int]) -> None:  # each row as soon as it is measured
        results[way] = wall, train, n = measured
        print(f"{way:<20}{n:>12}{wall:>9.1f}{train:>12.1f}{wall / max(train, 1e-9):>16.2f}x", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "optlab"
        sh(Path(tmp), "git", "clone", "-q", str(REPO), str(root), env=env)
        for key, value in (("user.name", "optlab bench"), ("user.email", "bench@optlab.invalid")):
            sh(root, "git", "config", key, value, env=env)
        env["PYTHONPATH"] = str(root / "src")  # the clone's own code, in every stage
        sh(root, *dvc, "repro", "-q", "prepare", env=env)
        epochs = f"train.epochs={args.epochs}"
        if "separate" in ways:
            record("separate", timed(root, env, *optlab, "sweep", "-S", f"optimizer.learning_rate={rates}",
                                     "-S", f"seed=range(0,{SEEDS})", "-S", epochs, "-j", "2"))  # fmt: skip
        if "groups" in ways:
            record("groups", timed(root, env, *optlab, "sweep", "-S", f"optimizer.learning_rate={listed}",
                                   "-S", f"seed=range(0,{SEEDS})", "-S", epochs, "-j", "2"))  # fmt: skip
        if "one" in ways:
            record("one program", timed(root, env, *dvc, "exp", "run", "-S", f"optimizer.learning_rate={listed}",
                                        "-S", f"train.replicas={SEEDS}", "-S", epochs))  # fmt: skip
        if "single" in ways:
            record("single default run", timed(root, env, *dvc, "exp", "run", "-S", "seed=11"))
    if "separate" in results:
        for way in ("groups", "one program"):
            if way in results:
                print(f"{way}: {results['separate'][0] / results[way][0]:.2f}x faster than separate experiments")
    print(json.dumps({w: {"wall_s": round(a, 1), "train_s": round(b, 1), "experiments": n}
                      for w, (a, b, n) in results.items()}))  # fmt: skip


if __name__ == "__main__":
    main()
