"""Metrics from predictions, as plain dicts and arrays.

Everything here takes integer labels and predicted probabilities (one row per sample, one
column per class) and returns plain Python numbers, so the results go straight into JSON and
``dvc metrics diff``. No Keras import: the plot stage and the tests use this module without
paying for a deep-learning framework.

The scores are scikit-learn's definitions (``accuracy_score``, ``log_loss``,
``top_k_accuracy_score``, ``classification_report`` and ``f1_score`` with ``zero_division=0``),
computed with NumPy from the confusion matrix: a few lines each, where importing
``sklearn.metrics`` costs every evaluate stage 0.8-1.5 s (a third of that stage on digits, paid
by every trial of a study). tests/test_metrics.py checks them against scikit-learn's own
functions on inputs hypothesis draws, ties and absent classes included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from optlab.core.errors import OptlabError

# Softmax outputs in float32 sum to 1 only up to rounding; anything further off is not a
# probability distribution (e.g. a model that ends in logits).
_SUM_TOLERANCE = 1e-3


def check_probabilities(probs: np.ndarray, n_classes: int) -> np.ndarray:
    """Return ``probs`` as float64 rows that sum to exactly 1, or raise if they are not
    probabilities over ``n_classes`` classes."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise OptlabError(f"expected predictions of shape (N, {n_classes}), got {probs.shape}")
    sums = probs.sum(axis=1)
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0 or np.any(abs(sums - 1) > _SUM_TOLERANCE):
        raise OptlabError(
            "the model's outputs are not probabilities (rows must be >= 0 and sum to 1); "
            "the model must end in a softmax layer"
        )
    return probs / sums[:, None]


def check_labels(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true)
    if y_true.ndim != 1 or not np.issubdtype(y_true.dtype, np.integer):
        raise OptlabError(f"expected integer labels of shape (N,), got {y_true.dtype} {y_true.shape}")
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise OptlabError(f"labels must lie in [0, {n_classes}); got {y_true.min()}..{y_true.max()}")
    return y_true


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Share of samples whose most probable class is the true one."""
    return float(np.mean(np.argmax(probs, axis=1) == y_true))


def cross_entropy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, in nats (Keras's categorical loss), with
    probabilities clipped to [eps, 1 - eps] so a confident mistake costs a finite -log(eps)."""
    eps = np.finfo(probs.dtype).eps
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1 - eps))))


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> tuple[float, int]:
    """Fraction of samples whose true class is among the ``k`` most probable; returns the
    score and the k actually used (at most the number of classes). Ties as scikit-learn breaks
    them: among equal probabilities the later class ranks first; of two classes, the second is
    the prediction only above 0.5."""
    n_classes = probs.shape[1]
    k = min(k, n_classes)
    if k == n_classes:
        return 1.0, k  # every class is in the top n
    if n_classes == 2:  # k == 1
        return float(np.mean((probs[:, 1] > 0.5) == y_true)), k
    top = np.argsort(probs, axis=1, kind="stable")[:, ::-1][:, :k]
    return float(np.mean((top == np.asarray(y_true)[:, None]).any(axis=1))), k


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: row = actual class, column = predicted class (sklearn's ``confusion_matrix``)."""
    y_true, y_pred = check_labels(y_true, n_classes), check_labels(y_pred, n_classes)
    cells = y_true.astype(np.int64) * n_classes + y_pred
    return np.bincount(cells, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0: a score that is undefined (a class never predicted, or
    absent) counts as 0 rather than NaN, which JSON cannot hold."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each class's precision, recall, F1 and support from a :func:`confusion` matrix."""
    hits, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    return _ratio(hits, predicted), _ratio(hits, support), _ratio(2 * hits, predicted + support), support


def f1_by_class(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Each class's F1 from a :func:`confusion` matrix (0 where it is undefined)."""
    return {name: float(f) for name, f in zip(class_names, _scores(cm)[2], strict=True)}


def per_class(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of every class, keyed by class name; a class that is
    never predicted (or absent from ``y_true``) scores 0 rather than NaN, which JSON cannot hold."""
    precision, recall, f1s, support = _scores(confusion(y_true, y_pred, len(class_names)))
    return {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1s, support, strict=True)
    }


def f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, average: str) -> float:
    """F1 averaged over all ``n_classes`` (``"macro"``: every class counts the same;
    ``"weighted"``: by support), with the same zero-for-undefined rule as :func:`per_class`."""
    *_, f1s, support = _scores(confusion(y_true, y_pred, n_classes))
    if average == "macro":
        return float(np.mean(f1s))
    if average == "weighted":
        return float(_ratio(np.sum(f1s * support), np.sum(support)))
    raise ValueError(f"average must be 'macro' or 'weighted', not {average!r}")


def most_confused(cm: np.ndarray, class_names: Sequence[str], n: int = 10) -> list[dict[str, object]]:
    """The ``n`` largest off-diagonal cells: which actual class is most often predicted as
    which other one. ``rate`` is the share of the actual class's samples lost to that mistake."""
    off = np.array(cm, dtype=np.int64)
    np.fill_diagonal(off, 0)
    actual, predicted = np.nonzero(off)
    counts = off[actual, predicted]
    # Largest count first; ties in (actual, predicted) order so the list is deterministic.
    order = np.lexsort((predicted, actual, -counts))[:n]
    support = np.asarray(cm).sum(axis=1)
    return [
        {
            "actual": class_names[actual[i]],
            "predicted": class_names[predicted[i]],
            "count": int(counts[i]),
            "rate": float(counts[i] / support[actual[i]]),
        }
        for i in order
    ]


def test_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], top_k: int) -> dict[str, float]:
    """The numbers a person compares between runs (the evaluate stage's DVC metrics): accuracy,
    cross-entropy, top-k accuracy (k = ``top_k``, at most the number of classes) and macro F1.
    Per-class figures are :func:`per_class`'s, a table rather than metrics."""
    n_classes = len(class_names)
    y_true = check_labels(y_true, n_classes)
    probs = check_probabilities(probs, n_classes)
    y_pred = np.argmax(probs, axis=1)
    return {
        "accuracy": accuracy(y_true, probs),
        "loss": cross_entropy(y_true, probs),
        "top_k_accuracy": top_k_accuracy(y_true, probs, top_k)[0],
        "f1_macro": f1(y_true, y_pred, n_classes, "macro"),
    }


def confusion_rows(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, list[str]]:
    """One (actual, predicted) pair of class names per sample: the table DVC's ``confusion``
    plot template counts."""
    names = np.asarray(class_names, dtype=object)
    return {"actual": list(names[y_true]), "predicted": list(names[np.argmax(probs, axis=1)])}


# --- the spread of a metric over seeds (replicas) ----------------------------------------------
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for one value
    ci_low: float  # Student-t interval for the mean; nan for one value
    ci_high: float


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample standard deviation and Student-t confidence interval of ``values``."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("describe needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    from scipy import stats  # only with two values or more

    half = stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)
