"""Seconds the prepare stage takes on a CIFAR-10-sized input (50,000 + 10,000 random 32x32x3
uint8 images), beside the plain NumPy recipe it replaces (gather, float64 arithmetic, cast).

    python benchmarks/prepare_speed.py [--repeats 3]

Prints the best of the repeats for each scaling: `prepare()` on arrays in memory, the naive
recipe on the same arrays, and the whole stage script (memory-mapped load, prepare, np.save).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import runpy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from optlab.core.params import load_params
from optlab.data.files import RawData, RawMeta, save_raw
from optlab.data.prepare import prepare, stratified_split

REPO = Path(__file__).resolve().parents[1]
SCALINGS = ("minus_one_one", "zero_one", "standardize")


def synthetic_cifar10() -> RawData:
    rng = np.random.default_rng(0)
    return RawData(
        x_train=rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 50_000).astype(np.uint8),
        x_test=rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 10_000).astype(np.uint8),
        meta=RawMeta(dataset="cifar10", classes=[str(k) for k in range(10)], image_shape=(32, 32, 3)),
    )


def naive(raw: RawData, params) -> dict[str, np.ndarray]:
    """The notebook recipe: copy the splits out, scale in float64, cast at the end."""
    train, val = stratified_split(raw.y_train, params.val_fraction, params.seed)
    x = {"train": raw.x_train[train], "val": raw.x_train[val], "test": raw.x_test}
    mean = x["train"].mean(axis=(0, 1, 2)) / 255
    std = (x["train"] / 255).std(axis=(0, 1, 2))
    scalings = {
        "minus_one_one": lambda a: a / 127.5 - 1,
        "zero_one": lambda a: a / 255,
        "standardize": lambda a: (a / 255 - mean) / std,
    }
    return {k: scalings[params.scale](v).reshape(len(v), -1).astype(np.float32) for k, v in x.items()}


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def stage_runner(raw: RawData, root: Path, scaling: str) -> Callable[[], None]:
    (root / "data/raw").mkdir(parents=True, exist_ok=True)
    save_raw(raw, root / "data/raw")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(dataset="cifar10", prepare={**params["prepare"], "scale": scaling})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    if not (root / "conf").exists():
        (root / "conf").symlink_to(REPO / "conf")  # the options of the params' groups, as in a checkout
    main = runpy.run_path(str(REPO / "stages/prepare.py"))["main"]
    argv = [f"--params={root}/params.yaml", f"--raw={root}/data/raw", f"--out={root}/data/prepared",
            f"--summary={root}/metrics/data.json"]  # fmt: skip

    def run_quietly() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            main(argv)

    return run_quietly


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    raw = synthetic_cifar10()
    print(f"{'scale':<15}{'prepare()':>12}{'naive':>12}{'stage':>12}   (seconds, best of {args.repeats})")
    with tempfile.TemporaryDirectory() as tmp:
        for scaling in SCALINGS:
            params = load_params(REPO / "params.yaml", {"prepare.scale": scaling}).prepare
            ours = best_seconds(lambda params=params: prepare(raw, params), args.repeats)
            plain = best_seconds(lambda params=params: naive(raw, params), args.repeats)
            stage = best_seconds(stage_runner(raw, Path(tmp) / scaling, scaling), args.repeats)
            print(f"{scaling:<15}{ours:>12.2f}{plain:>12.2f}{stage:>12.2f}")


if __name__ == "__main__":
    main()
