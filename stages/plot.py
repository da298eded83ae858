"""DVC stage `plot`: the PNG figures of one experiment (learning curves, learning rate,
confusion matrix, F1 per class, the most confidently wrong test images). No Keras import."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from optlab import metrics, plotting, stage
from optlab.errors import OptlabError
from optlab.outputs import atomic_dir
from optlab.params import load_params


def parse_args(argv: Sequence[str] | None):
    p = stage.parser(__doc__)
    p.add_argument("--raw", type=Path, required=True, help="raw data directory: original test images (input)")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory: class names, test labels (input)")
    p.add_argument("--history", type=Path, required=True, help="dvclive directory of the train stage (input)")
    p.add_argument("--test-metrics", type=Path, required=True, help="test metrics JSON of the evaluate stage (input)")
    p.add_argument("--predictions", type=Path, required=True, help="test probabilities .npy (input)")
    p.add_argument("--out", type=Path, required=True, help="directory of PNG figures (output)")
    return p.parse_args(argv)


def _load(path: Path, stage_name: str):
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro {stage_name}`")
    return json.loads(path.read_text()) if path.suffix == ".json" else np.load(path)


def read_test_set(args) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Class names, test labels, test probabilities and the original test images, checked to
    describe the same samples in the same order."""
    classes = [str(c) for c in _load(args.data / "meta.json", "prepare")["classes"]]
    y_test = _load(args.data / "y_test.npy", "prepare")
    probs = _load(args.predictions, "evaluate")
    images = _load(args.raw / "x_test.npy", "download")
    if probs.shape != (len(y_test), len(classes)):
        raise OptlabError(
            f"{args.predictions} has shape {probs.shape}, but the test set has {len(y_test)} samples of "
            f"{len(classes)} classes; run `dvc repro evaluate`"
        )
    raw_labels = args.raw / "y_test.npy"
    if len(images) != len(y_test) or (raw_labels.is_file() and not np.array_equal(np.load(raw_labels), y_test)):
        raise OptlabError(
            f"{args.raw / 'x_test.npy'} is not the test set of {args.data} (different samples or order); "
            "run `dvc repro prepare`"
        )
    return classes, y_test, probs, images


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    classes, y_test, probs, images = read_test_set(args)
    test = _load(args.test_metrics, "evaluate")
    history = plotting.read_history(args.history)
    cm = metrics.confusion(y_test, probs.argmax(axis=1), len(classes))

    with atomic_dir(args.out) as out:
        plotting.learning_curves(history, out / "learning_curves.png")
        plotting.learning_rate(history, out / "learning_rate.png")
        plotting.confusion_matrix(cm, classes, out / "confusion_matrix.png")
        plotting.per_class_f1(test["per_class"], test["f1_macro"], out / "per_class_f1.png")
        n_images = params.plot.confused_images
        plotting.confused_images(images, y_test, probs, classes, n_images, out / "confused_images.png")
    print(f"wrote {len(list(args.out.glob('*.png')))} figures to {args.out}")


if __name__ == "__main__":
    sys.exit(stage.run(main))
