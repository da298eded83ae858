"""DVC stage `plot`: the PNG figures of one experiment (learning curves, learning rate,
confusion matrix, F1 per class, the most confidently wrong test images). No Keras import."""

from __future__ import annotations

from pathlib import Path

from optlab import artifacts, plotting, stage
from optlab.outputs import atomic_dir
from optlab.params import load_params


def main(argv=None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--raw", type=Path, required=True, help="raw data directory: original test images (input)")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory: class names, test labels (input)")
    p.add_argument("--history", type=Path, required=True, help="the train stage's dvclive directory (input)")
    p.add_argument("--predictions", type=Path, required=True, help="test probabilities .npy (input)")
    p.add_argument("--out", type=Path, required=True, help="directory of PNG figures (output)")
    args = p.parse_args(argv)

    params = load_params(args.params)
    prepared = artifacts.load_prepared(args.data, ("test",), images=False)
    y_test, classes = prepared.splits["test"].y, prepared.meta.classes
    figures = plotting.Figures(
        history=artifacts.read_history(args.history),
        replicas=artifacts.read_replica_histories(args.history),
        diagnostics=artifacts.read_diagnostics(args.history),
        y_test=y_test,
        probabilities=artifacts.load_predictions(args.predictions, len(y_test), len(classes)),
        images=artifacts.raw_test_images(args.raw, y_test),
        classes=classes,
    )
    with atomic_dir(args.out) as out:
        names = figures.draw(out, params.plot)
    print(f"plot: {len(names)} figures ({', '.join(names)})")


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
