"""Peak memory of the train stage on CIFAR-10-sized data, against the size of that data.

Writes a synthetic prepared directory shaped as ``prepare`` leaves CIFAR-10 flattened: its
50,000 training images (x 3072 float32 = 586 MB) split 45,000 train / 5,000 validation, plus
the 10,000 test images (which training never reads). Runs the train stage on it in a child
process and reports the child's peak resident memory (ru_maxrss) against the size of those
50,000 images. It also runs the same stage on 1% of the images: that peak is the fixed cost
(Python, JAX, Keras, XLA's compiler), so what grows with the data is told apart from it.

    python benchmarks/train_memory.py [--n 50000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from optlab.data.files import META, PreparedMeta

REPO = Path(__file__).resolve().parents[1]


def synthetic(directory: Path, n: int, d: int = 3072) -> int:
    """``n`` images split 90/10 into train and validation (prepare's default), and a test split."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    n_val = n // 10
    for split, rows in (("train", n - n_val), ("val", n_val), ("test", n // 5)):
        # Written in chunks so this script's own memory stays small.
        x = np.lib.format.open_memmap(directory / f"x_{split}.npy", mode="w+", dtype=np.float32, shape=(rows, d))
        for start in range(0, rows, 5000):
            x[start : start + 5000] = rng.uniform(-1, 1, size=(min(5000, rows - start), d)).astype(np.float32)
        x.flush()
        del x
        np.save(directory / f"y_{split}.npy", rng.integers(0, 10, rows).astype(np.int32))
    meta = PreparedMeta(dataset="cifar10", classes=[str(i) for i in range(10)], image_shape=(32, 32, 3),
                        scale="minus_one_one", flatten=True, val_fraction=0.1, split_seed=0)  # fmt: skip
    (directory / META).write_text(meta.model_dump_json(exclude_none=True))
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


def measure(n: int = 50_000, epochs: int = 1, train: dict | None = None) -> dict:
    """Peak RSS of the train stage on ``n`` images and on 1% of them, in MB; ``train``: knobs of
    params.yaml's train section to set (``{"sharpness_images": 0}``)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["dataset"] = "cifar10"
        params["train"] |= {"epochs": epochs, **(train or {})}
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        (work / "conf").symlink_to(REPO / "conf")  # the options of the params' groups, as in a checkout
        peaks = {}
        for name, rows in (("fixed", max(n // 100, 100)), ("full", n)):
            data_bytes = synthetic(work / name, rows)
            cmd = [sys.executable, str(REPO / "stages" / "train.py"), "--data", name, "--model", f"{name}.keras",
                   "--replicas", f"replicas-{name}", "--live", f"live-{name}", "--backup", "backup",
                   "--tensorboard-logs", "logs"]  # fmt: skip
            peaks[name] = child_peak_mb(cmd, work)
    data_mb, peak, fixed = data_bytes / 2**20, peaks["full"], peaks["fixed"]
    return {
        "data_mb": round(data_mb),
        "peak_rss_mb": round(peak),
        "ratio": round(peak / data_mb, 2),
        "fixed_mb": round(fixed),
        "ratio_above_fixed": round((peak - fixed) / data_mb, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="images before the train/validation split (CIFAR-10: 50,000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train", nargs="*", default=[], metavar="KNOB=INT", help="train.* knobs to set, e.g. "
                    "sharpness_images=0 noise_scale_images=0 (the cost of the curvature measurements)")  # fmt: skip
    args = ap.parse_args()
    r = measure(args.n, args.epochs, {k: int(v) for k, v in (kv.split("=", 1) for kv in args.train)})
    print(
        f"training images {r['data_mb']} MB; train stage peak RSS {r['peak_rss_mb']} MB ({r['ratio']:.2f}x the data); "
        f"on 1% of the data {r['fixed_mb']} MB (the fixed cost); above it {r['ratio_above_fixed']:.2f}x the data"
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
