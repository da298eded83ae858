"""DVC stage `plot`: the PNG figures of one experiment (learning curves, learning rate, backprop
diagnostics, sharpness and gradient noise scale, confusion matrix, F1 per class, the most
confidently wrong test images). No Keras."""

from pathlib import Path

from optlab.core import stage
from optlab.core.outputs import atomic_dir
from optlab.core.params import load_params
from optlab.data import files
from optlab.evaluation import figures, results
from optlab.training import record


def main(argv=None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--raw", type=Path, required=True, help="raw data directory: original test images (input)")
    p.add_argument("--data", type=Path, required=True, help="prepared data directory: class names, test labels (input)")
    p.add_argument("--history", type=Path, required=True, help="the train stage's dvclive directory (input)")
    p.add_argument("--predictions", type=Path, required=True, help="test probabilities .npy (input)")
    p.add_argument("--out", type=Path, required=True, help="directory of PNG figures (output)")
    args = p.parse_args(argv)

    params = load_params(args.params)
    prepared = files.load_prepared(args.data, ("test",), images=False)
    y_test, classes = prepared.splits["test"].y, prepared.meta.classes
    # What the sharpness and noise scale are drawn against: the run's optimizer and batch size.
    trained = record.read_run_info(args.history, missing_ok=True).get("params", {})
    drawn = figures.Figures(
        history=record.read_history(args.history),
        replicas=record.read_replica_histories(args.history),
        diagnostics=record.read_diagnostics(args.history),
        y_test=y_test,
        probabilities=results.load_predictions(args.predictions, len(y_test), len(classes)),
        images=files.raw_test_images(args.raw, y_test),
        classes=classes,
        curvature=record.read_curvature(args.history),
        batch_size=trained.get("train", {}).get("batch_size"),
        optimizer=trained.get("optimizer", {}).get("name", ""),
    )
    with atomic_dir(args.out) as out:
        names = drawn.draw(out, params.plot)
    print(f"plot: {len(names)} figures ({', '.join(names)})")


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
