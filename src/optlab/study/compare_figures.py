"""The figures of ``optlab compare``'s report: variants over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optlab.evaluation.figures import TRAIN_COLOR, VAL_COLOR, epoch_axis, figure, save
from optlab.evaluation.metrics import Summary

if TYPE_CHECKING:  # type hints only (compare imports this module)
    from optlab.study.compare import Comparison


def _interval(s: Summary) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bar for a mean's confidence interval (None for one seed)."""
    return None if math.isnan(s.ci_low) else [[s.mean - s.ci_low], [s.ci_high - s.mean]]


def _variant_axis(ax, labels: Sequence[str]) -> None:
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(axis="x", alpha=0.3)


def compare_accuracy(cmp: Comparison, path: Path) -> None:
    groups = cmp.ranked[::-1]  # best at the top
    fig = figure(7, 0.45 * len(groups) + 1.5)
    ax = fig.subplots()
    for y, g in enumerate(groups):
        s = g.summary(cmp.metric)
        ax.errorbar(
            s.mean, y, xerr=_interval(s), fmt="o", capsize=4, color=VAL_COLOR if g is cmp.baseline else TRAIN_COLOR
        )
        ax.plot(g.values(cmp.metric), [y] * len(g.runs), "x", color="0.5", markersize=4)
    _variant_axis(ax, [g.label for g in groups])
    ax.set_xlabel(f"test {cmp.metric} (mean and 95% CI over seeds; x: single seeds)")
    save(fig, path)


def compare_curves(cmp: Comparison, path: Path) -> None:
    fig = figure(7, 4.5)
    ax = fig.subplots()
    for g in cmp.ranked:
        if id(g) not in cmp.curves:
            continue
        m = cmp.curves[id(g)]
        (line,) = ax.plot(m.index, m["mean"], label=f"{g.label} (n={int(m['n'].max())})")
        sd = m["std"].fillna(0)  # one seed: no band
        ax.fill_between(m.index, m["mean"] - sd, m["mean"] + sd, color=line.get_color(), alpha=0.2)
    if not math.isnan(cmp.threshold):
        ax.axhline(cmp.threshold, color="0.4", linestyle=":", linewidth=1, label="time-to-reach threshold")
    epoch_axis(ax)
    ax.set_ylabel("validation accuracy (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    save(fig, path)


def compare_params(cmp: Comparison, path: Path) -> None:
    fig = figure(7, 4.5)
    ax = fig.subplots()
    for g in cmp.ranked:
        sizes = [r.trainable_params for r in g.runs if r.trainable_params]
        if not sizes:
            continue
        s = g.summary(cmp.metric)
        ax.errorbar(sizes[0], s.mean, yerr=_interval(s), fmt="o", capsize=4)
        ax.annotate(g.label, (sizes[0], s.mean), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"test {cmp.metric} (mean and 95% CI)")
    ax.grid(alpha=0.3, which="both")
    save(fig, path)


def compare_time(cmp: Comparison, path: Path) -> None:
    groups = cmp.ranked[::-1]
    fig = figure(7, 0.45 * len(groups) + 1.5)
    ax = fig.subplots()
    for y, g in enumerate(groups):
        times = cmp.times.get(id(g), [])
        reached = [t for t in times if t is not None]
        if (s := cmp.time_summary(g)) is not None:
            ax.barh(y, s.mean, xerr=None if math.isnan(s.std) else s.std, capsize=4, color=TRAIN_COLOR, alpha=0.7)
        note = "" if len(reached) == len(times) else f" {len(reached)} of {len(times)} seeds reached it"
        ax.text(0, y, note, va="center", fontsize=8)
    _variant_axis(ax, [g.label for g in groups])
    ax.set_xlabel(f"seconds to reach {cmp.threshold:.3f} validation accuracy (mean ± sd over seeds)")
    save(fig, path)


def comparison_figures(cmp: Comparison) -> dict[str, tuple[str, Any]]:
    """title -> (file suffix, draw(path)) of each figure the comparison report shows."""
    figures = {
        f"Test {cmp.metric} by variant": ("accuracy", lambda path: compare_accuracy(cmp, path)),
        "Validation accuracy per epoch": ("curves", lambda path: compare_curves(cmp, path)),
        f"Test {cmp.metric} against trainable parameters": ("params", lambda path: compare_params(cmp, path)),
    }
    if cmp.times:
        figures["Time to reach the validation accuracy threshold"] = ("time", lambda path: compare_time(cmp, path))
    return figures
