"""The evaluate stage's work: the trained models' predictions on the test set, and what they score.

The test set is used here and nowhere else, never to choose anything. Training and validation
accuracy are the train stage's (measured on the final weights in inference mode); the gap
between training and test accuracy is computed from them. Every replica is evaluated.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from optlab.core.params import Params
from optlab.data import files
from optlab.evaluation import metrics
from optlab.evaluation.results import Evaluation
from optlab.training import record


def evaluate_model(params: Params, data_dir: Path, models_dir: Path, live_dir: Path) -> Evaluation:
    """Every replica's test metrics; the evaluation's metrics are their means, and with two
    replicas or more the spread of test accuracy over them (sd, Student-t 95% interval, n). The
    per-class table, the confusion table and the predictions are replica 0's."""
    from optlab.training.models import INFERENCE_ROWS  # after the stage chose the backend

    prepared = files.load_prepared(data_dir, ("test",))
    test, classes = prepared.splits["test"], prepared.meta.classes
    replicas = record.read_replicas(live_dir)
    rows, first = [], None
    for r, path in enumerate(record.replica_models(models_dir, len(replicas))):
        model = record.load_model(path, prepared.meta)
        probs = model.predict(test.x, batch_size=INFERENCE_ROWS, verbose=0)
        scores = metrics.test_metrics(test.y, probs, classes, params.evaluate.top_k)
        # Positive: the model does better on what it was trained on than on unseen data.
        scores["generalization_gap"] = replicas[r]["train_accuracy"] - scores["accuracy"]
        rate = {"learning_rate": replicas[r]["learning_rate"]} if "learning_rate" in replicas[r] else {}  # a group's
        rows.append({"replica": r, "seed": replicas[r]["seed"], **rate, **scores, "diverged": replicas[r]["diverged"]})
        first = probs if first is None else first
    keys = [k for k in rows[0] if k not in ("replica", "seed", "learning_rate", "diverged")]
    summary = {k: float(sum(row[k] for row in rows) / len(rows)) for k in keys}
    if len(rows) > 1 and "learning_rate" not in rows[0]:  # seeds of one variant: their spread is seed noise
        spread = metrics.describe([row["accuracy"] for row in rows])
        # (How many: train.replicas, a param `dvc exp show` has beside these, not a metric too.)
        summary |= {"accuracy_sd": spread.std, "accuracy_ci_low": spread.ci_low, "accuracy_ci_high": spread.ci_high}
    per_class = metrics.per_class(test.y, first.argmax(axis=1), classes)
    confusion = metrics.confusion_rows(test.y, first, classes)
    return Evaluation(summary, per_class, first, confusion, rows)


def headline(ev: Evaluation, top_k: int) -> str:
    """Two lines for the terminal: the headline scores and the most confused pairs."""
    m, rows = ev.metrics, ev.confusion_rows
    if "accuracy_sd" in m:  # seeds of one variant
        spread = (f" (mean of {len(ev.replicas)} replicas; sd {m['accuracy_sd']:.4f}, 95% CI "
                  f"[{m['accuracy_ci_low']:.4f}, {m['accuracy_ci_high']:.4f}])")  # fmt: skip
    elif len(ev.replicas) > 1:  # a group of rates: its mean is no one run's; each member's is in the replicas table
        spread = f" (mean of a group's {len(ev.replicas)} members, each with its own rate: see the replicas table)"
    else:
        spread = ""
    wrong = Counter((a, p) for a, p in zip(rows["actual"], rows["predicted"], strict=True) if a != p)
    pairs = ", ".join(f"{a} -> {p} ({n})" for (a, p), n in wrong.most_common(3))
    return (
        f"test accuracy {m['accuracy']:.4f}{spread} (top-{top_k} {m['top_k_accuracy']:.4f}), loss {m['loss']:.4f}, "
        f"macro F1 {m['f1_macro']:.4f}, generalization gap {m['generalization_gap']:+.4f}\n"
        f"most confused: {pairs or 'none'}"
    )
