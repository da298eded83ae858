"""The evaluate stage's outputs, and the one module that knows their files: the test metrics (DVC
metrics), each replica's, the per-class table, the confusion table and the test predictions
(evaluate -> plot, compare). pandas and NumPy only: the plot stage reads them without Keras.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optlab.core.errors import OptlabError
from optlab.core.outputs import atomic_file, write_json
from optlab.data import files

PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")  # the per-class table, one row a class


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]  # the test metrics: DVC metrics (see optlab.metrics.test_metrics)
    per_class: dict[str, dict[str, float]]  # class name -> precision, recall, f1, support (a table)
    probabilities: np.ndarray  # float32 (N test images, classes)
    confusion_rows: dict[str, list[str]]  # one (actual, predicted) class-name pair per test image
    replicas: list[dict[str, Any]]  # each replica's test metrics, with its replica number and seed


def save_evaluation(
    ev: Evaluation,
    metrics_path: Path,
    replicas_path: Path,
    per_class_path: Path,
    confusion_path: Path,
    predictions_path: Path,
) -> None:
    import pandas as pd

    with atomic_file(replicas_path) as tmp:
        pd.DataFrame(ev.replicas).to_csv(tmp, index=False)
    with atomic_file(predictions_path) as tmp, open(tmp, "wb") as f:
        np.save(f, ev.probabilities.astype(np.float32), allow_pickle=False)
    with atomic_file(confusion_path) as tmp:
        pd.DataFrame(ev.confusion_rows).to_csv(tmp, index=False)
    table = pd.DataFrame([{"class": name, **row} for name, row in ev.per_class.items()], columns=PER_CLASS_COLUMNS)
    with atomic_file(per_class_path) as tmp:
        table.to_csv(tmp, index=False)
    write_json(metrics_path, ev.metrics)


def load_predictions(path: str | Path, n: int, n_classes: int) -> np.ndarray:
    probs = files.load_npy(Path(path), "evaluate")
    if probs.shape != (n, n_classes):
        raise OptlabError(
            f"{path} has shape {probs.shape}, but the test set has {n} samples of {n_classes} classes; "
            "run `dvc repro evaluate`"
        )
    return probs
