"""Training speed: optlab's train loop against the plain Keras notebook recipe, side by side.

The reference is the source reports' recipe as a user writes it: Fashion-MNIST scaled to
[-1, 1] and flattened, ``keras.Sequential`` Dense 128-64 relu + softmax, Adam 1e-3,
sparse categorical cross-entropy, ``model.fit(batch_size=32, validation_data=...)`` on the
default TensorFlow backend. optlab trains the same model with the same hyper-parameters on the
same arrays. A middle row, Keras ``fit`` on the JAX backend, separates what the backend gives
from what the compiled epoch loop gives.

Each variant runs in its own process (a backend is fixed per process) one after the other, so
they see the same machine. Seconds per epoch are the median over epochs after the first (the
first includes tracing and compiling). The last line printed is one JSON object.

    python benchmarks/train_speed.py [--epochs 10] [--skip-reference]
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


def write_data(directory: Path) -> None:
    """Fashion-MNIST through optlab's own download and prepare code: [-1, 1], flat, 10% validation."""
    from optlab import artifacts, datasets
    from optlab.params import load_params
    from optlab.prepare import prepare

    (directory / "raw").mkdir()
    artifacts.save_raw(datasets.load("fashion_mnist").raw, directory / "raw")
    params = load_params(REPO / "params.yaml", {"prepare.scale": "minus_one_one", "prepare.flatten": True,
                                                "prepare.val_fraction": 0.1})  # fmt: skip
    artifacts.save_prepared(prepare(artifacts.load_raw(directory / "raw"), params.prepare), directory)


# --- the variants, each run as `python train_speed.py --worker NAME DATA EPOCHS` -------------------
def reference(data: Path, epochs: int, backend: str) -> dict:
    """The notebook recipe, verbatim Keras."""
    os.environ["KERAS_BACKEND"] = backend
    import keras

    x, y = np.load(data / "x_train.npy"), np.load(data / "y_train.npy")
    xv, yv = np.load(data / "x_val.npy"), np.load(data / "y_val.npy")
    xt, yt = np.load(data / "x_test.npy"), np.load(data / "y_test.npy")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            *[keras.layers.Dense(u, activation="relu") for u in HIDDEN],
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(LR), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    times: list[float] = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: times.append(time.perf_counter()),
        on_epoch_end=lambda e, logs: times.__setitem__(-1, time.perf_counter() - times[-1]),
    )
    model.fit(x, y, batch_size=BATCH, epochs=epochs, validation_data=(xv, yv), callbacks=[timer], verbose=0)
    _, acc = model.evaluate(xt, yt, batch_size=1024, verbose=0)
    return {"epoch_seconds": times, "test_accuracy": float(acc)}


def optlab_loop(data: Path, epochs: int) -> dict:
    """optlab's train stage code path with the recipe's hyper-parameters."""
    from optlab.backend import configure
    from optlab.params import load_params

    params = load_params(REPO / "params.yaml", {
        "dataset": "fashion_mnist", "optimizer": "adam", "schedule": "constant", "optim.adam.learning_rate": LR,
        "model.name": "mlp", "model.hidden": HIDDEN, "model.dropout": 0.0, "model.activation": "relu",
        "model.batch_norm": False, "model.l2": 0.0, "train.epochs": epochs, "train.batch_size": BATCH,
        "train.backend": "jax", "train.loop": "compiled",
    })  # fmt: skip
    configure(params.train.backend)
    from optlab import artifacts
    from optlab.loop import Loop

    data = artifacts.load_prepared(data)
    train, val, test = (data.splits[s] for s in artifacts.SPLITS)
    loop = Loop.build(params, data.meta.input_shape, len(data.meta.classes), len(train.y))
    history = loop.fit(train, val)
    return {"epoch_seconds": history.seconds, "test_accuracy": loop.measure(test)["accuracy"]}


REFERENCE_BACKEND = os.environ.get("OPTLAB_BENCH_REFERENCE_BACKEND", "tensorflow")

WORKERS = {
    "reference": lambda d, e: reference(d, e, REFERENCE_BACKEND),
    "keras_jax_fit": lambda d, e: reference(d, e, "jax"),
    "optlab": optlab_loop,
}


def run_worker(name: str, data: Path, epochs: int) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, str(data), str(epochs)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    steady = result["epoch_seconds"][1:] or result["epoch_seconds"]
    result["s_per_epoch"] = float(np.median(steady))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10, help="epochs per variant (the recipe uses 10)")
    ap.add_argument("--skip-jax-fit", action="store_true", help="leave out the Keras-fit-on-JAX middle row")
    ap.add_argument(
        "--reference-backend",
        choices=["tensorflow", "jax"],
        default="tensorflow",
        help="backend of the reference fit; jax where TensorFlow is absent (the GPU machine)",
    )
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, data, epochs = args.worker
        print(json.dumps(WORKERS[name](Path(data), int(epochs))))
        return

    os.environ["OPTLAB_BENCH_REFERENCE_BACKEND"] = args.reference_backend  # the workers read it
    import jax

    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_data(data)
        skip_middle = args.skip_jax_fit or args.reference_backend == "jax"  # it would repeat the reference
        names = ["reference", "optlab"] if skip_middle else ["reference", "keras_jax_fit", "optlab"]
        results = {name: run_worker(name, data, args.epochs) for name in names}

    print(f"device: {device}; Fashion-MNIST, Dense {HIDDEN} relu, Adam {LR}, batch {BATCH}, {args.epochs} epochs")
    print(f"{'variant':<16}{'s/epoch':>10}{'first epoch s':>15}{'test acc':>10}{'speed-up':>10}")
    ref = results["reference"]["s_per_epoch"]
    for name, r in results.items():
        speedup = ref / r["s_per_epoch"]
        row = f"{r['s_per_epoch']:>10.3f}{r['epoch_seconds'][0]:>15.2f}{r['test_accuracy']:>10.4f}{speedup:>9.1f}x"
        print(f"{name:<16}{row}")
    summary = {
        "reference_s_per_epoch": round(ref, 4),
        "optlab_s_per_epoch": round(results["optlab"]["s_per_epoch"], 4),
        "ratio": round(ref / results["optlab"]["s_per_epoch"], 2),
        "reference_test_accuracy": round(results["reference"]["test_accuracy"], 4),
        "optlab_test_accuracy": round(results["optlab"]["test_accuracy"], 4),
        "device": device,
        "reference_backend": args.reference_backend,
        "epochs": args.epochs,
    }
    if "keras_jax_fit" in results:
        summary["keras_jax_fit_s_per_epoch"] = round(results["keras_jax_fit"]["s_per_epoch"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
