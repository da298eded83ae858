"""Figures from saved metrics: the training history dvclive wrote, the test metrics and the
test predictions. No Keras import, so the plot stage starts in a second.

Figures are built as bare ``matplotlib.figure.Figure`` objects rather than through pyplot:
pyplot keeps every figure alive in a global registry until it is closed, while a bare Figure
renders with Agg, is never registered and is freed as soon as the function returns, so
drawing many figures cannot grow memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from optlab.errors import OptlabError

DPI = 110
TRAIN_COLOR, VAL_COLOR, MARK_COLOR = "tab:blue", "tab:orange", "tab:green"
# Above this many classes the per-cell numbers of the confusion matrix are unreadable.
MAX_ANNOTATED_CLASSES = 20
# Above this many classes the F1 chart shows only the extremes, SHOWN_EXTREMES at each end.
MAX_LISTED_CLASSES = 30
SHOWN_EXTREMES = 20

# dvclive's per-epoch files under <live dir>/plots/metrics, and the column each holds.
HISTORY_FILES = {
    "loss": "train/loss.tsv",
    "accuracy": "train/accuracy.tsv",
    "val_loss": "val/loss.tsv",
    "val_accuracy": "val/accuracy.tsv",
    "learning_rate": "learning_rate.tsv",
}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


# --- training history ----------------------------------------------------------------------
def _read_series(path: Path, column: str) -> pd.Series:
    if not path.is_file():
        raise OptlabError(f"{path} not found (the train stage writes it); run `dvc repro train`")
    table = pd.read_csv(path, sep="\t")
    if not {"step", column} <= set(table.columns):
        raise OptlabError(f"{path} needs columns 'step' and '{column}', has {list(table.columns)}")
    # A resumed run can log a step twice; its last value is the one the model ended with.
    return table.drop_duplicates("step", keep="last").set_index("step")[column]


def read_history(live_dir: str | Path) -> pd.DataFrame:
    """One row per epoch, indexed by ``epoch`` counted from 1, with the columns of
    :data:`HISTORY_FILES`."""
    root = Path(live_dir) / "plots" / "metrics"
    series = {name: _read_series(root / rel, Path(rel).stem) for name, rel in HISTORY_FILES.items()}
    history = pd.DataFrame(series).sort_index()
    history.index = history.index + 1  # dvclive's step 0 is the first epoch
    history.index.name = "epoch"
    return history


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def learning_curves(history: pd.DataFrame, path: str | Path) -> None:
    """Loss and accuracy per epoch, training against validation, with the epoch of the best
    validation accuracy marked (the one ``keep_best`` would keep)."""
    fig = _figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = history.index
    best = int(history["val_accuracy"].idxmax())
    marker = "o" if len(epochs) <= 30 else None
    panels = [(ax_loss, "loss", "cross-entropy loss (nats)"), (ax_acc, "accuracy", "accuracy (fraction correct)")]
    for ax, key, ylabel in panels:
        ax.plot(epochs, history[key], marker=marker, ms=3, color=TRAIN_COLOR, label="training")
        ax.plot(epochs, history[f"val_{key}"], marker=marker, ms=3, color=VAL_COLOR, label="validation")
        ax.axvline(best, color=MARK_COLOR, ls="--", lw=1, label=f"best validation accuracy (epoch {best})")
        ax.plot([best], [history.loc[best, f"val_{key}"]], "o", color=MARK_COLOR, ms=7)
        ax.set_ylabel(ylabel)
        _epoch_axis(ax)
    ax_loss.set_title("Loss (lower is better)")
    ax_acc.set_title(f"Accuracy: best validation {history.loc[best, 'val_accuracy']:.3f} at epoch {best}")
    # Below the panels, where no curve can run under it.
    fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    fig.suptitle("Learning curves: training vs validation, per epoch")
    _save(fig, path)


def learning_rate(history: pd.DataFrame, path: str | Path) -> None:
    """The optimizer's learning rate at the end of each epoch; log scale when it spans more
    than a factor of 10, so a decay to 1e-6 does not flatten into the axis."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    rate = history["learning_rate"]
    ax.plot(history.index, rate, marker="o" if len(rate) <= 30 else None, ms=3, color=TRAIN_COLOR)
    if rate.min() > 0 and rate.max() / rate.min() > 10:
        ax.set_yscale("log")
    ax.set_ylabel("learning rate (step size, no unit)")
    _epoch_axis(ax)
    first, last = rate.iloc[0], rate.iloc[-1]
    change = f"constant {first:.3g}" if first == last else f"{first:.3g} at the start, {last:.3g} at the end"
    ax.set_title(f"Learning rate per epoch: {change}")
    _save(fig, path)


# --- test-set results ----------------------------------------------------------------------
def confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path) -> None:
    """Counts (actual rows, predicted columns), coloured by the share of each actual class so
    that rare and common classes read on the same scale."""
    n = len(class_names)
    cm = np.asarray(cm)
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros(cm.shape, dtype=float), where=support > 0)
    side = float(np.clip(0.55 * n + 2.5, 6, 17))
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    # Square-root colour scale: a mistake made on 5% of a class is what one looks for, and on
    # a linear scale it is as white as no mistake at all.
    image = ax.imshow(share, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class (row-normalized)")
    if n <= MAX_ANNOTATED_CLASSES:
        for (i, j), count in np.ndenumerate(cm):
            # Zeros in grey so the mistakes that did happen stand out.
            color = "lightgrey" if count == 0 else ("white" if share[i, j] > 0.5 else "black")
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8 if n > 10 else 9, color=color)
    fontsize = 9 if n <= MAX_ANNOTATED_CLASSES else max(4.5, min(8.0, 600 / n))
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=class_names, rotation=90 if n > 10 else 45, ha="center" if n > 10 else "right",
                  fontsize=fontsize)
    ax.set_yticks(ticks, labels=class_names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    counts = "counts in cells" if n <= MAX_ANNOTATED_CLASSES else "colour only"
    ax.set_title(f"Confusion matrix: {cm.sum()} test images, accuracy {accuracy:.3f} ({counts})")
    _save(fig, path)


def _f1_rows(f1: Mapping[str, float]) -> list[tuple[str, float | None]]:
    """(class, F1) from best to worst; with many classes, only both ends and a gap row."""
    ranked = sorted(f1.items(), key=lambda kv: kv[1], reverse=True)
    if len(ranked) <= max(MAX_LISTED_CLASSES, 2 * SHOWN_EXTREMES):  # both ends would overlap
        return ranked
    hidden = len(ranked) - 2 * SHOWN_EXTREMES
    return ranked[:SHOWN_EXTREMES] + [(f"... {hidden} classes not shown ...", None)] + ranked[-SHOWN_EXTREMES:]


def per_class_f1(per_class: Mapping[str, Mapping[str, float]], macro_f1: float, path: str | Path) -> None:
    """F1 of each class as sorted bars, best at the top, against the macro average."""
    f1 = {name: float(row["f1"]) for name, row in per_class.items()}
    rows = _f1_rows(f1)
    fig = _figure(8, 0.28 * len(rows) + 1.9)
    ax = fig.subplots()
    y = np.arange(len(rows))
    values = [v or 0.0 for _, v in rows]
    colors = ["none" if v is None else (TRAIN_COLOR if v >= macro_f1 else VAL_COLOR) for _, v in rows]
    ax.barh(y, values, color=colors, height=0.75)
    for yi, (_, v) in zip(y, rows):
        if v is not None:  # inside the bar's end, where the macro line rarely passes
            inside = v > 0.15
            ax.text(v - 0.01 if inside else v + 0.01, yi, f"{v:.2f}", va="center", ha="right" if inside else "left",
                    fontsize=8, color="white" if inside else "black")
    ax.axvline(macro_f1, color="black", ls="--", lw=1, label=f"macro F1 = {macro_f1:.3f} (mean over classes)")
    ax.set_yticks(y, labels=[name for name, _ in rows], fontsize=9 if len(rows) <= 20 else 8)
    ax.set_xlim(0, 1.08)
    ax.set_ylim(len(rows) - 0.4, -0.6)  # reversed: best at the top
    ax.set_xlabel("F1 score on the test set (0 = useless, 1 = perfect)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", frameon=False, fontsize=9)  # inside the axis it would hide bars
    shown = "" if len(f1) <= MAX_LISTED_CLASSES else f": best and worst {SHOWN_EXTREMES} of {len(f1)}"
    ax.set_title(f"F1 per class{shown} (orange: below the macro average)")
    _save(fig, path)


def most_confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` misclassified samples, the most confidently wrong first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:n]


def _show_image(ax, image: np.ndarray) -> None:
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    # Fixed 0-255 range: auto-contrast would make a faint digit look as bold as a dark one.
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def confused_images(
    images: np.ndarray, y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], n: int, path: str | Path
) -> None:
    """A grid of misclassified test images (original pixels), the most confidently wrong first."""
    chosen = most_confident_mistakes(y_true, probs, n)
    n_wrong = int((probs.argmax(axis=1) != y_true).sum())
    cols = max(1, min(8, math.ceil(math.sqrt(len(chosen)))))
    rows = max(1, math.ceil(len(chosen) / cols))
    fig = _figure(1.9 * cols + 0.4, 2.15 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, chosen):
        ax.set_axis_on()
        _show_image(ax, images[i])
        predicted = int(probs[i].argmax())
        ax.set_title(
            f"true: {class_names[y_true[i]]}\npred: {class_names[predicted]} (p={probs[i, predicted]:.2f})", fontsize=8
        )
    if not len(chosen):
        axes[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle(f"Most confidently wrong: {len(chosen)} of {n_wrong} misclassified test images")
    _save(fig, path)
