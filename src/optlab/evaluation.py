"""The evaluate stage's work: the trained model's predictions on the test set, and what they score.

The test set is used here and nowhere else, never to choose anything. Training and validation
accuracy are the train stage's (measured on the final weights in inference mode); the gap
between training and test accuracy is computed from them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from optlab import artifacts, metrics
from optlab.models import INFERENCE_ROWS
from optlab.params import Params


def evaluate_model(params: Params, data_dir: Path, model_path: Path, live_dir: Path) -> artifacts.Evaluation:
    prepared = artifacts.load_prepared(data_dir, ("test",))
    test, classes = prepared.splits["test"], prepared.meta.classes
    model = artifacts.load_model(model_path, prepared.meta)
    train_accuracy = artifacts.read_summary(live_dir)["train_accuracy"]
    probs = model.predict(test.x, batch_size=INFERENCE_ROWS, verbose=0)
    scores = metrics.test_metrics(test.y, probs, classes, params.evaluate.top_k)
    # Positive: the model does better on what it was trained on than on unseen data.
    scores["generalization_gap"] = train_accuracy - scores["accuracy"]
    per_class = metrics.per_class(test.y, probs.argmax(axis=1), classes)
    return artifacts.Evaluation(scores, per_class, probs, metrics.confusion_rows(test.y, probs, classes))


def describe(ev: artifacts.Evaluation, top_k: int) -> str:
    """Two lines for the terminal: the headline scores and the most confused pairs."""
    m, rows = ev.metrics, ev.confusion_rows
    wrong = Counter((a, p) for a, p in zip(rows["actual"], rows["predicted"], strict=True) if a != p)
    pairs = ", ".join(f"{a} -> {p} ({n})" for (a, p), n in wrong.most_common(3))
    return (
        f"test accuracy {m['accuracy']:.4f} (top-{top_k} {m['top_k_accuracy']:.4f}), loss {m['loss']:.4f}, "
        f"macro F1 {m['f1_macro']:.4f}, generalization gap {m['generalization_gap']:+.4f}\n"
        f"most confused: {pairs or 'none'}"
    )
