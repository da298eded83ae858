"""The plot stage's figures: one experiment's training history (what dvclive wrote), test metrics
and test predictions. No Keras import, so the plot stage starts in a second; the study tools
draw their own figures with the helpers here (:func:`figure`, :func:`save`).

Figures are built as bare ``matplotlib.figure.Figure`` objects rather than through pyplot:
pyplot keeps every figure alive in a global registry until it is closed, while a bare Figure
renders with Agg, is never registered and is freed as soon as the function returns, so
drawing many figures cannot grow memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from optlab.core.params import PlotParams
from optlab.evaluation import metrics

DPI = 110
TRAIN_COLOR, VAL_COLOR, MARK_COLOR = "tab:blue", "tab:orange", "tab:green"
# Above this many classes the per-cell numbers of the confusion matrix are unreadable.
MAX_ANNOTATED_CLASSES = 20
# Above this many classes the F1 chart shows only the extremes, SHOWN_EXTREMES at each end.
MAX_LISTED_CLASSES = 30
SHOWN_EXTREMES = 20


def figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, path: str | Path) -> None:
    # The constrained layout already fits every label into the page: a tight box would draw the
    # figure twice to measure it (the plot stage's 8 figures took 12% longer).
    fig.savefig(path, dpi=DPI)


# --- training history ----------------------------------------------------------------------
def epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def learning_curves(history: pd.DataFrame, path: str | Path, replicas: Sequence[pd.DataFrame] = ()) -> None:
    """Loss and accuracy per epoch, training against validation, with the epoch of the best
    validation accuracy marked (the one ``keep_best`` would keep). With ``replicas`` (each
    replica's history), ``history`` is their mean, drawn with a band of one standard deviation
    over the replicas around it."""
    fig = figure(11, 4.2)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = history.index
    best = int(history["val_accuracy"].idxmax())
    marker = "o" if len(epochs) <= 30 else None
    panels = [(ax_loss, "loss", "cross-entropy loss (nats)"), (ax_acc, "accuracy", "accuracy (fraction correct)")]
    for ax, key, ylabel in panels:
        ax.plot(epochs, history[key], marker=marker, ms=3, color=TRAIN_COLOR, label="training")
        ax.plot(epochs, history[f"val_{key}"], marker=marker, ms=3, color=VAL_COLOR, label="validation")
        for column, color in ((key, TRAIN_COLOR), (f"val_{key}", VAL_COLOR)):
            if len(replicas) > 1:
                spread = pd.DataFrame({r: h[column] for r, h in enumerate(replicas)}).std(axis=1).reindex(epochs)
                mean = history[column]
                ax.fill_between(epochs, mean - spread.fillna(0), mean + spread.fillna(0), color=color, alpha=0.2)
        ax.axvline(best, color=MARK_COLOR, ls="--", lw=1, label=f"best validation accuracy (epoch {best})")
        ax.plot([best], [history.loc[best, f"val_{key}"]], "o", color=MARK_COLOR, ms=7)
        ax.set_ylabel(ylabel)
        epoch_axis(ax)
    ax_loss.set_title("Loss (lower is better)")
    ax_acc.set_title(f"Accuracy: best validation {history.loc[best, 'val_accuracy']:.3f} at epoch {best}")
    # Below the panels, where no curve can run under it.
    fig.legend(*ax_acc.get_legend_handles_labels(), loc="outside lower center", ncols=3, frameon=False, fontsize=9)
    shown = f", mean of {len(replicas)} replicas ± 1 sd" if len(replicas) > 1 else ""
    fig.suptitle(f"Learning curves: training vs validation, per epoch{shown}")
    save(fig, path)


def learning_rate(history: pd.DataFrame, path: str | Path) -> None:
    """The optimizer's learning rate at the end of each epoch; log scale when it spans more
    than a factor of 10, so a decay to 1e-6 does not flatten into the axis."""
    fig = figure(7, 4)
    ax = fig.subplots()
    rate = history["learning_rate"]
    ax.plot(history.index, rate, marker="o" if len(rate) <= 30 else None, ms=3, color=TRAIN_COLOR)
    if rate.min() > 0 and rate.max() / rate.min() > 10:
        ax.set_yscale("log")
    ax.set_ylabel("learning rate (step size, no unit)")
    epoch_axis(ax)
    first, last = rate.iloc[0], rate.iloc[-1]
    change = f"constant {first:.3g}" if first == last else f"{first:.3g} at the start, {last:.3g} at the end"
    ax.set_title(f"Learning rate per epoch: {change}")
    save(fig, path)


DIAGNOSTIC_PANELS = {  # kind -> (title, y label, log scale)
    "grad_norm": ("Gradient norm (root mean square over 1 step in 16)", "||dL/dw||", True),
    "update_ratio": ("One step's update relative to the weights (RMS, 1 step in 16)", "||dw|| / ||w||", True),
    "weight_norm": ("Weight norm (end of epoch)", "||w||", True),
    "dead_fraction": ("Dead ReLU units (never active on 1,024 validation images)", "fraction of units", False),
}


def gradients(diagnostics: Mapping[str, pd.DataFrame], path: str | Path) -> None:
    """How backpropagation reached each layer, epoch by epoch: one line per layer in four panels.
    ``diagnostics`` is optlab.record.read_diagnostics's (empty for the keras loop)."""
    fig = figure(11, 7.5)
    axes = fig.subplots(2, 2).ravel()
    if not diagnostics:
        fig.clear()
        fig.text(0.5, 0.5, "No backprop diagnostics: they are computed inside optlab's compiled loop\n"
                 "(train.backend: jax, train.loop: compiled), and this run trained with Keras's fit.",
                 ha="center", va="center", fontsize=11)  # fmt: skip
        fig.savefig(path, dpi=DPI)  # the whole page: a tight box would crop it to the sentence
        return
    for ax, (kind, (title, ylabel, log)) in zip(axes, DIAGNOSTIC_PANELS.items(), strict=True):
        table = diagnostics.get(kind)
        if table is None or table.empty:
            ax.text(0.5, 0.5, "not measured (no ReLU layers)" if kind == "dead_fraction" else "not measured",
                    ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        else:
            marker = "o" if len(table) <= 30 else None
            for layer in table.columns:
                ax.plot(table.index, table[layer], marker=marker, ms=3, label=layer)
            if log and (table.to_numpy() > 0).any():
                ax.set_yscale("log")
            if not log:
                ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        epoch_axis(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 7), frameon=False, fontsize=9)
    fig.suptitle("Backprop diagnostics per layer (input side first)")
    save(fig, path)


NO_CURVATURE = (
    "Not measured: the sharpness and the noise scale are computed inside optlab's compiled loop\n"
    "(train.backend: jax, train.loop: compiled, train.diagnostics: true), and this run {why}."
)


def _blank(fig: Figure, path: str | Path, why: str) -> None:
    fig.text(0.5, 0.5, NO_CURVATURE.format(why=why), ha="center", va="center", fontsize=11)
    fig.savefig(path, dpi=DPI)  # the whole page: a tight box would crop it to the sentence


def _against(ax, table: pd.DataFrame, value: str, line: str, labels: tuple[str, str]) -> str:
    """``value`` per epoch against its threshold ``line`` on a log axis; a title saying where it ended."""
    rows = table[[value, line]].dropna()
    marker = "o" if len(rows) <= 30 else None
    ax.plot(rows.index, rows[value], marker=marker, ms=3, color=TRAIN_COLOR, label=labels[0])
    ax.plot(rows.index, rows[line], ls="--", color=VAL_COLOR, label=labels[1])
    ax.set_yscale("log")
    epoch_axis(ax)
    ax.legend(fontsize=9, frameon=False)
    last = rows.iloc[-1]
    return f"{last[value]:.3g} at epoch {rows.index[-1]}: {last[value] / last[line]:.0%} of its threshold"


def sharpness(curvature: pd.DataFrame, path: str | Path, optimizer: str = "") -> None:
    """The top Hessian eigenvalue of the training loss per epoch against the optimizer's stability
    threshold (2/η for gradient descent), log scale; beside it, for an adaptive optimizer, the
    preconditioned sharpness against its own threshold (Cohen et al. 2022). ``curvature``:
    optlab.training.record.read_curvature's."""
    adaptive = "preconditioned_sharpness" in curvature
    fig = figure(11 if adaptive else 7, 4.2)
    if "sharpness" not in curvature:
        return _blank(fig, path, "trained without them (Keras's fit, or train.sharpness_images: 0)")
    axes = np.atleast_1d(fig.subplots(1, 2 if adaptive else 1))
    sgd = optimizer in ("", "sgd")
    threshold = "2/η, gradient descent's stability threshold" if sgd else f"2/η (gradient descent's, not {optimizer}'s)"
    title = _against(axes[0], curvature, "sharpness", "stability_threshold", ("sharpness λmax(H)", threshold))
    axes[0].set_title(f"Sharpness: {title}", fontsize=10)
    axes[0].set_ylabel("top Hessian eigenvalue (nats per unit² of weight)")
    if adaptive:
        labels = ("λmax(P⁻¹H), P the optimizer's preconditioner", "its threshold, (2 + 2β1)/((1 - β1)η) for Adam")
        title = _against(axes[1], curvature, "preconditioned_sharpness", "preconditioned_threshold", labels)
        axes[1].set_title(f"Preconditioned sharpness: {title}", fontsize=10)
        axes[1].set_ylabel("top eigenvalue of P⁻¹H (per step of unit rate)")
    fig.suptitle("Sharpness against the stability threshold (Cohen et al. 2021, 2022), on a fixed training subset")
    save(fig, path)


def noise_scale(curvature: pd.DataFrame, batch_size: int | None, path: str | Path) -> None:
    """The gradient noise scale B_simple = tr(Σ)/|G|² per epoch (McCandlish et al. 2018: the
    critical batch size, past which a larger batch buys little), beside the batch size in use."""
    fig = figure(7, 4.2)
    rows = curvature["noise_scale"].dropna() if "noise_scale" in curvature else pd.Series(dtype=float)
    if rows.empty:
        why = "trained without it" if "gradient_signal" not in curvature else "never had |G|² above its noise"
        return _blank(fig, path, f"{why} (Keras's fit, or train.noise_scale_images: 0)")
    ax = fig.subplots()
    ax.plot(rows.index, rows, marker="o" if len(rows) <= 30 else None, ms=3, color=TRAIN_COLOR,
            label="B_simple = tr(Σ)/|G|²")  # fmt: skip
    if batch_size:
        ax.axhline(batch_size, ls="--", color=VAL_COLOR, label=f"the batch size in use, {batch_size}")
    ax.set_yscale("log")
    ax.set_ylabel("examples per batch")
    epoch_axis(ax)
    ax.legend(fontsize=9, frameon=False)
    last = f"{rows.iloc[-1]:.3g} at epoch {rows.index[-1]}"
    shown = f", {rows.iloc[-1] / batch_size:.3g}x the batch size" if batch_size else ""
    ax.set_title(f"Gradient noise scale (the critical batch size): {last}{shown}", fontsize=10)
    save(fig, path)


# --- test-set results ----------------------------------------------------------------------
def confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | Path) -> None:
    """Counts (actual rows, predicted columns), coloured by the share of each actual class so
    that rare and common classes read on the same scale."""
    n = len(class_names)
    cm = np.asarray(cm)
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros(cm.shape, dtype=float), where=support > 0)
    side = float(np.clip(0.55 * n + 2.5, 6, 17))
    fig = figure(side + 1.2, side)
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
    ax.set_xticks(
        ticks, labels=class_names, rotation=90 if n > 10 else 45, ha="center" if n > 10 else "right", fontsize=fontsize
    )
    ax.set_yticks(ticks, labels=class_names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    counts = "counts in cells" if n <= MAX_ANNOTATED_CLASSES else "colour only"
    ax.set_title(f"Confusion matrix: {cm.sum()} test images, accuracy {accuracy:.3f} ({counts})")
    save(fig, path)


def _f1_rows(f1: Mapping[str, float]) -> list[tuple[str, float | None]]:
    """(class, F1) from best to worst; with many classes, only both ends and a gap row."""
    ranked = sorted(f1.items(), key=lambda kv: kv[1], reverse=True)
    if len(ranked) <= max(MAX_LISTED_CLASSES, 2 * SHOWN_EXTREMES):  # both ends would overlap
        return ranked
    hidden = len(ranked) - 2 * SHOWN_EXTREMES
    return ranked[:SHOWN_EXTREMES] + [(f"... {hidden} classes not shown ...", None)] + ranked[-SHOWN_EXTREMES:]


def per_class_f1(f1: Mapping[str, float], path: str | Path) -> None:
    """F1 of each class (class name -> F1) as sorted bars, best at the top, against the macro
    average (their mean)."""
    f1 = {name: float(value) for name, value in f1.items()}
    macro_f1 = float(np.mean(list(f1.values())))
    rows = _f1_rows(f1)
    fig = figure(8, 0.28 * len(rows) + 1.9)
    ax = fig.subplots()
    y = np.arange(len(rows))
    values = [v or 0.0 for _, v in rows]
    colors = ["none" if v is None else (TRAIN_COLOR if v >= macro_f1 else VAL_COLOR) for _, v in rows]
    ax.barh(y, values, color=colors, height=0.75)
    for yi, (_, v) in zip(y, rows, strict=False):
        if v is not None:  # inside the bar's end, where the macro line rarely passes
            inside = v > 0.15
            ax.text(
                v - 0.01 if inside else v + 0.01,
                yi,
                f"{v:.2f}",
                va="center",
                ha="right" if inside else "left",
                fontsize=8,
                color="white" if inside else "black",
            )
    ax.axvline(macro_f1, color="black", ls="--", lw=1, label=f"macro F1 = {macro_f1:.3f} (mean over classes)")
    ax.set_yticks(y, labels=[name for name, _ in rows], fontsize=9 if len(rows) <= 20 else 8)
    ax.set_xlim(0, 1.08)
    ax.set_ylim(len(rows) - 0.4, -0.6)  # reversed: best at the top
    ax.set_xlabel("F1 score on the test set (0 = useless, 1 = perfect)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", frameon=False, fontsize=9)  # inside the axis it would hide bars
    shown = "" if len(f1) <= MAX_LISTED_CLASSES else f": best and worst {SHOWN_EXTREMES} of {len(f1)}"
    ax.set_title(f"F1 per class{shown} (orange: below the macro average)")
    save(fig, path)


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
    fig = figure(1.9 * cols + 0.4, 2.15 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, chosen, strict=False):
        ax.set_axis_on()
        _show_image(ax, images[i])
        predicted = int(probs[i].argmax())
        ax.set_title(
            f"true: {class_names[y_true[i]]}\npred: {class_names[predicted]} (p={probs[i, predicted]:.2f})", fontsize=8
        )
    if not len(chosen):
        axes[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle(f"Most confidently wrong: {len(chosen)} of {n_wrong} misclassified test images")
    save(fig, path)


# --- the plot stage's figures --------------------------------------------------------------
@dataclass(frozen=True)
class Figures:
    """Everything one experiment's figures are drawn from (the plot stage's inputs)."""

    history: pd.DataFrame  # per epoch, from optlab.record.read_history (with replicas, their mean)
    replicas: Sequence[pd.DataFrame]  # each replica's history (read_replica_histories; empty for one)
    diagnostics: Mapping[str, pd.DataFrame]  # from optlab.record.read_diagnostics (may be empty)
    y_test: np.ndarray
    probabilities: np.ndarray  # (test images, classes)
    images: np.ndarray  # the original test images, uint8 (N, H, W, C)
    classes: Sequence[str]
    curvature: pd.DataFrame | None = None  # from optlab.record.read_curvature (None or empty: not measured)
    batch_size: int | None = None  # the run's train.batch_size, beside the noise scale
    optimizer: str = ""  # the run's optimizer.name (the sharpness figure names its threshold)

    def draw(self, out: Path, params: PlotParams) -> list[str]:
        """Write every figure into ``out``; return their file names."""
        cm = metrics.confusion(self.y_test, self.probabilities.argmax(axis=1), len(self.classes))
        curvature = self.curvature if self.curvature is not None else pd.DataFrame()
        figures = {
            "learning_curves.png": lambda path: learning_curves(self.history, path, self.replicas),
            "learning_rate.png": lambda path: learning_rate(self.history, path),
            "gradients.png": lambda path: gradients(self.diagnostics, path),
            "sharpness.png": lambda path: sharpness(curvature, path, self.optimizer),
            "noise_scale.png": lambda path: noise_scale(curvature, self.batch_size, path),
            "confusion_matrix.png": lambda path: confusion_matrix(cm, self.classes, path),
            "per_class_f1.png": lambda path: per_class_f1(metrics.f1_by_class(cm, self.classes), path),
            "confused_images.png": lambda path: confused_images(
                self.images, self.y_test, self.probabilities, self.classes, params.confused_images, path
            ),
        }
        for name, draw in figures.items():
            draw(out / name)
        return list(figures)
