"""Peak memory of the train stage on CIFAR-10-sized data, against the size of that data.

Writes a synthetic prepared directory (50,000 x 3072 float32 training images, as CIFAR-10
flattened, plus a small validation split), runs ``stages/train.py`` on it for one epoch in a
child process, and reports the child's peak resident memory (ru_maxrss) beside the size of the
training array, and beside the same process that only imports Keras and stops (the fixed cost
of Python, JAX and Keras).

    python benchmarks/train_memory.py [--n 50000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def synthetic(directory: Path, n: int, n_val: int = 5000, d: int = 3072) -> int:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for split, rows in (("train", n), ("val", n_val), ("test", n_val)):
        # Written in chunks so this script's own memory stays small.
        x = np.lib.format.open_memmap(directory / f"x_{split}.npy", mode="w+", dtype=np.float32, shape=(rows, d))
        for start in range(0, rows, 5000):
            x[start : start + 5000] = rng.uniform(-1, 1, size=(min(5000, rows - start), d)).astype(np.float32)
        x.flush()
        del x
        np.save(directory / f"y_{split}.npy", rng.integers(0, 10, rows).astype(np.int32))
    meta = {"dataset": "cifar10", "classes": [str(i) for i in range(10)], "image_shape": [32, 32, 3]}
    (directory / "meta.json").write_text(json.dumps(meta))
    return n * d * 4


def child_peak_mb(cmd: list[str], cwd: Path) -> float:
    """Peak RSS of one child process, in MB (each measured in a fresh wrapper process)."""
    wrapper = (
        "import resource, subprocess, sys; "
        f"r = subprocess.run({cmd!r}, cwd={str(cwd)!r}); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="training images (CIFAR-10: 50,000)")
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_bytes = synthetic(work / "prepared", args.n)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["dataset"] = "cifar10"
        params["train"]["epochs"] = args.epochs
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        base = child_peak_mb([sys.executable, "-c", "import os; os.environ['KERAS_BACKEND']='jax'; import keras, jax.numpy as jnp; jnp.zeros(1).block_until_ready()"], work)
        train_cmd = [sys.executable, str(REPO / "stages/train.py"), "--data", "prepared", "--model", "model.keras", "--live", "live"]
        peak = child_peak_mb(train_cmd, work)
    data_mb = data_bytes / 2**20
    print(f"training data {data_mb:.0f} MB; train stage peak RSS {peak:.0f} MB ({peak / data_mb:.2f}x the data); "
          f"Python + JAX + Keras alone {base:.0f} MB; above that baseline {(peak - base) / data_mb:.2f}x the data")
    print(json.dumps({"data_mb": round(data_mb), "peak_rss_mb": round(peak), "ratio": round(peak / data_mb, 2),
                      "baseline_mb": round(base), "ratio_above_baseline": round((peak - base) / data_mb, 2)}))


if __name__ == "__main__":
    main()
