"""DVC stage `evaluate`: score every trained replica on the test set (accuracy, loss, top-k, F1
per class, the confusion table) and keep replica 0's test predictions for the plot stage."""

from pathlib import Path

from optlab.core import stage
from optlab.core.outputs import all_or_none, remove_outputs
from optlab.core.params import load_params
from optlab.training.backend import configure, engine_for


def main(argv=None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (input)")
    p.add_argument("--models", type=Path, required=True, help="the replicas' trained Keras models (input)")
    p.add_argument("--live", type=Path, required=True, help="the train stage's dvclive directory (input)")
    p.add_argument("--metrics", type=Path, required=True, help="test metrics JSON (output)")
    p.add_argument("--replicas", type=Path, required=True, help="each replica's test metrics, CSV (output)")
    p.add_argument("--per-class", type=Path, required=True, help="precision, recall, F1 per class, CSV (output)")
    p.add_argument("--confusion", type=Path, required=True, help="actual,predicted CSV (output)")
    p.add_argument("--predictions", type=Path, required=True, help="test probabilities .npy (output)")
    args = p.parse_args(argv)

    outputs = (args.metrics, args.replicas, args.per_class, args.confusion, args.predictions)
    remove_outputs(*outputs)
    params = load_params(args.params)
    configure(engine_for(params).backend)  # before anything imports Keras
    from optlab.evaluation import evaluate, results

    result = evaluate.evaluate_model(params, args.data, args.models, args.live)
    with all_or_none(*outputs):  # written one by one: a failure (a full disk) removes those written
        results.save_evaluation(result, *outputs)
    print(evaluate.headline(result, params.evaluate.top_k))


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
