"""Training speed: optlab's default path against plain Keras ``fit``, side by side, for the MLP and
the CNN.

MLP rows. The reference is the source reports' recipe as a user writes it: Fashion-MNIST scaled
to [-1, 1] and flattened, ``keras.Sequential`` Dense 128-64 relu + softmax, Adam 1e-3, sparse
categorical cross-entropy, ``model.fit(batch_size=32, validation_data=...)`` on the default
TensorFlow backend. A middle row, Keras ``fit`` on the JAX backend, separates what the backend
gives from what optlab's compiled epoch loop gives.

CNN rows. optlab's default CNN (conv 32-32-pool-64-64-pool, global pooling, dense 128-64), the
same Keras model for every row, Adam 1e-3, batch 32, on the first ``--cnn-images`` training
images (a whole epoch of 54,000 takes minutes): Keras ``fit`` on TensorFlow, Keras ``fit`` on
JAX, optlab's default path (``train.backend/loop: auto``, which picks TensorFlow for a CNN on a
CPU), and optlab's compiled loop on JAX for comparison.

Each row runs in its own process (a backend is fixed per process) one after the other, so they
see the same machine. Seconds per epoch are the median over epochs after the first (the first
includes tracing and compiling). The last line printed is one JSON object.

    python benchmarks/train_speed.py [--epochs 10] [--cnn-epochs 5] [--cnn-images 6400] [--only mlp|cnn]
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HIDDEN = [128, 64]
BATCH = 32
LR = 1e-3
FULL_EPOCH = 54_000  # Fashion-MNIST training images after the 10% validation split


def write_data(directory: Path) -> None:
    """Fashion-MNIST through optlab's own download and prepare code ([-1, 1], 10% validation),
    flattened for the MLP (``mlp/``) and as images for the CNN (``cnn/``)."""
    from optlab.core.params import load_params
    from optlab.data import datasets, files
    from optlab.data.prepare import prepare

    (directory / "raw").mkdir()
    files.save_raw(datasets.load("fashion_mnist").raw, directory / "raw")
    raw = files.load_raw(directory / "raw")
    for model, flatten in (("mlp", True), ("cnn", False)):
        knobs = {"prepare.scale": "minus_one_one", "prepare.val_fraction": 0.1}
        (directory / model).mkdir()
        prepared = prepare(raw, load_params(REPO / "params.yaml", knobs).prepare, flatten=flatten)
        files.save_prepared(prepared, directory / model)


def experiment(model: str, epochs: int, **overrides):
    """The repository's experiment (conf/) with the benchmark's recipe: Adam 1e-3, constant rate,
    no dropout, as `dvc exp run -S ...` would compose it."""
    from optlab.core.params import load_variant

    knobs = {
        "optimizer": "adam",
        "schedule": "constant",
        "optimizer.learning_rate": LR,
        "dataset": "fashion_mnist",
        "model.name": model,
        "model.hidden": HIDDEN,
        "model.dropout": 0.0,
        "model.activation": "relu",
        "model.batch_norm": False,
        "model.l2": 0.0,
        "model.augment": False,
        "train.epochs": epochs,
        "train.batch_size": BATCH,
        **overrides,
    }
    # `++key=value` sets a knob whether conf/ lists it or leaves it to its default.
    return load_variant(REPO, [f"{'++' if '.' in k else ''}{k}={_hydra(v)}" for k, v in knobs.items()])


def _hydra(value) -> str:
    """A value in Hydra's override syntax (lists as [a,b], booleans lower-case)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _splits(data: Path, n_train: int | None):
    from optlab.data import files

    prepared = files.load_prepared(data)
    train, val, test = (prepared.splits[s] for s in files.SPLITS)
    if n_train:
        train = files.Split(train.x[:n_train], train.y[:n_train])
    return train, val, test


# --- the rows, each run as `python train_speed.py --worker ROW DATA EPOCHS N_TRAIN` --------------
def keras_fit(data: Path, epochs: int, n_train: int, backend: str, model: str) -> dict:
    """Plain Keras: the notebook recipe (MLP) or optlab's CNN as a Keras model, then ``fit``."""
    os.environ["KERAS_BACKEND"] = backend
    import keras

    train, val, test = _splits(data, n_train)
    keras.utils.set_random_seed(0)
    if model == "mlp":
        net = keras.Sequential(
            [keras.Input(train.x.shape[1:]), *[keras.layers.Dense(u, activation="relu") for u in HIDDEN]]
            + [keras.layers.Dense(10, activation="softmax")]
        )
    else:
        from optlab.training.models import build_model

        net = build_model(experiment("cnn", epochs).model, train.x.shape[1:], 10, seed=0)
    net.compile(optimizer=keras.optimizers.Adam(LR), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    times: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: times.append(time.perf_counter()),
        on_epoch_end=lambda e, logs: times.__setitem__(-1, time.perf_counter() - times[-1]),
    )
    net.fit(train.x, train.y, batch_size=BATCH, epochs=epochs, validation_data=(val.x, val.y), callbacks=[timer],
            verbose=0)  # fmt: skip
    _, acc = net.evaluate(test.x, test.y, batch_size=1024, verbose=0)
    return {"epoch_seconds": times, "test_accuracy": float(acc)}


def optlab_path(data: Path, epochs: int, n_train: int, model: str, bare: bool = False, **engine) -> dict:
    """optlab's train stage code path: params, the engine they choose, a member built and trained by
    the epoch driver, with the per-epoch progress lines (to /dev/null) and the backprop diagnostics
    as in a real run. ``bare``: neither, and each epoch one compiled call, to measure what they cost."""
    import math

    from optlab.training.backend import configure, engine_for

    params = experiment(model, epochs, **{"train.diagnostics": not bare, **engine})
    configure(engine_for(params).backend)
    from optlab.training import engine as compiled
    from optlab.training.callbacks import Progress
    from optlab.training.loop import Member, fit, resolve_engine, trainer_for

    if bare:
        compiled.CHUNK_STEPS = 1 << 30  # the whole epoch in one call: no point to show progress at
    train, val, test = _splits(data, n_train)
    member = Member.build(params, train.x.shape[1:], 10, math.ceil(len(train.y) / BATCH))
    trainer = trainer_for([member], train, val)
    with open(os.devnull, "w") as quiet:
        fit([member], trainer, progress=None if bare else Progress(epochs, quiet))
    choice = resolve_engine(params)
    return {
        "epoch_seconds": member.history.seconds,
        "test_accuracy": trainer.measure(test)[0]["accuracy"],
        "engine": f"{choice.backend}/{choice.loop}",
    }


REFERENCE_BACKEND = os.environ.get("OPTLAB_BENCH_REFERENCE_BACKEND", "tensorflow")
ROWS = {
    "mlp": {
        "reference": lambda d, e, n: keras_fit(d, e, n, REFERENCE_BACKEND, "mlp"),
        "keras_jax_fit": lambda d, e, n: keras_fit(d, e, n, "jax", "mlp"),
        "optlab": lambda d, e, n: optlab_path(d, e, n, "mlp"),
        "optlab_bare": lambda d, e, n: optlab_path(d, e, n, "mlp", bare=True),
    },
    "cnn": {
        "reference": lambda d, e, n: keras_fit(d, e, n, REFERENCE_BACKEND, "cnn"),
        "keras_jax_fit": lambda d, e, n: keras_fit(d, e, n, "jax", "cnn"),
        "optlab": lambda d, e, n: optlab_path(d, e, n, "cnn"),
        "optlab_jax_compiled": lambda d, e, n: optlab_path(
            d, e, n, "cnn", **{"train.backend": "jax", "train.loop": "compiled"}
        ),
    },
}


def run_worker(model: str, row: str, data: Path, epochs: int, n_train: int) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, __file__, "--worker", model, row, str(data / model), str(epochs), str(n_train)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{model} {row} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    steady = result["epoch_seconds"][1:] or result["epoch_seconds"]
    result["s_per_epoch"] = float(np.median(steady))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10, help="MLP epochs per row (the recipe uses 10)")
    ap.add_argument("--cnn-epochs", type=int, default=5, help="CNN epochs per row (the first one compiles)")
    ap.add_argument("--cnn-images", type=int, default=6400, help="CNN training images per epoch (0: all 54,000)")
    ap.add_argument("--only", choices=["mlp", "cnn"], help="one model's rows only")
    ap.add_argument("--skip-jax-fit", action="store_true", help="leave out the Keras-fit-on-JAX rows")
    ap.add_argument(
        "--reference-backend",
        choices=["tensorflow", "jax"],
        default="tensorflow",
        help="backend of the reference fit; jax where TensorFlow is absent (the GPU machine)",
    )
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, row, data, epochs, n_train = args.worker
        print(json.dumps(ROWS[model][row](Path(data), int(epochs), int(n_train))))
        return

    os.environ["OPTLAB_BENCH_REFERENCE_BACKEND"] = args.reference_backend  # the workers read it
    import jax

    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}, {os.cpu_count()} cores"
    plan = {"mlp": (args.epochs, 0), "cnn": (args.cnn_epochs, args.cnn_images)}
    models = [args.only] if args.only else list(plan)
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_data(data)
        for model in models:
            epochs, n_train = plan[model]
            skip_middle = args.skip_jax_fit or args.reference_backend == "jax"  # it would repeat the reference
            rows = [r for r in ROWS[model] if not (skip_middle and r == "keras_jax_fit")]
            results[model] = {row: run_worker(model, row, data, epochs, n_train) for row in rows}

    print(f"device: {device}; Fashion-MNIST, Adam {LR}, batch {BATCH}")
    summary: dict[str, object] = {"device": device, "reference_backend": args.reference_backend}
    for model, rows in results.items():
        epochs, n_train = plan[model]
        images = n_train or FULL_EPOCH
        print(f"\n{model}: {epochs} epochs of {images} images")
        print(f"{'row':<22}{'s/epoch':>10}{'s per 54k':>11}{'first s':>9}{'test acc':>10}{'speed-up':>10}  engine")
        ref = rows["reference"]["s_per_epoch"]
        for row, r in rows.items():
            full = r["s_per_epoch"] * FULL_EPOCH / images
            cells = f"{r['s_per_epoch']:>10.3f}{full:>11.1f}{r['epoch_seconds'][0]:>9.2f}{r['test_accuracy']:>10.4f}"
            print(f"{row:<22}{cells}{ref / r['s_per_epoch']:>9.2f}x  {r.get('engine', '')}")
        summary[model] = {
            "images_per_epoch": images,
            "epochs": epochs,
            **{f"{row}_s_per_epoch": round(r["s_per_epoch"], 4) for row, r in rows.items()},
            **{f"{row}_test_accuracy": round(r["test_accuracy"], 4) for row, r in rows.items()},
            "ratio": round(ref / rows["optlab"]["s_per_epoch"], 2),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
