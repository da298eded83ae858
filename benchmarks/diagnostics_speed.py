"""What the sharpness, the preconditioned sharpness and the gradient noise scale cost
(``optlab.training.hessian``), as a share of the default MLP's epoch on Fashion-MNIST, and the
seconds of ``optlab landscape``'s 25 x 25 plane.

The default experiment (params.yaml: Dense 128-64 relu, dropout 0.1, Adam with warm-up + cosine,
batch 32, 54,000 training images) trains ``--epochs`` epochs in the compiled loop with the
per-layer diagnostics on, as the train stage does. After each epoch every measurement runs on its
own on the same weights, timed alone (compiled beforehand), at each subset size of ``--images``:

- sharpness: Lanczos on the Hessian of the loss of the first N training images (no preconditioner);
- preconditioned sharpness: the same on Adam's P^-1/2 H P^-1/2 (Cohen et al. 2022);
- noise scale: per-example gradients of the first N images;
- all three together, as the train stage runs them for Adam (one compiled program).

Shares are of the median epoch (training and validation, after the first, which compiles), each
measurement's median over the epochs. Then the whole epoch driver (``fit``) runs the same epochs
with the defaults and with both measurements off, for the end-to-end difference. Last, the
landscape: the 625 points of a 25 x 25 plane and the 2 x 31 points of the line, each evaluated on
10,000 training images (optlab landscape's default).

    python benchmarks/diagnostics_speed.py [--epochs 6] [--images 512 1024] [--data DIR]

``--data``: a prepared Fashion-MNIST directory (flat), else it is prepared into a temporary one
from the first genuine source (benchmarks/train_speed.py's). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_seconds(fn, repeats: int = 3) -> float:
    import jax

    jax.block_until_ready(fn())  # compiled, and warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measurements(images: list[int], n_train: int, model, adam):
    """Per label, a Curvature measuring that one thing alone (sharpness without a preconditioner: as
    for an optimizer that has none)."""
    import keras

    from optlab.training import hessian

    sgd = keras.optimizers.SGD(1e-3)
    found = {}
    for n in images:
        found[f"sharpness ({n} images)"] = hessian.Curvature(model, sgd, hessian.Settings(n, 0, 1), n_train)
        found[f"sharpness + preconditioned ({n})"] = hessian.Curvature(model, adam, hessian.Settings(n, 0, 1), n_train)
        found[f"noise scale ({n} images)"] = hessian.Curvature(model, sgd, hessian.Settings(0, n, 1), n_train)
        found[f"all three ({n}: the train stage's)"] = hessian.Curvature(
            model, adam, hessian.Settings(n, n, 1), n_train
        )
    return found


def diagnostics_costs(data: Path, epochs: int, images: list[int]) -> dict:
    """Each measurement's median seconds after each epoch, against the median epoch's."""
    from optlab.core.params import load_params
    from optlab.data import files
    from optlab.training.loop import CompiledTrainer, Member

    params = load_params(REPO / "params.yaml")
    prepared = files.load_prepared(data, ("train", "val"))
    train, val = prepared.splits["train"], prepared.splits["val"]
    member = Member.build(params, train.x.shape[1:], 10, math.ceil(len(train.y) / params.train.batch_size))
    trainer = CompiledTrainer([member], train, val, diagnostics=True)
    engine = trainer.engine
    timed = measurements(images, len(train.y), engine.program.model, engine.program.optimizer)
    epoch_seconds, costs = [], {label: [] for label in timed}
    for epoch in range(epochs):
        started = time.perf_counter()
        trainer.train_epoch(epoch, [0], None)
        trainer.validate([0])
        epoch_seconds.append(time.perf_counter() - started)
        state = engine.state()
        for label, curvature in timed.items():
            run = functools.partial(curvature._measure, *state, trainer.x, trainer.y)
            costs[label].append(median_seconds(run, 2))
        shown = ", ".join(f"{k} {v[-1]:.3f} s" for k, v in costs.items())
        print(f"epoch {epoch + 1}: {epoch_seconds[-1]:.3f} s; {shown}", flush=True)
    epoch = statistics.median(epoch_seconds[1:])
    return {"epoch_seconds": round(epoch, 4),
            "seconds": {k: round(statistics.median(v), 4) for k, v in costs.items()},
            "share_of_epoch": {k: round(statistics.median(v) / epoch, 4) for k, v in costs.items()}}  # fmt: skip


def end_to_end(data: Path, epochs: int, rounds: int = 2) -> dict:
    """The epoch driver's seconds per epoch (training, validation and the diagnostics after it) with
    the defaults, and with the sharpness and the noise scale off: ``rounds`` runs of each, taken in
    turn so that both see the same machine; the median over every epoch after the first of a run."""
    from optlab.core.params import load_params
    from optlab.data import files
    from optlab.training.loop import Member, fit, trainer_for

    prepared = files.load_prepared(data, ("train", "val"))
    train, val = prepared.splits["train"], prepared.splits["val"]
    configs = {"defaults": {}, "sharpness and noise scale off": {"train.sharpness_images": 0,
                                                                  "train.noise_scale_images": 0}}  # fmt: skip
    seconds = {label: [] for label in configs}
    for _ in range(rounds):
        for label, knobs in configs.items():
            params = load_params(REPO / "params.yaml", {"train.epochs": epochs, **knobs})
            member = Member.build(params, train.x.shape[1:], 10, math.ceil(len(train.y) / params.train.batch_size))
            ends = []
            fit(
                [member],
                trainer_for([member], train, val),
                after_epoch=lambda e, ends=ends: ends.append(time.perf_counter()),
            )
            seconds[label] += [b - a for a, b in zip(ends, ends[1:], strict=False)]
    found = {label: round(statistics.median(v), 4) for label, v in seconds.items()}
    found["difference"] = round(found["defaults"] / found["sharpness and noise scale off"] - 1, 4)
    return found


def landscape_seconds(data: Path) -> dict:
    """optlab landscape's plane (25 x 25 points) and line (2 x 31), on its default 10,000 images."""
    import numpy as np

    from optlab.core.params import load_params
    from optlab.data import files
    from optlab.study import landscape
    from optlab.training.loop import Member

    params = load_params(REPO / "params.yaml")
    prepared = files.load_prepared(data, ("train", "val"))
    train, val = prepared.splits["train"], prepared.splits["val"]
    model = Member.build(params, train.x.shape[1:], 10, 1).model
    n = landscape.TRAIN_IMAGES
    evaluate = landscape.Evaluator(model, train.x[:n], train.y[:n]), landscape.Evaluator(model, val.x, val.y)
    center = landscape.Point.of(model)
    rng = np.random.default_rng(0)
    d1, d2 = landscape.filter_normalized(model, rng), landscape.filter_normalized(model, rng)
    coords = np.linspace(-1, 1, 25)
    landscape.grid(evaluate[0], center, d1, d2, coords[:1], coords[:1])  # compiled once
    landscape.line(*evaluate, center, center)
    started = time.perf_counter()
    landscape.grid(evaluate[0], center, d1, d2, coords, coords)
    plane = time.perf_counter() - started
    started = time.perf_counter()
    landscape.line(*evaluate, center, landscape.Point(center.flat + d1, center.rest))
    return {"plane_25x25_seconds": round(plane, 2), "line_seconds": round(time.perf_counter() - started, 2),
            "train_images": n}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--images", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--data", type=Path, help="prepared Fashion-MNIST, flat (default: prepare it into a temporary one)")
    args = p.parse_args(argv)
    from optlab.training.backend import configure

    configure("jax")
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            import importlib.util  # benchmarks/ is no package: its train_speed.py, by path

            spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "train_speed.py")
            train_speed = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(train_speed)
            train_speed.write_data(Path(scratch))
            data = Path(scratch) / "mlp"
        found = {"diagnostics": diagnostics_costs(data, args.epochs, args.images)}
        found["end_to_end_seconds_per_epoch"] = end_to_end(data, args.epochs)
        found["landscape"] = landscape_seconds(data)
    print(json.dumps(found))


if __name__ == "__main__":
    main()
