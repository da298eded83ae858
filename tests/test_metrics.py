"""optlab.metrics on predictions whose right numbers are known by hand, against scikit-learn's
own functions on predictions hypothesis draws, and the evaluate stage end to end on a tiny real
Keras model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from conftest import REPO, TEST_METRIC_KEYS, stage_args, write_params
from optlab.core.errors import OptlabError
from optlab.evaluation import metrics

CLASSES = ["cat", "dog", "frog"]

# Seven samples, three classes. Predicted (argmax): 0, 1, 1, 1, 2, 2, 2.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2], dtype=np.int32)
PROBS = np.array(
    [
        [0.6, 0.3, 0.1],  # right
        [0.3, 0.6, 0.1],  # cat taken for dog; cat is 2nd, so top-2 right
        [0.1, 0.7, 0.2],  # cat taken for dog; cat is 3rd, so top-2 wrong
        [0.2, 0.7, 0.1],  # right
        [0.1, 0.3, 0.6],  # dog taken for frog; dog is 2nd
        [0.1, 0.1, 0.8],  # right
        [0.2, 0.3, 0.5],  # right
    ],
    dtype=np.float32,
)


# --- by hand ---------------------------------------------------------------------------------
def test_hand_computed_summary():
    got = metrics.test_metrics(Y_TRUE, PROBS, CLASSES, top_k=2)
    # Per class: cat P=1/1 R=1/3 F1=0.5; dog P=1/3 R=1/2 F1=0.4; frog P=2/3 R=2/2 F1=0.8.
    assert set(got) == {"accuracy", "loss", "top_k_accuracy", "f1_macro"}
    assert got["accuracy"] == pytest.approx(4 / 7)
    assert got["top_k_accuracy"] == pytest.approx(6 / 7)
    assert got["f1_macro"] == pytest.approx((0.5 + 0.4 + 0.8) / 3)
    nll = -sum(math.log(p) for p in (0.6, 0.3, 0.1, 0.7, 0.3, 0.8, 0.5)) / 7
    assert got["loss"] == pytest.approx(nll, rel=1e-6)
    table = metrics.per_class(Y_TRUE, PROBS.argmax(axis=1), CLASSES)
    assert table["cat"] == pytest.approx({"precision": 1.0, "recall": 1 / 3, "f1": 0.5, "support": 3})
    assert table["dog"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert table["frog"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})


def test_summary_is_plain_json():
    got = metrics.test_metrics(Y_TRUE, PROBS, CLASSES, top_k=2)
    assert json.loads(json.dumps(got)) == got
    assert all(type(v) in (float, int) for v in got.values())


def test_confusion_matrix_and_most_confused_pair():
    cm = metrics.confusion(Y_TRUE, PROBS.argmax(axis=1), 3)
    np.testing.assert_array_equal(cm, [[1, 2, 0], [0, 1, 1], [0, 0, 2]])
    pairs = metrics.most_confused(cm, CLASSES)
    assert pairs == [
        {"actual": "cat", "predicted": "dog", "count": 2, "rate": pytest.approx(2 / 3)},
        {"actual": "dog", "predicted": "frog", "count": 1, "rate": pytest.approx(1 / 2)},
    ]
    assert metrics.most_confused(np.eye(3, dtype=int), CLASSES) == []


@st.composite
def _predictions(draw) -> tuple[np.ndarray, np.ndarray]:
    """Labels and float32 softmax-like rows: some classes absent or never predicted, ties (exact
    zeros, as a saturated softmax gives, and repeated values) and confident mistakes included."""
    n_classes, n = draw(st.integers(2, 7)), draw(st.integers(1, 40))
    y = np.array(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    levels = st.sampled_from([0.0, 1e-12, 0.1, 0.25, 0.5, 1.0, 3.0])  # few values: ties are common
    raw = np.array(draw(st.lists(levels | st.floats(0, 5), min_size=n * n_classes, max_size=n * n_classes)))
    raw = raw.reshape(n, n_classes)
    raw[raw.sum(axis=1) == 0, 0] = 1.0  # a row of zeros is no distribution
    return y.astype(np.int32), (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=100, deadline=None, database=None)
@given(_predictions(), st.integers(1, 8))
def test_every_score_is_scikit_learns(predictions, k):
    y, probs = predictions
    n_classes = probs.shape[1]
    labels, names = np.arange(n_classes), [f"c{i}" for i in range(n_classes)]
    exact = metrics.check_probabilities(probs, n_classes)  # what test_metrics scores: rows that sum to 1
    y_pred = exact.argmax(axis=1)
    got = metrics.test_metrics(y, probs, names, top_k=k)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, y_pred), abs=1e-12)
    assert got["loss"] == pytest.approx(skm.log_loss(y, exact, labels=labels), rel=1e-12)
    if k < n_classes:  # (scikit-learn warns at k >= n and scores 1, as optlab does without the warning)
        scores = exact[:, 1] if n_classes == 2 else exact  # it reads 2 classes as binary: class 1's score
        assert got["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, scores, k=k, labels=labels))
    else:
        assert got["top_k_accuracy"] == 1.0
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y, y_pred, labels=labels, average="macro", zero_division=0))
    weighted = skm.f1_score(y, y_pred, labels=labels, average="weighted", zero_division=0)
    assert metrics.f1(y, y_pred, n_classes, "weighted") == pytest.approx(weighted, abs=1e-12)
    report = skm.classification_report(y, y_pred, labels=labels, target_names=names, output_dict=True,
                                       zero_division=0)  # fmt: skip
    theirs = {c: {"precision": report[c]["precision"], "recall": report[c]["recall"], "f1": report[c]["f1-score"],
                  "support": report[c]["support"]} for c in names}  # fmt: skip
    ours = metrics.per_class(y, y_pred, names)
    assert all(ours[c] == pytest.approx(theirs[c], abs=1e-12) for c in names), (ours, theirs)
    assert metrics.f1_by_class(metrics.confusion(y, y_pred, n_classes), names) == pytest.approx(
        {c: row["f1"] for c, row in theirs.items()}, abs=1e-12
    )


def test_confusion_counts_equal_sklearns():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    y_pred[y_pred == 6] = 5  # a class never predicted still gets its column
    np.testing.assert_array_equal(
        metrics.confusion(y_true, y_pred, 7), skm.confusion_matrix(y_true, y_pred, labels=range(7))
    )
    with pytest.raises(OptlabError, match=r"labels must lie in \[0, 7\)"):
        metrics.confusion(y_true + 1, y_pred, 7)


def test_confusion_rows_name_each_sample():
    rows = metrics.confusion_rows(Y_TRUE, PROBS, CLASSES)
    assert rows["actual"] == ["cat", "cat", "cat", "dog", "dog", "frog", "frog"]
    assert rows["predicted"] == ["cat", "dog", "dog", "dog", "frog", "frog", "frog"]


def test_top_k_at_or_above_the_class_count_is_perfect():
    assert metrics.top_k_accuracy(Y_TRUE, PROBS.astype(float), 5) == (1.0, 3)


def test_two_classes():
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    got = metrics.test_metrics(y, probs, ["no", "yes"], top_k=1)
    assert got["accuracy"] == got["top_k_accuracy"] == 0.5


def test_a_class_never_predicted_or_seen_scores_zero_not_nan():
    got = metrics.per_class(np.array([0, 1]), np.array([0, 1]), CLASSES)
    assert got["frog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics.f1_by_class(np.zeros((2, 2), dtype=int), ["a", "b"]) == {"a": 0.0, "b": 0.0}  # nothing seen


def test_logits_are_refused():
    with pytest.raises(OptlabError, match="not probabilities"):
        metrics.test_metrics(Y_TRUE, np.log(PROBS) * 3, CLASSES, top_k=2)


def test_labels_out_of_range_are_refused():
    with pytest.raises(OptlabError, match=r"\[0, 3\)"):
        metrics.test_metrics(Y_TRUE + 1, PROBS, CLASSES, top_k=2)


# --- the evaluate stage, end to end ----------------------------------------------------------
N_FEATURES = 6
OUTPUTS = ("metrics/test.json", "metrics/replicas.csv", "metrics/per_class.csv", "metrics/confusion.csv",
           "data/predictions.npy")  # fmt: skip
TRAIN_ACCURACY = 0.75  # what the train stage measured on the training split (its summary metrics)


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    return keras


def _write_prepared(root: Path, n_features: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from optlab.data.files import PreparedData, PreparedMeta, Split, save_prepared

    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 60), ("val", 20), ("test", 30)):
        y = np.arange(n, dtype=np.int32) % len(CLASSES)
        x = (rng.normal(size=(n, n_features)) + y[:, None]).astype(np.float32)
        splits[split] = Split(x, y)
    meta = PreparedMeta(dataset="digits", classes=CLASSES, image_shape=(1, n_features, 1), scale="zero_one",
                        flatten=True, val_fraction=0.25, split_seed=0)  # fmt: skip
    (root / "data/prepared").mkdir(parents=True)
    save_prepared(PreparedData(splits, meta), root / "data/prepared")
    # The train stage's replica figures, which the evaluate stage reads for the generalization gap.
    (root / "metrics/train").mkdir(parents=True)
    replica = {"replica": 0, "seed": 0, "train_accuracy": TRAIN_ACCURACY, "diverged": 0}
    (root / "metrics/train/replicas.json").write_text(json.dumps([replica]))
    return {name: (split.x, split.y) for name, split in splits.items()}


def _write_model(root: Path, n_inputs: int):
    keras = _keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((n_inputs,)), keras.layers.Dense(len(CLASSES), activation="softmax")])
    (root / "models/replicas").mkdir(parents=True)
    model.save(root / "models/replicas/0.keras")
    return model


def _write_params(root: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["top_k"] = 2
    write_params(root / "params.yaml", params)  # with conf/ beside it


def _run_evaluate(root: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "stages" / "evaluate.py"), *stage_args("evaluate")]  # as dvc.yaml runs it
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}  # the stage picks it from params
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_evaluate_stage_writes_metrics_confusion_and_predictions(tmp_path):
    splits = _write_prepared(tmp_path, N_FEATURES)
    model = _write_model(tmp_path, N_FEATURES)
    _write_params(tmp_path)

    result = _run_evaluate(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout

    x_test, y_test = splits["test"]
    probs = np.load(tmp_path / "data" / "predictions.npy")
    assert probs.dtype == np.float32 and probs.shape == (len(y_test), len(CLASSES))
    np.testing.assert_allclose(probs, model.predict(x_test, verbose=0), atol=1e-5)

    got = json.loads((tmp_path / "metrics" / "test.json").read_text())
    assert set(got) == TEST_METRIC_KEYS
    y_pred = probs.argmax(axis=1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_test, y_pred))
    exact = probs.astype(float)
    exact /= exact.sum(axis=1, keepdims=True)  # float32 rows sum to 1 only roughly
    assert got["loss"] == pytest.approx(skm.log_loss(y_test, exact, labels=[0, 1, 2]), rel=1e-5)
    assert got["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y_test, probs, k=2, labels=[0, 1, 2]))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(y_test, y_pred, average="macro", zero_division=0))
    assert got["generalization_gap"] == pytest.approx(TRAIN_ACCURACY - got["accuracy"])
    per_class = pd.read_csv(tmp_path / "metrics" / "per_class.csv")
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class["class"].tolist() == CLASSES
    assert per_class["f1"].tolist() == pytest.approx(skm.f1_score(y_test, y_pred, average=None, zero_division=0))
    assert per_class["support"].tolist() == [int((y_test == i).sum()) for i in range(3)]

    confusion = pd.read_csv(tmp_path / "metrics" / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    assert confusion["actual"].tolist() == [CLASSES[i] for i in y_test]
    assert confusion["predicted"].tolist() == [CLASSES[i] for i in y_pred]


def test_evaluate_stage_refuses_a_model_that_no_longer_fits_the_data(tmp_path):
    _write_prepared(tmp_path, N_FEATURES)
    _write_model(tmp_path, N_FEATURES - 1)
    _write_params(tmp_path)
    for stale in OUTPUTS:
        (tmp_path / stale).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stale).write_text("from an earlier run")

    result = _run_evaluate(tmp_path)
    assert result.returncode == 2
    assert "no longer fits the model" in result.stderr and "dvc repro" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any((tmp_path / out).exists() for out in OUTPUTS)
