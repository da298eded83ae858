"""``optlab study report``: ``reports/study/<name>.md`` and its figures, from what the study's runs
gave (``optlab.study.tuning.gather``).

Per problem: each contender's chosen knobs, test accuracy over the final seeds (mean, sd and 95%
interval) and the paired test against the reference contender (Holm-corrected, with the seeds a
difference within noise would need); the learning-rate sensitivity (the selection metric of
every trial against its rate); tunability (the expected best validation metric after k trials,
k = 1 ... budget); time to the target validation accuracy, in epochs and seconds, beside the
learning-curve bands. With several problems, AlgoPerf's performance profile across them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from optlab.core.outputs import atomic_file
from optlab.core.params import improves
from optlab.evaluation import figures
from optlab.evaluation.metrics import Summary, describe
from optlab.study import stats
from optlab.study.tuning import Outcome, Study, expected_best, performance_profile, time_to_target

RATE = "optimizer.learning_rate"


def _pm(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "–"
    s = describe(values)
    return f"{s.mean:.{digits}f}" if s.n < 2 else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _ci(values: Sequence[float]) -> str:
    s: Summary | None = describe(values) if len(values) > 1 else None
    return "–" if s is None else f"[{s.ci_low:.4f}, {s.ci_high:.4f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]  # fmt: skip


def _test_accuracy(out: Outcome, contender: str) -> dict:
    return {r.seed: r.metrics["accuracy"] for r in out.final_runs.get(contender, []) if "accuracy" in r.metrics}


def comparison(study: Study, out: Outcome) -> list[str]:
    """The table: each contender's choice, its final seeds' test accuracy and the paired test."""
    ref = _test_accuracy(out, study.reference)
    others = [c for c in study.spec.contenders if c != study.reference]
    diffs = {c: stats.paired(_test_accuracy(out, c), ref) for c in others if _test_accuracy(out, c) and ref}
    adjusted = dict(zip(diffs, stats.holm([d.p_value for d in diffs.values()]), strict=True))
    rows = []
    for c in study.spec.contenders:
        chosen, acc = out.chosen.get(c), _test_accuracy(out, c)
        knobs = ", ".join(f"{k} {v:.3g}" for k, v in chosen.point.items()) if chosen else "no usable trial"
        ran = sum(t.selected_by is not None for t in out.trials[c])
        row = [c, knobs, f"{ran} of {len(out.trials[c])}", f"{chosen.selected_by:.4f}" if chosen else "–",
               _pm(list(acc.values())), _ci(list(acc.values()))]  # fmt: skip
        if c == study.reference:
            row += ["reference", "", "", ""]
        elif c in diffs:
            d, p = diffs[c], adjusted[c]
            needed = ""
            if d.tested and d.p_value >= stats.ALPHA:
                spread = describe([v - ref[s] for s, v in acc.items() if s in ref]).std
                n = stats.seeds_needed(d.diff, spread, is_paired=True)
                needed = f" (≈ {n} seeds to tell)" if n else " (more than 10,000 seeds to tell)"
            p_text = "–" if math.isnan(d.p_value) else f"{d.p_value:.3g}"
            row += [f"{d.diff:+.4f}", p_text, "–" if math.isnan(p) else f"{p:.3g}", stats.verdict(d, p) + needed]
        else:
            row += ["–", "–", "–", "no final runs"]
        rows.append(row)
    header = ["contender", "chosen knobs", "trials", f"best {study.spec.select}", "test accuracy (mean ± sd)",
              "95% CI", f"Δ vs {study.reference}", "p (paired)", "p (Holm)", "verdict"]  # fmt: skip
    return _table(header, rows)


def tunability(study: Study, out: Outcome) -> list[str]:
    higher = improves(study.spec.select) == "max"
    ks = list(range(1, study.spec.budget + 1))
    rows = []
    for c, trials in out.trials.items():
        values = [t.selected_by for t in trials if t.selected_by is not None and math.isfinite(t.selected_by)]
        rows.append([c, *(f"{expected_best(values, k, higher):.4f}" if values else "–" for k in ks)])
    return _table(["contender", *(f"k = {k}" for k in ks)], rows)


def times(study: Study, out: Outcome) -> tuple[list[str], dict[str, float]]:
    """The table of epochs and seconds to the target over the final seeds; contender -> mean seconds
    (infinite when no seed reached it), for the performance profile."""
    rows, seconds = [], {}
    for c in study.spec.contenders:
        runs = out.final_runs.get(c, [])
        epochs = [time_to_target(r.val_curve, study.spec.target) for r in runs]
        reached = [e for e in epochs if e is not None]
        secs = [e * r.seconds_per_epoch for e, r in zip(epochs, runs, strict=True)
                if e is not None and r.seconds_per_epoch]  # fmt: skip
        seconds[c] = float(np.mean(secs)) if secs and len(reached) == len(runs) else math.inf
        rows.append([c, f"{len(reached)} of {len(runs)}", _pm(reached, 1) if reached else "not reached",
                     _ci(reached), _pm(secs, 1) if secs else "–"])  # fmt: skip
    return _table(
        ["contender", "seeds reaching it", "epochs (mean ± sd)", "95% CI", "seconds (mean ± sd)"], rows
    ), seconds


# --- the figures ------------------------------------------------------------------------------
def sensitivity_figure(study: Study, out: Outcome, path: Path) -> None:
    fig = figures.figure(7, 4.2)
    ax = fig.subplots()
    for c, trials in out.trials.items():
        shown = [(t.point.get(RATE), t.selected_by) for t in trials if t.selected_by is not None and RATE in t.point]
        if shown:
            rates, values = zip(*sorted(shown), strict=True)
            (line,) = ax.plot(rates, values, "o-", ms=4, lw=0.8, label=c)
            if c in out.chosen:
                ax.plot([out.chosen[c].point[RATE]], [out.chosen[c].selected_by], "*", ms=12, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (each trial; a star: the one chosen)")
    ax.set_ylabel(f"{study.spec.select} (tuning seed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Learning-rate sensitivity: {out.problem}")
    figures.save(fig, path)


def tunability_figure(study: Study, out: Outcome, path: Path) -> None:
    fig = figures.figure(7, 4.2)
    ax = fig.subplots()
    higher, ks = improves(study.spec.select) == "max", range(1, study.spec.budget + 1)
    for c, trials in out.trials.items():
        values = [t.selected_by for t in trials if t.selected_by is not None and math.isfinite(t.selected_by)]
        if values:
            ax.plot(list(ks), [expected_best(values, k, higher) for k in ks], "o-", ms=4, label=c)
    ax.set_xlabel("trials k (drawn at random from the budget's)")
    ax.set_ylabel(f"expected best {study.spec.select}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Tunability: what k trials buy, {out.problem}")
    figures.save(fig, path)


def curves_figure(study: Study, out: Outcome, path: Path) -> None:
    fig = figures.figure(7, 4.2)
    ax = fig.subplots()
    for c in study.spec.contenders:
        curves = [r.val_curve for r in out.final_runs.get(c, []) if r.val_curve]
        if curves:
            m = stats.mean_curve(curves)
            (line,) = ax.plot(m.index, m["mean"], label=f"{c} (n={int(m['n'].max())})")
            sd = m["std"].fillna(0)
            ax.fill_between(m.index, m["mean"] - sd, m["mean"] + sd, color=line.get_color(), alpha=0.2)
    ax.axhline(study.spec.target, color="0.4", ls=":", lw=1, label=f"target {study.spec.target}")
    figures.epoch_axis(ax)
    ax.set_ylabel("validation accuracy (mean ± sd over the final seeds)")
    ax.legend(fontsize=8)
    ax.set_title(f"Learning curves of the chosen trials: {out.problem}")
    figures.save(fig, path)


def profile_figure(seconds: dict[str, dict[str, float]], path: Path) -> list[str]:
    taus = list(np.geomspace(1, 10, 40))
    profile = performance_profile(seconds, taus)
    fig = figures.figure(7, 4.2)
    ax = fig.subplots()
    for c, shares in profile.items():
        ax.step(taus, shares, where="post", label=c)
    ax.set_xscale("log")
    ax.set_xlabel("tau: within this factor of the fastest contender's time to target")
    ax.set_ylabel("share of problems")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Performance profile across problems (AlgoPerf)")
    figures.save(fig, path)
    return _table(["contender", "tau = 1", "tau = 2", "tau = 4"],
                  [[c, *(f"{s[i]:.2f}" for i in (0, 12, 24))] for c, s in profile.items()])  # fmt: skip


def write(study: Study, outcomes: Sequence[Outcome], out_dir: Path, wall_seconds: float | None = None) -> Path:
    """The report and its figures in ``out_dir`` (figures first: the report never links a missing one)."""
    spec, lines, seconds = study.spec, [f"# Study `{study.name}`", ""], {}
    lines += [f"{len(spec.contenders)} contenders, {spec.budget} trials each on the tuning seed "
              f"{spec.tuning_seed} (a scrambled Halton sequence over each one's ranges), the best by "
              f"`{spec.select}` re-run on seeds {spec.seeds}; reference `{study.reference}`. The test set "
              f"never chooses: it only scores the chosen runs."]  # fmt: skip
    if wall_seconds is not None:
        lines += ["", f"Wall time of `optlab study run`: {wall_seconds:.0f} s."]
    for out in outcomes:
        stem = f"{study.name}-{out.problem}"
        drawn = {"sensitivity": sensitivity_figure, "tunability": tunability_figure, "curves": curves_figure}
        for suffix, draw in drawn.items():
            with atomic_file(out_dir / f"{stem}-{suffix}.png") as tmp:
                draw(study, out, tmp)
        table, seconds[out.problem] = times(study, out)
        lines += ["", f"## {out.problem}", "", *comparison(study, out), "",
                  f"![Learning-rate sensitivity]({stem}-sensitivity.png)", "", "### Tunability", "",
                  f"The expected best `{spec.select}` after k trials drawn at random from the budget's (Dodge "
                  "et al. 2019): how much tuning each contender needs.", "", *tunability(study, out), "",
                  f"![Tunability]({stem}-tunability.png)", "", f"### Time to {spec.target} validation accuracy", "",
                  *table, "", f"![Learning curves]({stem}-curves.png)"]  # fmt: skip
    if len(outcomes) > 1:
        with atomic_file(out_dir / f"{study.name}-profile.png") as tmp:
            lines += ["", "## Across problems", "", *profile_figure(seconds, tmp), "",
                      f"![Performance profile]({study.name}-profile.png)"]  # fmt: skip
    report = out_dir / f"{study.name}.md"
    with atomic_file(report) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return report
