"""The same sweep through `optlab sweep --executor local` (DVC's queue) and `--executor ray` (a
local Ray cluster started here with `ray start --head --num-cpus=2`), side by side on this
machine: wall time of the whole sweep, per experiment, and Ray's memory (the resident memory of
Ray's own processes, idle and at the sweep's peak).

    python benchmarks/sweep_overhead.py [--epochs 5]

A temporary clone of this repository's committed HEAD gets a local bare git remote and a local
DVC remote; the prepared data is pushed first (as a user would before a cluster sweep). The grid
is 4 optimizers x 2 seeds of the default experiment on Fashion-MNIST with fewer epochs. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = ["optimizer=adam,sgd,rmsprop,nadam", "seed=range(0,2)"]


def sh(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def ray_rss_mb() -> float:
    """Resident memory of Ray's processes (GCS, raylet, workers, agents), from /proc."""
    total = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"ray" not in cmdline or b"sweep_overhead" in cmdline:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def timed_sweep(root: Path, env: dict, *args: str) -> tuple[float, float]:
    """Wall seconds of one optlab sweep, and the peak of Ray's memory while it ran (MB)."""
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], ray_rss_mb())
            time.sleep(1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    out = sh(
        root, sys.executable, "-m", "optlab.study.cli", "sweep", *[a for g in GRID for a in ("-S", g)], *args, env=env
    )
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if " 0 failed" not in out:
        raise SystemExit(f"the sweep had failures:\n{out}")
    return wall, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root, remote, storage = base / "optlab", base / "remote.git", base / "storage"
        sh(base, "git", "init", "-q", "--bare", "-b", "main", str(remote))
        sh(base, "git", "clone", "-q", str(REPO), str(root))
        sh(root, "git", "checkout", "-q", "-B", "main")
        for key, value in (("user.name", "optlab bench"), ("user.email", "bench@optlab.invalid")):
            sh(root, "git", "config", key, value)
        conf = root / "conf/config.yaml"
        conf.write_text(conf.read_text().replace("  epochs: 20", f"  epochs: {args.epochs}", 1))
        sh(root, sys.executable, "-m", "optlab.study.cli", "params", env=env)
        sh(root, sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", str(storage), env=env)
        sh(root, sys.executable, "-m", "dvc", "repro", "-q", "prepare", env=env)
        sh(root, sys.executable, "-m", "dvc", "push", "-q", env=env)
        sh(root, "git", "commit", "-q", "-am", f"{args.epochs} epochs, a local DVC remote, the data prepared")
        sh(root, "git", "remote", "set-url", "origin", str(remote))
        sh(root, "git", "push", "-q", "origin", "main")

        local, _ = timed_sweep(root, env, "--executor", "local", "-j", "2")
        print(f"--executor local -j 2: 8 experiments in {local:.0f} s")

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray_env = {**env, "PYTHONPATH": str(root / "src")}
        sh(root, f"{bin_dir}/ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
           "--disable-usage-stats", env=ray_env)  # fmt: skip
        try:
            time.sleep(5)
            idle = ray_rss_mb()
            ray_wall, peak = timed_sweep(root, env, "--executor", "ray", "--address", f"127.0.0.1:{port}")
        finally:
            subprocess.run([f"{bin_dir}/ray", "stop", "--force"], capture_output=True, env={**os.environ, **env})
        print(f"--executor ray (2 CPUs): 8 experiments in {ray_wall:.0f} s; Ray's processes: {idle:.0f} MB idle, "
              f"{peak:.0f} MB at the peak (its workers' training included)")  # fmt: skip
    print(json.dumps({"epochs": args.epochs, "experiments": 8, "local_s": round(local, 1), "ray_s": round(ray_wall, 1),
                      "ray_overhead_s_per_experiment": round((ray_wall - local) / 8, 1),
                      "ray_idle_mb": round(idle), "ray_peak_mb": round(peak)}))  # fmt: skip


if __name__ == "__main__":
    main()
