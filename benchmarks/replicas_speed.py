"""Replicas (train.replicas) against separate runs, side by side, on real Fashion-MNIST.

1. Seconds per epoch of the default experiment with R = 1, 2, 4, 8 replicas in one process (one
   vectorized program on the compiled loop), against R separate processes (one seed each, two at
   a time with OPTLAB_THREADS=1, as `dvc queue start -j 2` runs them): wall time per epoch.
2. ``--queue``: the wall time of 3 variants x 3 seeds (``--queue-epochs`` epochs each), as 3
   experiments with train.replicas=3 and as 9 experiments, each queued with `dvc exp run --queue`
   and run by `dvc queue start -j 2` in a temporary clone of this repository (DVC's overhead
   included).

    python benchmarks/replicas_speed.py [--epochs 5] [--replicas 1 2 4 8] [--queue [--queue-epochs 10]]

The last line printed is one JSON object. Each row runs in its own process, one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_data(directory: Path) -> None:
    """Fashion-MNIST as the prepare stage leaves it for the default experiment."""
    from optlab.core.params import load_params
    from optlab.data import datasets, files
    from optlab.data.prepare import prepare

    (directory / "raw").mkdir()
    files.save_raw(datasets.load("fashion_mnist").raw, directory / "raw")
    params = load_params(REPO / "params.yaml")
    (directory / "prepared").mkdir()
    raw = files.load_raw(directory / "raw")
    files.save_prepared(prepare(raw, params.prepare, flatten=params.flat_input), directory / "prepared")


def worker(data: Path, replicas: int, seed: int, epochs: int) -> dict:
    """The default experiment with ``replicas`` replicas from ``seed``: seconds of each epoch."""
    from optlab.core.params import load_variant
    from optlab.training.backend import configure

    params = load_variant(REPO, [f"train.replicas={replicas}", f"seed={seed}", f"train.epochs={epochs}"])
    configure("jax")
    import math

    from optlab.data import files
    from optlab.training.loop import Member, fit, replica_params, trainer_for

    prepared = files.load_prepared(data, ("train", "val"))
    train, val = prepared.splits["train"], prepared.splits["val"]
    steps = math.ceil(len(train.y) / params.train.batch_size)
    members = [Member.build(replica_params(params, r), train.x.shape[1:], 10, steps) for r in range(replicas)]
    fit(members, trainer_for(members, train, val))
    return {"epoch_seconds": members[0].history.seconds,
            "val_accuracy": [m.history.epochs[-1]["val_accuracy"] for m in members]}  # fmt: skip


def _run(args: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)


def one_process(data: Path, replicas: int, epochs: int) -> tuple[float, float]:
    """One process training ``replicas`` replicas: (median epoch seconds after the first, wall / epochs)."""
    started = time.perf_counter()
    proc = _run([sys.executable, __file__, "--worker", str(data), str(replicas), "0", str(epochs)])
    out = json.loads(proc.communicate()[0].strip().splitlines()[-1])
    return float(np.median(out["epoch_seconds"][1:])), (time.perf_counter() - started) / epochs


def separate_processes(data: Path, replicas: int, epochs: int) -> tuple[float, float]:
    """R one-seed processes, two at a time with one thread each, as `dvc queue start -j 2` runs them:
    (steady seconds per epoch of all R: the sum of their median epochs over the 2 running at once,
    wall / epochs, start-up and compilation included)."""
    started, pending, running, medians = time.perf_counter(), list(range(replicas)), [], []
    while pending or running:
        while pending and len(running) < 2:
            seed = pending.pop(0)
            cmd = [sys.executable, __file__, "--worker", str(data), "1", str(seed), str(epochs)]
            running.append(_run(cmd, {"OPTLAB_THREADS": "1"}))
        out = json.loads(running.pop(0).communicate()[0].strip().splitlines()[-1])
        medians.append(float(np.median(out["epoch_seconds"][1:])))
    return sum(medians) / min(2, replicas), (time.perf_counter() - started) / epochs


def queue_wall_time(clone: Path, sweeps: list[list[str]]) -> float:
    """Queue each sweep's experiments, run them all with two workers; wall seconds."""
    env = {
        "OPTLAB_THREADS": "1",
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    dvc = [sys.executable, "-m", "dvc"]
    started = time.perf_counter()
    for sets in sweeps:
        subprocess.run([*dvc, "exp", "run", "--queue", *sets], cwd=clone, env={**os.environ, **env}, check=True,
                       capture_output=True)  # fmt: skip
    subprocess.run([*dvc, "queue", "start", "-j", "2"], cwd=clone, env={**os.environ, **env}, check=True,
                   capture_output=True)  # fmt: skip
    while True:
        status = subprocess.run([*dvc, "queue", "status"], cwd=clone, env={**os.environ, **env}, capture_output=True,
                                text=True).stdout  # fmt: skip
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    wall = time.perf_counter() - started
    if "Failed" in status:
        raise SystemExit(f"a queued experiment failed:\n{status}")
    subprocess.run([*dvc, "queue", "stop"], cwd=clone, env={**os.environ, **env}, capture_output=True)
    return wall


def queue_rows(epochs: int) -> dict:
    variants = ["optimizer=adam", "optimizer=sgd", "optimizer=rmsprop"]
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "optlab"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "prepare"], cwd=clone, env=env, check=True)
        length = ["-S", f"train.epochs={epochs}"]
        as_replicas = queue_wall_time(clone, [["-S", v, "-S", "train.replicas=3", *length] for v in variants])
        grid = "optimizer=" + ",".join(v.split("=")[1] for v in variants)
        as_seeds = queue_wall_time(clone, [["-S", grid, "-S", "seed=range(0,3)", *length]])
        shutil.rmtree(clone, ignore_errors=True)
    return {"queue_epochs": epochs, "3x3_as_replicas_s": round(as_replicas, 1),
            "3x3_as_9_experiments_s": round(as_seeds, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per row (the first one compiles)")
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 2, 4, 8], help="none: the queue rows only")
    ap.add_argument("--queue", action="store_true", help="also time 3 variants x 3 seeds through DVC's queue")
    ap.add_argument("--queue-epochs", type=int, default=10, help="epochs of each queued experiment")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        data, replicas, seed, epochs = args.worker
        print(json.dumps(worker(Path(data), int(replicas), int(seed), int(epochs))))
        return
    import jax

    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}, {os.cpu_count()} cores"
    summary: dict[str, object] = {"device": device}
    if args.replicas:
        with tempfile.TemporaryDirectory() as tmp:
            write_data(Path(tmp))
            data = Path(tmp) / "prepared"
            print(f"device: {device}; the default experiment on Fashion-MNIST, {args.epochs} epochs per row")
            print("steady: seconds per epoch once compiled; wall: the whole run / epochs, start-up included")
            print(f"{'R':>3}{'one program steady':>20}{'per replica':>13}{'R processes steady':>20}{'speed-up':>10}"
                  f"{'one program wall':>18}{'R processes wall':>18}")  # fmt: skip
            for r in args.replicas:
                vec, vec_wall = one_process(data, r, args.epochs)
                sep, sep_wall = separate_processes(data, r, args.epochs)
                row = f"{r:>3}{vec:>20.3f}{vec / r:>13.3f}{sep:>20.3f}{sep / vec:>9.2f}x"
                print(f"{row}{vec_wall:>18.3f}{sep_wall:>18.3f}")
                summary[f"R{r}"] = {"vectorized_s_per_epoch": round(vec, 4), "separate_s_per_epoch": round(sep, 4),
                                    "vectorized_wall_s_per_epoch": round(vec_wall, 3),
                                    "separate_wall_s_per_epoch": round(sep_wall, 3)}  # fmt: skip
    if args.queue:
        summary |= queue_rows(args.queue_epochs)
        print(f"3 variants x 3 seeds, {args.queue_epochs} epochs: {summary['3x3_as_replicas_s']} s as 3 experiments "
              "with 3 replicas, "
              f"{summary['3x3_as_9_experiments_s']} s as 9 experiments (dvc queue start -j 2)")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
