"""DVC stage `evaluate`: score the trained model on the test set, and on the training and
validation sets with the final weights in inference mode (seed 003's warning: Keras's running
training accuracy is an average over changing weights, with dropout on)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from optlab import metrics, stage
from optlab.backend import configure
from optlab.errors import OptlabError
from optlab.outputs import atomic_file, remove_outputs, write_json
from optlab.params import load_params

SPLITS = ("train", "val", "test")
# Inference only, so the batch size changes speed and memory, never the numbers.
BATCH_SIZE = 1024


def parse_args(argv: Sequence[str] | None):
    p = stage.parser(__doc__)
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (input)")
    p.add_argument("--model", type=Path, required=True, help="trained Keras model (input)")
    p.add_argument("--metrics", type=Path, required=True, help="test metrics JSON (output)")
    p.add_argument("--confusion", type=Path, required=True, help="actual,predicted CSV (output)")
    p.add_argument("--predictions", type=Path, required=True, help="test probabilities .npy (output)")
    return p.parse_args(argv)


def read_prepared(data: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The class names and each split's (features, labels)."""
    needed = [data / "meta.json"] + [data / f"{xy}_{s}.npy" for s in SPLITS for xy in "xy"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise OptlabError(f"prepared data is missing {', '.join(missing)}; run `dvc repro prepare`")
    classes = json.loads((data / "meta.json").read_text()).get("classes")
    if not classes:
        raise OptlabError(f"{data / 'meta.json'} lists no classes; run `dvc repro prepare`")
    splits = {s: (np.load(data / f"x_{s}.npy"), np.load(data / f"y_{s}.npy")) for s in SPLITS}
    return [str(c) for c in classes], splits


def check_fits(model, features: np.ndarray, n_classes: int, data: Path) -> None:
    """Stop before predicting if the model was trained on differently shaped data."""
    expected = tuple(model.input_shape[1:])
    given = tuple(features.shape[1:])
    # None is a dimension the model accepts at any size.
    inputs_fit = len(expected) == len(given) and all(e in (None, g) for e, g in zip(expected, given))
    n_outputs = model.output_shape[-1]
    if not inputs_fit or n_outputs != n_classes:
        raise OptlabError(
            f"the prepared data no longer fits the model: the model takes inputs of shape {expected} "
            f"and predicts {n_outputs} classes, but {data} holds inputs of shape {given} and "
            f"{n_classes} classes; run `dvc repro` to retrain the model on the current data"
        )


def summarize(test: dict, train_accuracy: float, val_accuracy: float) -> dict:
    return {
        **test,
        "train_accuracy": train_accuracy,
        "val_accuracy": val_accuracy,
        # Positive: the model does better on what it was trained on than on unseen data.
        "generalization_gap": train_accuracy - test["accuracy"],
    }


def write_outputs(args, summary: dict, y_test: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    with atomic_file(args.predictions) as tmp, open(tmp, "wb") as f:
        np.save(f, probs.astype(np.float32))
    with atomic_file(args.confusion) as tmp:
        pd.DataFrame(metrics.confusion_rows(y_test, probs, classes)).to_csv(tmp, index=False)
    write_json(args.metrics, summary)


def report(summary: dict, y_test: np.ndarray, probs: np.ndarray, classes: list[str]) -> str:
    cm = metrics.confusion(y_test, probs.argmax(axis=1), len(classes))
    worst = metrics.most_confused(cm, classes, 3)
    pairs = ", ".join(f"{p['actual']} -> {p['predicted']} ({p['count']})" for p in worst)
    return (
        f"test accuracy {summary['accuracy']:.4f} (top-{summary['top_k']} {summary['top_k_accuracy']:.4f}), "
        f"loss {summary['loss']:.4f}, macro F1 {summary['f1_macro']:.4f}; "
        f"train {summary['train_accuracy']:.4f}, validation {summary['val_accuracy']:.4f}\n"
        f"most confused: {pairs or 'none'}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    remove_outputs(args.metrics, args.confusion, args.predictions)
    params = load_params(args.params)
    configure(params.train.backend)
    import keras  # only now: Keras picks its backend once, at import

    classes, splits = read_prepared(args.data)
    if not args.model.is_file():
        raise OptlabError(f"{args.model} not found; run `dvc repro train`")
    model = keras.saving.load_model(args.model, compile=False)
    check_fits(model, splits["test"][0], len(classes), args.data)
    probs = {s: model.predict(x, batch_size=BATCH_SIZE, verbose=0) for s, (x, _) in splits.items()}

    y_test = splits["test"][1]
    test = metrics.evaluate(y_test, probs["test"], classes, params.evaluate.top_k)
    summary = summarize(
        test,
        metrics.accuracy(splits["train"][1], probs["train"]),
        metrics.accuracy(splits["val"][1], probs["val"]),
    )
    write_outputs(args, summary, y_test, probs["test"], classes)
    print(report(summary, y_test, probs["test"], classes))


if __name__ == "__main__":
    sys.exit(stage.run(main))
