"""``optlab compare``: which variants beat the baseline by more than seed noise.

Runs that differ only by ``seed`` form one variant (:mod:`optlab.experiments`). Each variant gets
the mean, standard deviation and a Student-t 95% confidence interval of its test metrics, and is
compared with the baseline variant by the paired t-test on the seeds both ran where they share at
least three, else by Welch's t-test (:mod:`optlab.stats`). The result is one Markdown report with
its figures beside it (drawn by :mod:`optlab.plotting`).

The report never mixes questions: variants that differ from the baseline in the dataset, the
epoch budget, the data preparation or the prepared data's hash are listed as excluded with the
reason, and :func:`require_comparable` raises when asked to compare two such variants directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optlab.core.errors import OptlabError
from optlab.core.outputs import atomic_file
from optlab.evaluation.metrics import Summary, describe
from optlab.study.experiments import CHOICES, METRICS, SEED_KEY, Group, choice, find_baseline, group_runs, load_runs
from optlab.study.stats import (
    ALPHA,
    MIN_SEEDS_FOR_TEST,
    Difference,
    higher_is_better,
    holm,
    mean_curve,
    paired,
    seeds_needed,
    time_to_reach,
    verdict,
    welch,
)

THRESHOLD_FRACTION = 0.95  # default: of the best variant's best mean validation accuracy
METRIC = "accuracy"  # what variants are ranked and tested by (--metric): any number in the test metrics


# --- which variants answer the same question ---------------------------------------------------
def incomparable_reasons(a: Group, b: Group) -> list[str]:
    """Why the two variants answer different questions (empty when they are comparable)."""
    ca, cb = a.context(), b.context()
    keys = sorted(ca.keys() | cb.keys())
    return [f"{k}: {_fmt(ca.get(k))} vs {_fmt(cb.get(k))}" for k in keys if ca.get(k) != cb.get(k)]


def require_comparable(a: Group, b: Group) -> None:
    reasons = incomparable_reasons(a, b)
    if reasons:
        raise OptlabError(
            f"refusing to compare '{a.label or a.runs[0].name}' with '{b.label or b.runs[0].name}': "
            f"they differ in more than the studied params ({'; '.join(reasons)})"
        )


def label_against(group: Group, baseline: Group) -> str:
    """Name a variant by what it changes relative to the baseline: ``optimizer=sgd`` for another
    option of a group (with only the knobs it set apart from that option's conf/ file), then the
    other params that differ."""
    if group is baseline:
        return "baseline"
    a, b = group.params, baseline.params
    defaults = group.runs[0].choice_defaults
    changed, seen = [], set()
    for g in CHOICES:
        keys = {k for k in a.keys() | b.keys() if k.startswith(f"{g}.")}
        seen |= keys
        knobs = sorted(k for k in keys if k in a and k != f"{g}.name")
        if choice(a, g) != choice(b, g):
            changed.append(f"{g}={choice(a, g)}")
            # Against the option's own conf/ file where it could be read, else against the baseline.
            changed += [f"{k}={_fmt(a[k])}" for k in knobs if a[k] != (defaults[k] if k in defaults else b.get(k))]
        else:
            changed += [f"{k}={_fmt(a[k])}" for k in knobs if a[k] != b.get(k)]
    rest = sorted((a.keys() | b.keys()) - seen)
    changed += [f"{k}={_fmt(a.get(k))}" for k in rest if a.get(k) != b.get(k)]
    if group.runs[0].code_hash != baseline.runs[0].code_hash:
        changed.append("code changed")
    return ", ".join(changed) or "same params"


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# --- the report ------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Everything the report shows, computed once."""

    baseline: Group
    ranked: list[Group]  # comparable variants, best mean test `metric` first (baseline included)
    differences: dict[int, tuple[Difference, float]] = field(default_factory=dict)  # id(group) -> (d, p_holm)
    excluded: list[tuple[Group, list[str]]] = field(default_factory=list)
    threshold_fraction: float = THRESHOLD_FRACTION
    threshold: float = math.nan  # threshold_fraction x the best variant's best mean validation accuracy
    times: dict[int, list[float | None]] = field(default_factory=dict)  # id(group) -> seconds per seed
    curves: dict[int, Any] = field(default_factory=dict)  # id(group) -> mean_curve() over its seeds
    metric: str = METRIC
    # id(group) -> seeds per variant for an 80% chance to detect its observed difference (None: > 10,000)
    needed: dict[int, int | None] = field(default_factory=dict)

    def time_summary(self, group: Group) -> Summary | None:
        """Seconds to reach the threshold, over the seeds that reached it (None if none did)."""
        reached = [t for t in self.times.get(id(group), []) if t is not None]
        return describe(reached) if reached else None


def build_comparison(
    groups: list[Group], baseline: Group, threshold_fraction: float = THRESHOLD_FRACTION, metric: str = METRIC
) -> Comparison:
    for group in groups:
        group.label = label_against(group, baseline)
    comparable = [g for g in groups if not incomparable_reasons(g, baseline)]
    missing = [g for g in comparable if not g.values(metric)]
    if baseline in missing:
        known = sorted({m for g in groups for r in g.runs for m in r.metrics})
        raise OptlabError(f"the baseline has no test metric {metric!r}; choose --metric from: {', '.join(known)}")
    excluded = [(g, incomparable_reasons(g, baseline)) for g in groups if g not in comparable]
    excluded += [(g, [f"no test metric {metric!r}"]) for g in missing]
    comparable = [g for g in comparable if g not in missing]
    ranked = sorted(comparable, key=lambda g: g.summary(metric).mean, reverse=higher_is_better(metric))
    variants = [g for g in ranked if g is not baseline]
    diffs = [difference(g, baseline, metric) for g in variants]
    adjusted = holm([d.p_value for d in diffs])
    result = Comparison(
        baseline,
        ranked,
        {id(g): (d, p) for g, d, p in zip(variants, diffs, adjusted, strict=True)},
        excluded,
        threshold_fraction,
        metric=metric,
    )
    for g, d in zip(variants, diffs, strict=True):
        if d.tested and d.p_value >= ALPHA:  # within noise: how many seeds would tell?
            result.needed[id(g)] = seeds_needed(d.diff, _spread(g, baseline, metric, d), d.test == "paired")

    for g in ranked:
        curves = [r.val_curve for r in g.runs if r.val_curve]
        if curves:
            result.curves[id(g)] = mean_curve(curves)
    best = [curve["mean"].max() for curve in result.curves.values()]
    if best:
        result.threshold = threshold_fraction * max(best)
        for g in ranked:
            result.times[id(g)] = [
                time_to_reach(r.val_curve, r.seconds_per_epoch, result.threshold)
                for r in g.runs
                if r.val_curve and r.seconds_per_epoch is not None
            ]
    return result


def shared_seeds(variant: Group, baseline: Group, metric: str) -> list[Any]:
    """The seeds both variants ran (with ``metric``): what the paired test pairs."""
    return sorted(variant.by_seed(metric).keys() & baseline.by_seed(metric).keys(), key=str)


def difference(variant: Group, baseline: Group, metric: str) -> Difference:
    """``variant - baseline``, tested by the paired t-test on the seeds both ran when they share
    at least MIN_SEEDS_FOR_TEST (the same initial weights and batch orders, seed by seed; a seed
    only one side ran has no partner and stays out of the test), else by Welch's on every seed."""
    vs, bs = variant.by_seed(metric), baseline.by_seed(metric)
    if len(shared_seeds(variant, baseline, metric)) >= MIN_SEEDS_FOR_TEST:
        return paired(vs, bs)
    return welch(variant.values(metric), baseline.values(metric))


def _spread(variant: Group, baseline: Group, metric: str, d: Difference) -> float:
    """The standard deviation the power statement assumes: of the seed-by-seed differences over
    the seeds the paired test used, or of one seed's result, pooled over both variants (Welch)."""
    if d.test == "paired":
        vs, bs = variant.by_seed(metric), baseline.by_seed(metric)
        return describe([vs[s] - bs[s] for s in shared_seeds(variant, baseline, metric)]).std
    a, b = describe(variant.values(metric)), describe(baseline.values(metric))
    return math.sqrt((a.std**2 + b.std**2) / 2)


def _needed(cmp: Comparison, g: Group) -> str:
    if id(g) not in cmp.needed:
        return "–"
    n = cmp.needed[id(g)]
    return "more than 10,000" if n is None else f"≈ {n}"


def _pm(s: Summary, digits: int = 4) -> str:
    return f"{s.mean:.{digits}f}" if s.n < 2 else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _ci(s: Summary, digits: int = 4) -> str:
    return "–" if math.isnan(s.ci_low) else f"[{s.ci_low:.{digits}f}, {s.ci_high:.{digits}f}]"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def render_markdown(cmp: Comparison, figures: dict[str, str], notes: Sequence[str], source: str) -> str:
    n_runs = sum(len(g.runs) for g in cmp.ranked)
    out = [
        "# Experiment comparison",
        "",
        f"{n_runs} runs in {len(cmp.ranked)} variants from {source}. A variant is a set of runs that "
        f"differ only by `{SEED_KEY}`. Baseline: `{', '.join(sorted({r.name for r in cmp.baseline.runs}))}`.",
    ]
    out += _ranking(cmp) + _against_baseline(cmp) + _time_to_reach(cmp)
    if figures:
        out += ["", "## Figures", ""]
        out += [f"![{title}]({name})\n" for title, name in figures.items()]
    out += _not_compared(cmp, notes) + _every_run(cmp)
    return "\n".join(out)


def _ranking(cmp: Comparison) -> list[str]:
    what = "Mean ± sample standard deviation over seeds, and the 95% Student-t confidence interval of the mean."
    out = ["", f"## Ranking by test {cmp.metric}", "", what, ""]
    columns = {cmp.metric: f"test {cmp.metric}", **{m: t for m, t in METRICS.items() if m != cmp.metric}}
    header = ["rank", "variant", "seeds"]
    for title in columns.values():
        header += [f"{title} (mean ± sd)", "95% CI"]
    header.append("diverged")
    rows = []
    for rank, g in enumerate(cmp.ranked, start=1):
        row = [rank, g.label, len(g.runs)]
        for metric in columns:
            values = g.values(metric)
            row += [_pm(describe(values)), _ci(describe(values))] if values else ["–", "–"]
        rows.append([*row, f"**{g.diverged} of {len(g.runs)}**" if g.diverged else "–"])
    return out + _table(header, rows)


def _against_baseline(cmp: Comparison) -> list[str]:
    base, out = cmp.baseline, ["", "## Against the baseline", ""]
    if cmp.differences:
        rows = []
        for g in cmp.ranked:
            if g is base:
                continue
            d, p_holm = cmp.differences[id(g)]
            verdict_ = judged(g, base, d, p_holm, higher_is_better(cmp.metric))
            test = f"paired ({len(shared_seeds(g, base, cmp.metric))} seeds)" if d.test == "paired" else d.test
            rows.append([g.label, f"{d.diff:+.4f}", _ci_diff(d), test, _p(d.p_value), _p(p_holm), _needed(cmp, g),
                         verdict_])  # fmt: skip
        header = ["variant", f"Δ test {cmp.metric}", "95% CI of Δ", "test", "p", "p (Holm)", "seeds to detect it",
                  "verdict"]  # fmt: skip
        out += _table(header, rows)
    else:
        out.append("No other comparable variant.")
    return out + [
        "",
        f"Δ is the variant's mean test {cmp.metric} minus the baseline's "
        f"({'higher' if higher_is_better(cmp.metric) else 'lower'} is better). Where a variant and "
        f"the baseline ran at least {MIN_SEEDS_FOR_TEST} of the same seeds (same initial weights and "
        f"batch orders, seed by seed: replicas or a seed sweep) the test is the paired t-test on the "
        f"seed-by-seed differences over those shared seeds (`scipy.stats.ttest_rel`), which a seed's "
        f"luck shared by both sides does not blur; the test column says how many it paired, and Δ "
        f"and its CI are then the mean difference over them, so a seed only one side ran stays out "
        f"(Δ can differ from the difference of the means in the ranking). Otherwise the test is "
        f"Welch's t-test on every seed (`scipy.stats.ttest_ind(equal_var=False)`): with a handful "
        f"of seeds nothing says two variants share a variance, and Welch does not assume they do. "
        f"With fewer than {MIN_SEEDS_FOR_TEST} seeds on either side no test is made and the verdict "
        f'says "not enough seeds". A difference is called larger than seed noise when p < {ALPHA:.2f} '
        f"(its 95% CI excludes 0); p (Holm) corrects for testing several variants against one "
        f"baseline. For a difference within seed noise, *seeds to detect it* is roughly how many "
        f"seeds per variant the same test would need to call the observed difference real 80% of "
        f"the time (if it were the true one, with the spread seen here). Seed noise is all this "
        f"measures: a different data split is not sampled.",
    ]


def _time_to_reach(cmp: Comparison) -> list[str]:
    if not cmp.times:
        return []
    out = ["", f"## Time to reach {cmp.threshold:.4f} validation accuracy", "",
           f"The threshold is {cmp.threshold_fraction:.0%} of the best variant's best mean validation "
           "accuracy; time is seconds per epoch × the first epoch at or above it, per seed.", ""]  # fmt: skip
    rows = []
    for g in cmp.ranked:
        times = cmp.times.get(id(g), [])
        reached = [t for t in times if t is not None]
        seconds = _pm(describe(reached), 1) if reached else "not reached"
        rows.append([g.label, f"{len(reached)} of {len(times)}", seconds])
    return out + _table(["variant", "seeds reaching it", "seconds (mean ± sd)"], rows)


def _not_compared(cmp: Comparison, notes: Sequence[str]) -> list[str]:
    repeats = [f"`{r.name}` repeats seed {_fmt(r.seed)} of variant {g.label}; that seed is counted once."
               for g in cmp.ranked for r in g.repeats]  # fmt: skip
    notes = [*repeats, *notes]
    if not (cmp.excluded or notes):
        return []
    out = ["", "## Not compared", ""]
    for g, reasons in cmp.excluded:
        names = ", ".join(f"`{r.name}`" for r in g.runs)
        out.append(
            f"- {g.label} ({names}): differs from the baseline in more than the studied params "
            f"(this variant vs the baseline: {'; '.join(reasons)}); compare such variants among "
            f"themselves with `--baseline`."
        )
    return out + [f"- {note}" for note in notes]


def _every_run(cmp: Comparison) -> list[str]:
    rows = [
        [g.label, _fmt(r.seed), f"`{r.name}`" + ("" if r.replica is None else f" (replica {r.replica})"), r.rev[:7],
         *(f"{r.metrics.get(m, math.nan):.4f}" for m in METRICS)]
        for g in cmp.ranked
        for r in g.runs
    ]  # fmt: skip
    table = _table(["variant", "seed", "run", "rev", *METRICS.values()], rows)
    return ["", "<details><summary>Every run</summary>", "", *table, "", "</details>", ""]


def judged(variant: Group, baseline: Group, d: Difference, p_holm: float, higher_better: bool = True) -> str:
    """The verdict, unless a run diverged: a diverged run is a failure, not a draw from seed noise."""
    sides = ((variant, "its"), (baseline, "the baseline's"))
    failed = [f"{g.diverged} of {len(g.runs)} {name} seeds" for g, name in sides if g.diverged]
    if failed:
        return f"diverged ({' and '.join(failed)}): not a question of seed noise"
    return verdict(d, p_holm, higher_better=higher_better)


def _ci_diff(d: Difference) -> str:
    return "–" if not d.tested else f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]"


# --- the command -----------------------------------------------------------------------------
def compare(
    repo: str | Path = ".",
    out: str | Path = "reports/compare.md",
    baseline: str | None = None,
    all_commits: bool = False,
    threshold_fraction: float = THRESHOLD_FRACTION,
    metric: str = METRIC,
) -> Comparison:
    """Read every committed run, write the Markdown report ``out`` and its figures beside it;
    variants are ranked and tested by the test metric ``metric``."""
    repo = Path(repo).resolve()
    out = Path(out) if Path(out).is_absolute() else repo / out
    if not 0 < threshold_fraction <= 1:
        raise OptlabError(f"--threshold must be in (0, 1], got {threshold_fraction}")
    runs, notes = load_runs(repo, all_commits)
    if not runs:
        raise OptlabError(
            f"no committed run with test metrics in {repo}: run `dvc repro` and commit, or `dvc exp run`"
            + ("" if all_commits else " (or pass --all-commits)")
        )
    groups = group_runs(runs)
    result = build_comparison(groups, find_baseline(groups, repo, baseline), threshold_fraction, metric)

    # Figures first, the report last: a report never links to a figure that is not there.
    from optlab.study import compare_figures  # matplotlib: here, so that every `optlab` command need not import it

    figures = {}
    for title, (suffix, draw) in compare_figures.comparison_figures(result).items():
        name = f"{out.stem}-{suffix}.png"
        with atomic_file(out.parent / name) as tmp:
            draw(tmp)
        figures[title] = name
    source = f"`{repo.name}` ({'all commits' if all_commits else 'HEAD and its experiments'})"
    with atomic_file(out) as tmp:
        tmp.write_text(render_markdown(result, figures, notes, source))
    return result
