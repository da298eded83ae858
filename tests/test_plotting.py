"""Every figure is written as a real PNG of a sensible size, with 10 and with 100 classes, and
the plot stage runs without importing Keras or TensorFlow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import stage_args, write_params
from optlab.core.errors import OptlabError
from optlab.data.files import PreparedData, PreparedMeta, RawData, RawMeta, Split, save_prepared, save_raw
from optlab.evaluation import figures as plotting
from optlab.evaluation import metrics
from optlab.training.record import read_history

REPO = Path(__file__).resolve().parents[1]
FIGURES = (
    "learning_curves.png", "learning_rate.png", "confusion_matrix.png", "per_class_f1.png", "confused_images.png",
    "gradients.png", "sharpness.png", "noise_scale.png",
)  # fmt: skip


def write_history(live: Path, epochs: int = 8, lr_decay: float = 0.5) -> None:
    """dvclive's per-epoch TSVs, as the train stage writes them (a timestamp column included)."""
    steps = np.arange(epochs)
    curves = {
        "train/loss.tsv": 2.0 / (1 + steps),
        "val/loss.tsv": 2.2 / (1 + steps) + 0.02 * steps,
        "train/accuracy.tsv": 0.5 + 0.05 * steps,
        "val/accuracy.tsv": 0.45 + 0.05 * steps - 0.008 * steps**2,
        "learning_rate.tsv": 1e-3 * lr_decay**steps,
    }
    for rel, values in curves.items():
        path = live / "plots" / "metrics" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        column = Path(rel).stem
        rows = [f"{1700000000 + s}\t{s + 1}\t{v}" for s, v in zip(steps, values, strict=True)]  # step = epoch, from 1
        lines = ["timestamp\tstep\t" + column, *rows]
        path.write_text("\n".join(lines) + "\n")


def fake_test_set(n_classes: int, n: int, channels: int, seed: int = 0):
    """Labels, softmax-like probabilities that are right about 70% of the time, and images."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % n_classes).astype(np.int32)
    logits = rng.normal(size=(n, n_classes)) * 1.5
    logits[np.arange(n), y] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = rng.integers(0, 256, size=(n, 28, 28, channels), dtype=np.uint8)
    classes = [f"class_{i}" for i in range(n_classes)] if n_classes > 10 else [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ][:n_classes]  # fmt: skip
    return classes, y, probs.astype(np.float32), images


def assert_png(path: Path, min_px: int = 300, max_px: int = 3000) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert min_px <= width <= max_px and 200 <= height <= max_px, (path.name, image.size)


# --- the figures -----------------------------------------------------------------------------
def test_read_history_counts_epochs_from_one(tmp_path):
    write_history(tmp_path, epochs=5)
    history = read_history(tmp_path)
    assert list(history.index) == [1, 2, 3, 4, 5]
    assert set(history.columns) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    assert history.loc[1, "learning_rate"] == pytest.approx(1e-3)


def test_read_history_names_the_missing_file(tmp_path):
    write_history(tmp_path)
    (tmp_path / "plots" / "metrics" / "val" / "accuracy.tsv").unlink()
    with pytest.raises(OptlabError, match=r"val/accuracy\.tsv not found.*dvc repro"):
        read_history(tmp_path)


@pytest.mark.parametrize("epochs, lr_decay", [(8, 0.5), (1, 1.0), (60, 0.95)])
def test_history_figures(tmp_path, epochs, lr_decay):
    write_history(tmp_path / "live", epochs=epochs, lr_decay=lr_decay)
    history = read_history(tmp_path / "live")
    plotting.learning_curves(history, tmp_path / "learning_curves.png")
    plotting.learning_rate(history, tmp_path / "learning_rate.png")
    assert_png(tmp_path / "learning_curves.png")
    assert_png(tmp_path / "learning_rate.png")


@pytest.mark.parametrize("layers", [["dense1", "dense2", "output"], ["conv1", "conv2", "conv3", "conv4", "output"], []])
def test_the_gradients_figure_reads_the_diagnostics_dvclive_wrote(tmp_path, layers):
    from optlab.training.record import TrainLog, read_diagnostics

    log = TrainLog(tmp_path / "live", {})  # the train stage's writer
    for epoch in range(6):
        logs = {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5, "learning_rate": 1e-3}
        log.log_epoch(logs, {
            layer: {"grad_norm": 0.5 / (epoch + 1) / (i + 1), "weight_norm": 5.0 + epoch,
                    "update_ratio": 1e-3 * 0.7**epoch, "dead_fraction": None if layer == "output" else 0.02 * epoch}
            for i, layer in enumerate(layers)
        })  # fmt: skip
    diagnostics = read_diagnostics(tmp_path / "live")
    if layers:
        assert list(diagnostics["grad_norm"].columns) == sorted(layers) and list(diagnostics["grad_norm"].index) == [
            1, 2, 3, 4, 5, 6]  # fmt: skip
        assert "output" not in diagnostics["dead_fraction"].columns
    else:
        assert diagnostics == {}  # the keras loop logs none: the figure says so
    plotting.gradients(diagnostics, tmp_path / "gradients.png")
    assert_png(tmp_path / "gradients.png")


@pytest.mark.parametrize("n_classes, channels", [(10, 1), (100, 3)])
def test_test_set_figures(tmp_path, n_classes, channels):
    classes, y, probs, images = fake_test_set(n_classes, n=5 * n_classes, channels=channels)
    cm = metrics.confusion(y, probs.argmax(axis=1), n_classes)
    plotting.confusion_matrix(cm, classes, tmp_path / "confusion_matrix.png")
    f1 = {name: row["f1"] for name, row in metrics.per_class(y, probs.argmax(axis=1), classes).items()}
    plotting.per_class_f1(f1, tmp_path / "per_class_f1.png")
    plotting.confused_images(images, y, probs, classes, 16, tmp_path / "confused_images.png")
    for name in FIGURES[2:5]:
        assert_png(tmp_path / name)


def test_figures_are_not_kept_alive(tmp_path):
    from matplotlib._pylab_helpers import Gcf

    classes, y, probs, images = fake_test_set(10, n=50, channels=1)
    for _ in range(3):
        plotting.confused_images(images, y, probs, classes, 4, tmp_path / "confused_images.png")
    assert Gcf.get_num_fig_managers() == 0


def test_confused_images_without_mistakes(tmp_path):
    classes, y, _, images = fake_test_set(10, n=20, channels=1)
    perfect = np.eye(10, dtype=np.float32)[y]
    plotting.confused_images(images, y, perfect, classes, 16, tmp_path / "confused_images.png")
    assert_png(tmp_path / "confused_images.png", min_px=100)


def test_most_confidently_wrong_come_first():
    y = np.array([0, 1, 2, 0])
    probs = np.array([[0.2, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.4, 0.6], [0.05, 0.0, 0.95]])
    np.testing.assert_array_equal(plotting.most_confident_mistakes(y, probs, 5), [3, 0])
    np.testing.assert_array_equal(plotting.most_confident_mistakes(y, probs, 1), [3])


def test_f1_chart_lists_only_the_extremes_of_many_classes():
    f1 = {f"c{i}": i / 100 for i in range(100)}
    rows = plotting._f1_rows(f1)
    assert len(rows) == 2 * plotting.SHOWN_EXTREMES + 1
    assert rows[0] == ("c99", 0.99) and rows[-1] == ("c0", 0.0)
    assert rows[plotting.SHOWN_EXTREMES] == ("... 60 classes not shown ...", None)
    assert len(plotting._f1_rows({f"c{i}": i / 35 for i in range(35)})) == 35  # ends would overlap: list all


# --- the plot stage --------------------------------------------------------------------------
# Runs the stage's main() and fails if Keras, TensorFlow or scikit-learn got imported on the way.
NO_KERAS_WRAPPER = textwrap.dedent(
    f"""
    import runpy, sys
    from optlab.core import stage
    main = runpy.run_path({str(REPO / "stages" / "plot.py")!r})["main"]
    rc = stage.run(main, sys.argv[1:])
    # scikit-learn too: it costs about 3 s to import, most of this stage's time.
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow", "jax", "sklearn"))
    print("heavy modules:", heavy)
    sys.exit(rc or (3 if heavy else 0))
    """
)
STAGE_ARGS = stage_args("plot")  # as dvc.yaml runs it


def write_stage_inputs(root: Path, n_classes: int, channels: int) -> None:
    """What the stage reads, written by the artifact writers the other stages use."""
    classes, y, probs, images = fake_test_set(n_classes, n=3 * n_classes, channels=channels)
    shape = (28, 28, channels)
    (root / "data/raw").mkdir(parents=True)
    raw_meta = RawMeta(dataset="cifar100", classes=classes, image_shape=shape)
    save_raw(RawData(images[:0], y[:0], images, y, raw_meta), root / "data/raw")
    (root / "data/prepared").mkdir(parents=True)
    meta = PreparedMeta(**raw_meta.model_dump(), scale="zero_one", flatten=False, val_fraction=0.1, split_seed=0)
    splits = {s: Split((images / 255).astype(np.float32), y) for s in ("train", "val", "test")}
    save_prepared(PreparedData(splits, meta), root / "data/prepared")
    np.save(root / "data" / "predictions.npy", probs)
    write_history(root / "metrics" / "train")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["plot"]["confused_images"] = 9
    write_params(root / "params.yaml", params)  # with conf/ beside it, as in a checkout


def run_stage(root: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", NO_KERAS_WRAPPER, *STAGE_ARGS]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("n_classes, channels", [(10, 1), (100, 3)])
def test_plot_stage_writes_every_figure_without_keras(tmp_path, n_classes, channels):
    write_stage_inputs(tmp_path, n_classes, channels)
    result = run_stage(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "heavy modules: []" in result.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        assert_png(tmp_path / "plots" / name)


def test_plot_stage_refuses_stale_predictions(tmp_path):
    write_stage_inputs(tmp_path, 10, 1)
    np.save(tmp_path / "data" / "predictions.npy", np.full((7, 10), 0.1, dtype=np.float32))
    result = run_stage(tmp_path)
    assert result.returncode == 2
    assert "dvc repro evaluate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "plots").exists()
