"""Where the time of one ``dvc exp run`` of the default experiment goes, beyond its training.

Runs ``dvc exp run -S seed=<n>`` in a temporary clone of this repository's HEAD (its data
prepared first), with a ``sitecustomize`` on PYTHONPATH that records the wall time of every
Python process the run starts (DVC itself, then each stage's ``python stages/<stage>.py``). Then,
in the same clone, how long each stage takes just to import what it computes with (a fresh
process each, measured the same way). Prints one row per part:

- ``train: training``: the epochs themselves (run.json's ``train_seconds``);
- ``train: the rest``: the train stage's process start, imports, data loading, compilation and
  saving the models;
- ``evaluate``, ``plot``: those stages' processes, and of that their imports;
- ``DVC``: what ``dvc exp run`` spends outside the stages (hashing, caching, git, its own start).

    python benchmarks/run_overhead.py [--epochs 20] [--runs 2]
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
SITECUSTOMIZE = """import atexit, json, os, sys, time
_started = time.perf_counter()
def _record():
    with open(os.environ["OPTLAB_BENCH_LOG"], "a") as f:
        f.write(json.dumps({"argv": sys.argv[:2], "wall": time.perf_counter() - _started}) + "\\n")
atexit.register(_record)
"""
# What each stage imports before it computes (its own modules and the libraries they pull in).
IMPORTS = {
    "train": "from optlab.training.backend import configure; configure('jax'); import optlab.training.run",
    "evaluate": "from optlab.training.backend import configure; configure('jax'); "
    "import optlab.evaluation.evaluate, optlab.training.models, pandas",
    "plot": "import optlab.evaluation.figures, optlab.training.record, optlab.data.files",
}


def sh(cwd: Path, *cmd: str, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def processes(log: Path) -> dict[str, float]:
    """Wall seconds per process the log recorded: 'dvc' or the stage's name."""
    walls: dict[str, float] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        argv = " ".join(entry["argv"])
        name = next((s for s in ("train", "evaluate", "plot", "prepare", "download") if f"stages/{s}.py" in argv), "")
        name = name or ("dvc" if "dvc" in argv else argv)
        walls[name] = walls.get(name, 0.0) + entry["wall"]
    return walls


def one_run(root: Path, env: dict, seed: int, epochs: int) -> dict[str, float]:
    log = root.parent / f"processes-{seed}.jsonl"
    started = time.perf_counter()
    sh(root, sys.executable, "-m", "dvc", "exp", "run", "-S", f"seed={seed}", "-S", f"train.epochs={epochs}",
       env={**env, "OPTLAB_BENCH_LOG": str(log)})  # fmt: skip
    wall = time.perf_counter() - started
    walls = processes(log)
    train = json.loads((root / "metrics/train/run.json").read_text())["timings"]["train_seconds"]
    return {"wall": wall, "training": train, **walls}


def import_seconds(root: Path, env: dict) -> dict[str, float]:
    out = {}
    for stage, code in IMPORTS.items():
        log = root.parent / f"imports-{stage}.jsonl"
        sh(root, sys.executable, "-c", code, env={**env, "OPTLAB_BENCH_LOG": str(log), "KERAS_BACKEND": "jax"})
        out[stage] = sum(json.loads(line)["wall"] for line in log.read_text().splitlines())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20, help="the default experiment's (conf/config.yaml)")
    ap.add_argument("--runs", type=int, default=2, help="runs to average (the first one also warms caches)")
    args = ap.parse_args()
    bin_dir = str(Path(sys.executable).parent)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "optlab"
        hooks = Path(tmp) / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
               "PYTHONPATH": f"{hooks}{os.pathsep}{root / 'src'}"}  # fmt: skip
        sh(Path(tmp), "git", "clone", "-q", str(REPO), str(root), env=env)
        sh(root, sys.executable, "-m", "dvc", "repro", "-q", "prepare", env=env)
        runs = [one_run(root, env, 11 + i, args.epochs) for i in range(args.runs)]
        imports = import_seconds(root, env)
    mean = {k: sum(r.get(k, 0.0) for r in runs) / len(runs) for k in runs[0]}
    stages = mean.get("train", 0) + mean.get("evaluate", 0) + mean.get("plot", 0)
    rows = [
        ("train: training", mean["training"]),
        ("train: the rest", mean.get("train", 0) - mean["training"]),
        (f"  of it, imports ({imports['train']:.1f} s)", None),
        ("evaluate", mean.get("evaluate", 0)),
        (f"  of it, imports ({imports['evaluate']:.1f} s)", None),
        ("plot", mean.get("plot", 0)),
        (f"  of it, imports ({imports['plot']:.1f} s)", None),
        ("DVC (exp run outside the stages)", mean["wall"] - stages),
    ]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True).stdout
    print(f"machine: {cpu.split(':')[-1].strip()}, {os.cpu_count()} cores; one `dvc exp run` of the default "
          f"experiment ({args.epochs} epochs), mean of {len(runs)} runs")  # fmt: skip
    print(f"{'part':<36}{'seconds':>9}{'share':>8}")
    for name, seconds in rows:
        if seconds is None:
            print(f"{name:<36}")
        else:
            print(f"{name:<36}{seconds:>9.1f}{seconds / mean['wall']:>8.0%}")
    print(f"{'total (wall)':<36}{mean['wall']:>9.1f}   {mean['wall'] / mean['training']:.2f}x the training time")
    print(json.dumps({"runs": runs, "imports": imports}))


if __name__ == "__main__":
    main()
