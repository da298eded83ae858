"""Compare DVC experiments across seeds, and say which differences are larger than seed noise.

Runs that differ only by ``seed`` form one *variant*. Each variant gets the mean, standard
deviation and a Student-t 95% confidence interval of its test metrics; each variant is then
compared with the baseline variant by Welch's t-test. The statistics are small pure functions
on lists of numbers (tested on known values without DVC); :func:`compare` reads the runs from
``dvc exp show`` and git, and writes one Markdown report with its figures beside it.

The report never mixes questions: variants that differ from the baseline in the dataset, the
epoch budget, the data preparation or the prepared data's hash are listed as excluded with the
reason, and :func:`require_comparable` raises when asked to compare two such variants directly.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from optlab.errors import OptlabError
from optlab.outputs import atomic_file

# What compare reads from every run; these are the paths dvc.yaml gives the train and evaluate
# stages (git-tracked, cache: false, so every experiment's commit holds them).
PARAMS_FILE = "params.yaml"
TEST_METRICS = "metrics/test.json"
TRAIN_METRICS = "metrics/train/metrics.json"
VAL_CURVE = "metrics/train/plots/metrics/val/accuracy.tsv"
DATA_DEP = "data/prepared"

SEED_KEY = "seed"
METRICS = {"accuracy": "test accuracy", "loss": "test loss", "f1_macro": "macro F1"}
# A different dataset, epoch budget or data split asks another question: never pooled or tested.
CONTEXT_KEYS = ("dataset", "train.epochs")
CONTEXT_PREFIXES = ("prepare.",)
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
# Two seeds give a variance estimate with one degree of freedom: a t-test on it says almost nothing.
MIN_SEEDS_FOR_TEST = 3
THRESHOLD_FRACTION = 0.95  # of the best variant's best mean validation accuracy


# --- statistics on plain numbers -------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); nan for one value
    ci_low: float  # Student-t interval for the mean; nan for one value
    ci_high: float


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean, sample standard deviation and Student-t confidence interval of ``values``."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """``variant - baseline`` and Welch's test of it; ``tested`` is False below MIN_SEEDS_FOR_TEST."""

    diff: float
    tested: bool
    reason: str = ""  # why no test was made
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_value: float = math.nan
    df: float = math.nan


def welch(variant: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Welch's unequal-variance t-test of ``mean(variant) - mean(baseline)``, with its CI.

    Welch rather than Student's pooled test: a few seeds per variant say little about whether
    two variants have the same variance (an optimizer or a learning rate often changes it), and
    Welch loses almost nothing when the variances are equal. With fewer than
    ``MIN_SEEDS_FOR_TEST`` seeds on either side no test is made.
    """
    diff = sum(variant) / len(variant) - sum(baseline) / len(baseline)
    if min(len(variant), len(baseline)) < MIN_SEEDS_FOR_TEST:
        return Difference(diff, tested=False, reason="not enough seeds")
    if max(variant) == min(variant) and max(baseline) == min(baseline):
        # No seed noise at all: the t statistic is undefined. Usually the seed never reached
        # the training, so say so rather than invent a p-value.
        return Difference(diff, tested=False, reason="no seed variation: check that `seed` reaches the training")
    result = stats.ttest_ind(variant, baseline, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Difference(diff, True, "", float(ci.low), float(ci.high), float(result.pvalue), float(result.df))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: controls the chance of any false 'larger than noise' verdict
    among several variants tested against one baseline. NaNs (untested) pass through."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (len(indexed) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(d: Difference, p_holm: float = math.nan, alpha: float = ALPHA) -> str:
    if not d.tested:
        return d.reason
    if d.p_value >= alpha:
        return "within seed noise"
    direction = "better" if d.diff > 0 else "worse"
    if not math.isnan(p_holm) and p_holm >= alpha:
        return f"{direction}, larger than seed noise (not after Holm correction)"
    return f"{direction}, larger than seed noise"


def time_to_reach(curve: Sequence[float], seconds_per_epoch: float, threshold: float) -> float | None:
    """Seconds until the per-epoch ``curve`` (epoch 1 first) first reaches ``threshold``."""
    for epoch, value in enumerate(curve, start=1):
        if value >= threshold:
            return epoch * seconds_per_epoch
    return None


def mean_curve(curves: Sequence[Sequence[float]]) -> pd.DataFrame:
    """Per-epoch mean and standard deviation over seeds (epoch 1 first). An epoch's mean uses
    the seeds that ran it, so early-stopped seeds shorten nothing."""
    frame = pd.DataFrame({i: pd.Series(c, dtype=float) for i, c in enumerate(curves)})
    out = pd.DataFrame({"mean": frame.mean(axis=1), "std": frame.std(axis=1), "n": frame.count(axis=1)})
    out.index = out.index + 1
    out.index.name = "epoch"
    return out


# --- runs and variants -----------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One committed result: a commit or an experiment, read from its git revision."""

    rev: str
    name: str
    params: dict[str, Any]  # params.yaml, flattened to dotted keys
    metrics: dict[str, float]  # the METRICS read from TEST_METRICS
    trainable_params: float | None = None
    seconds_per_epoch: float | None = None
    data_hash: str | None = None  # DATA_DEP's hash in dvc.lock
    code_hash: str = ""  # the source files the stages depend on, so code changes never pool
    val_curve: tuple[float, ...] = ()

    @property
    def seed(self) -> Any:
        return self.params.get(SEED_KEY)


@dataclass
class Group:
    """Runs that differ only by seed: one variant."""

    runs: list[Run]
    label: str = ""
    # Runs that repeat a seed already in ``runs`` (e.g. HEAD and the experiment it was committed
    # from): the same seed is not an independent sample, so it is counted once.
    repeats: list[Run] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.runs[0].params.items() if k != SEED_KEY}

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]

    def summary(self, metric: str) -> Summary:
        return summarize(self.values(metric))

    def context(self) -> dict[str, Any]:
        ctx = {k: v for k, v in self.params.items() if k in CONTEXT_KEYS or k.startswith(CONTEXT_PREFIXES)}
        ctx["data hash"] = self.runs[0].data_hash
        return ctx


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _group_key(run: Run) -> str:
    params = {k: v for k, v in run.params.items() if k != SEED_KEY}
    return json.dumps([params, run.data_hash, run.code_hash], sort_keys=True, default=str)


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Group runs whose params (all but ``seed``), data and code are the same, in first-seen order."""
    groups: dict[str, Group] = {}
    for run in runs:
        group = groups.setdefault(_group_key(run), Group([]))
        same_seed = any(r.seed == run.seed for r in group.runs)
        (group.repeats if same_seed else group.runs).append(run)
    return list(groups.values())


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
    """Name a variant by what it changes relative to the baseline."""
    if group is baseline:
        return "baseline"
    a, b = group.params, baseline.params
    changed = [f"{k}={_fmt(a.get(k))}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if group.runs[0].code_hash != baseline.runs[0].code_hash:
        changed.append("code changed")
    return ", ".join(changed) or "same params"


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# --- reading runs from DVC and git -----------------------------------------------------------
def exp_show(repo: Path, all_commits: bool = False) -> list[dict[str, Any]]:
    """The same records as ``dvc exp show --json`` (queued, failed and workspace rows hidden)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc_repo:
            states = dvc_repo.experiments.show(
                all_commits=all_commits, hide_queued=True, hide_failed=True, hide_workspace=True
            )
            return [state.dumpd() for state in states]
    except DvcException as exc:
        raise OptlabError(f"cannot read experiments in {repo}: {exc}") from exc


def iter_states(records: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every commit and experiment state in ``dvc exp show --json`` records (DVC 3 layout:
    baselines, each with ``experiments``: ranges of ``revs``)."""
    for baseline in records:
        yield baseline
        for exp_range in baseline.get("experiments") or []:
            yield from exp_range.get("revs") or []


class UnusableRun(ValueError):
    """A run without what a comparison needs; the message says what is missing."""


def run_from_state(state: dict[str, Any], curve: Sequence[float] = ()) -> Run:
    """Build a :class:`Run` from one ``dvc exp show --json`` state."""
    data = state.get("data") or {}
    if state.get("error"):
        raise UnusableRun(state["error"].get("msg", "DVC could not read it"))
    params = (data.get("params") or {}).get(PARAMS_FILE, {}).get("data")
    if not params:
        raise UnusableRun(f"no {PARAMS_FILE}")
    test = (data.get("metrics") or {}).get(TEST_METRICS, {}).get("data") or {}
    metrics = {m: float(test[m]) for m in METRICS if _is_number(test.get(m))}
    if "accuracy" not in metrics:
        raise UnusableRun(f"no accuracy in {TEST_METRICS}")
    train = (data.get("metrics") or {}).get(TRAIN_METRICS, {}).get("data") or {}
    deps = data.get("deps") or {}
    produced = set(data.get("outs") or {}) | set(data.get("metrics") or {})
    # Code is what no stage produces; a dep at or under an output (plot reads the history
    # inside train's dvclive directory) is a result, and differs on every run.
    code = sorted((p, d.get("hash")) for p, d in deps.items() if not _under_any(p, produced) and p != DATA_DEP)
    return Run(
        rev=state["rev"],
        name=state.get("name") or state["rev"][:7],
        params=flatten(params),
        metrics=metrics,
        trainable_params=_number_or_none(train.get("trainable_params")),
        seconds_per_epoch=_number_or_none(train.get("seconds_per_epoch")),
        data_hash=(deps.get(DATA_DEP) or {}).get("hash"),
        code_hash=json.dumps(code),
        val_curve=tuple(curve),
    )


def _under_any(path: str, roots: set[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_or_none(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def read_curve(repo: Path, rev: str, path: str = VAL_CURVE) -> list[float]:
    """The per-epoch validation accuracy that dvclive wrote, as committed in ``rev``."""
    shown = subprocess.run(
        ["git", "show", f"{rev}:./{path}"], cwd=repo, capture_output=True, text=True, check=False
    )
    if shown.returncode != 0:
        return []
    table = pd.read_csv(io.StringIO(shown.stdout), sep="\t")
    value_cols = [c for c in table.columns if c not in ("step", "timestamp")]
    if "step" not in table.columns or not value_cols:
        return []
    return table.sort_values("step")[value_cols[-1]].astype(float).tolist()


def load_runs(repo: Path, all_commits: bool = False) -> tuple[list[Run], list[str]]:
    """Every committed run with test metrics, and a note for each run that was skipped."""
    runs: list[Run] = []
    notes: list[str] = []
    seen: set[str] = set()
    for state in iter_states(exp_show(repo, all_commits)):
        rev = state.get("rev", "")
        if rev in seen or rev == "workspace":
            continue
        seen.add(rev)
        try:
            runs.append(run_from_state(state, read_curve(repo, rev)))
        except UnusableRun as exc:
            notes.append(f"`{state.get('name') or rev[:7]}` skipped: {exc}")
    return runs, notes


def resolve_rev(repo: Path, rev: str) -> str | None:
    out = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=repo, capture_output=True, text=True, check=False,
    )
    return out.stdout.strip() or None


def find_baseline(groups: list[Group], repo: Path, baseline: str | None) -> Group:
    """The group holding ``baseline`` (an experiment name, a commit or a branch); HEAD's by default."""
    wanted = baseline or "HEAD"
    sha = resolve_rev(repo, wanted)
    for group in groups:
        for run in group.runs + group.repeats:
            if run.name == wanted or run.rev == sha or (len(wanted) >= 7 and run.rev.startswith(wanted)):
                return group
    names = ", ".join(sorted({r.name for g in groups for r in g.runs}))
    if baseline is None:
        raise OptlabError(
            f"HEAD has no committed {TEST_METRICS}: commit a `dvc repro` result, or pass --baseline "
            f"with one of: {names}"
        )
    raise OptlabError(f"no run with test metrics matches --baseline {baseline!r}; runs: {names}")


# --- the report ------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Everything the report shows, computed once."""

    baseline: Group
    ranked: list[Group]  # comparable variants, best mean test accuracy first (baseline included)
    differences: dict[int, tuple[Difference, float]] = field(default_factory=dict)  # id(group) -> (d, p_holm)
    excluded: list[tuple[Group, list[str]]] = field(default_factory=list)
    threshold: float = math.nan
    times: dict[int, list[float | None]] = field(default_factory=dict)  # id(group) -> seconds per seed


def build_comparison(
    groups: list[Group], baseline: Group, threshold_fraction: float = THRESHOLD_FRACTION
) -> Comparison:
    for group in groups:
        group.label = label_against(group, baseline)
    comparable = [g for g in groups if not incomparable_reasons(g, baseline)]
    excluded = [(g, incomparable_reasons(g, baseline)) for g in groups if g not in comparable]
    ranked = sorted(comparable, key=lambda g: g.summary("accuracy").mean, reverse=True)
    variants = [g for g in ranked if g is not baseline]
    diffs = [welch(g.values("accuracy"), baseline.values("accuracy")) for g in variants]
    adjusted = holm([d.p_value for d in diffs])
    result = Comparison(baseline, ranked, {id(g): (d, p) for g, d, p in zip(variants, diffs, adjusted)}, excluded)

    curves = [[r.val_curve for r in g.runs if r.val_curve] for g in ranked]
    best = [mean_curve(c)["mean"].max() for c in curves if c]
    if best:
        result.threshold = threshold_fraction * max(best)
        for g in ranked:
            result.times[id(g)] = [
                time_to_reach(r.val_curve, r.seconds_per_epoch, result.threshold)
                for r in g.runs
                if r.val_curve and r.seconds_per_epoch is not None
            ]
    return result


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
    base = cmp.baseline
    n_runs = sum(len(g.runs) for g in cmp.ranked)
    out = [
        "# Experiment comparison",
        "",
        f"{n_runs} runs in {len(cmp.ranked)} variants from {source}. A variant is a set of runs that "
        f"differ only by `{SEED_KEY}`. Baseline: `{', '.join(sorted({r.name for r in base.runs}))}`.",
        "",
        "## Ranking by test accuracy",
        "",
        "Mean ± sample standard deviation over seeds, and the 95% Student-t confidence interval of the mean.",
        "",
    ]
    header = ["rank", "variant", "seeds"]
    for title in METRICS.values():
        header += [f"{title} (mean ± sd)", "95% CI"]
    rows = []
    for rank, g in enumerate(cmp.ranked, start=1):
        row = [rank, g.label, len(g.runs)]
        for metric in METRICS:
            values = g.values(metric)
            row += [_pm(summarize(values)), _ci(summarize(values))] if values else ["–", "–"]
        rows.append(row)
    out += _table(header, rows)

    out += ["", "## Against the baseline", ""]
    if cmp.differences:
        rows = []
        for g in cmp.ranked:
            if g is base:
                continue
            d, p_holm = cmp.differences[id(g)]
            rows.append([g.label, f"{d.diff:+.4f}", _ci_diff(d), _p(d.p_value), _p(p_holm), verdict(d, p_holm)])
        out += _table(["variant", "Δ test accuracy", "95% CI of Δ", "p (Welch)", "p (Holm)", "verdict"], rows)
    else:
        out.append("No other comparable variant.")
    out += [
        "",
        f"Δ is the variant's mean test accuracy minus the baseline's. The test is Welch's t-test "
        f"(`scipy.stats.ttest_ind(equal_var=False)`): with a handful of seeds per variant nothing "
        f"says two variants share a variance (an optimizer or learning rate often changes it), "
        f"Welch does not assume they do, and it costs almost nothing when they do. With fewer than "
        f"{MIN_SEEDS_FOR_TEST} seeds on either side no test is made and the verdict says "
        f"\"not enough seeds\". A difference is called larger than seed noise when p < {ALPHA:.2f} "
        f"(its 95% CI excludes 0); p (Holm) corrects for testing several variants against one "
        f"baseline. Seed noise is all this measures: a different data split is not sampled.",
    ]

    if cmp.times:
        out += ["", f"## Time to reach {cmp.threshold:.4f} validation accuracy", ""]
        out.append(
            f"The threshold is {THRESHOLD_FRACTION:.0%} of the best variant's best mean validation "
            "accuracy; time is seconds per epoch × the first epoch at or above it, per seed."
        )
        out.append("")
        rows = []
        for g in cmp.ranked:
            times = cmp.times.get(id(g), [])
            reached = [t for t in times if t is not None]
            seconds = _pm(summarize(reached), 1) if reached else "not reached"
            rows.append([g.label, f"{len(reached)} of {len(times)}", seconds])
        out += _table(["variant", "seeds reaching it", "seconds (mean ± sd)"], rows)

    if figures:
        out += ["", "## Figures", ""]
        out += [f"![{title}]({name})\n" for title, name in figures.items()]

    repeats = [
        f"`{r.name}` repeats seed {_fmt(r.seed)} of variant {g.label}; that seed is counted once."
        for g in cmp.ranked
        for r in g.repeats
    ]
    notes = [*repeats, *notes]
    if cmp.excluded or notes:
        out += ["", "## Not compared", ""]
        for g, reasons in cmp.excluded:
            names = ", ".join(f"`{r.name}`" for r in g.runs)
            out.append(
                f"- {g.label} ({names}): differs from the baseline in more than the studied params "
                f"(this variant vs the baseline: {'; '.join(reasons)}); compare such variants among "
                f"themselves with `--baseline`."
            )
        out += [f"- {note}" for note in notes]

    out += ["", "<details><summary>Every run</summary>", ""]
    rows = [
        [g.label, _fmt(r.seed), f"`{r.name}`", r.rev[:7], *(f"{r.metrics.get(m, math.nan):.4f}" for m in METRICS)]
        for g in cmp.ranked
        for r in g.runs
    ]
    out += _table(["variant", "seed", "run", "rev", *METRICS.values()], rows)
    out += ["", "</details>", ""]
    return "\n".join(out)


def _ci_diff(d: Difference) -> str:
    return "–" if not d.tested else f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]"



# --- figures ---------------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only; CI has no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _figure().close(fig)


def plot_accuracy(cmp: Comparison, path: Path) -> None:
    plt = _figure()
    groups = cmp.ranked[::-1]  # best at the top
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(groups) + 1.5))
    for y, g in enumerate(groups):
        s = g.summary("accuracy")
        err = None if math.isnan(s.ci_low) else [[s.mean - s.ci_low], [s.ci_high - s.mean]]
        ax.errorbar(s.mean, y, xerr=err, fmt="o", capsize=4, color="C1" if g is cmp.baseline else "C0")
        ax.plot(g.values("accuracy"), [y] * len(g.runs), "x", color="0.5", markersize=4)
    ax.set_yticks(range(len(groups)), [g.label for g in groups])
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.set_xlabel("test accuracy (mean and 95% CI over seeds; x: single seeds)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_curves(cmp: Comparison, path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in cmp.ranked:
        curves = [r.val_curve for r in g.runs if r.val_curve]
        if not curves:
            continue
        m = mean_curve(curves)
        line, = ax.plot(m.index, m["mean"], label=f"{g.label} (n={len(curves)})")
        sd = m["std"].fillna(0)  # one seed: no band
        ax.fill_between(m.index, m["mean"] - sd, m["mean"] + sd, color=line.get_color(), alpha=0.2)
    if not math.isnan(cmp.threshold):
        ax.axhline(cmp.threshold, color="0.4", linestyle=":", linewidth=1, label="time-to-reach threshold")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_params(cmp: Comparison, path: Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in cmp.ranked:
        sizes = [r.trainable_params for r in g.runs if r.trainable_params]
        if not sizes:
            continue
        s = g.summary("accuracy")
        err = None if math.isnan(s.ci_low) else [[s.mean - s.ci_low], [s.ci_high - s.mean]]
        ax.errorbar(sizes[0], s.mean, yerr=err, fmt="o", capsize=4)
        ax.annotate(g.label, (sizes[0], s.mean), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (mean and 95% CI)")
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_time(cmp: Comparison, path: Path) -> None:
    plt = _figure()
    groups = cmp.ranked[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(groups) + 1.5))
    for y, g in enumerate(groups):
        times = cmp.times.get(id(g), [])
        reached = [t for t in times if t is not None]
        if reached:
            s = summarize(reached)
            ax.barh(y, s.mean, xerr=None if math.isnan(s.std) else s.std, capsize=4, color="C0", alpha=0.7)
        note = "" if len(reached) == len(times) else f" {len(reached)} of {len(times)} seeds reached it"
        ax.text(0, y, note, va="center", fontsize=8)
    ax.set_yticks(range(len(groups)), [g.label for g in groups])
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.set_xlabel(f"seconds to reach {cmp.threshold:.3f} validation accuracy (mean ± sd over seeds)")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


# --- the command -----------------------------------------------------------------------------
def compare(
    repo: str | Path = ".",
    out: str | Path = "reports/compare.md",
    baseline: str | None = None,
    all_commits: bool = False,
    threshold_fraction: float = THRESHOLD_FRACTION,
) -> Comparison:
    """Read every committed run, write the Markdown report ``out`` and its figures beside it."""
    repo = Path(repo).resolve()
    out = Path(out) if Path(out).is_absolute() else repo / out
    if not 0 < threshold_fraction <= 1:
        raise OptlabError(f"--threshold must be in (0, 1], got {threshold_fraction}")
    runs, notes = load_runs(repo, all_commits)
    if not runs:
        raise OptlabError(
            f"no committed run with {TEST_METRICS} in {repo}: run `dvc repro` and commit, or `dvc exp run`"
            + ("" if all_commits else " (or pass --all-commits)")
        )
    groups = group_runs(runs)
    result = build_comparison(groups, find_baseline(groups, repo, baseline), threshold_fraction)

    # Figures first, the report last: a report never links to a figure that is not there.
    figures = {}
    plots = {
        "Test accuracy by variant": ("accuracy", plot_accuracy),
        "Validation accuracy per epoch": ("curves", plot_curves),
        "Test accuracy against trainable parameters": ("params", plot_params),
        "Time to reach the validation accuracy threshold": ("time", plot_time),
    }
    for title, (suffix, plot) in plots.items():
        if suffix == "time" and not result.times:
            continue
        name = f"{out.stem}-{suffix}.png"
        plot(result, out.parent / name)
        figures[title] = name
    source = f"`{repo.name}` ({'all commits' if all_commits else 'HEAD and its experiments'})"
    with atomic_file(out) as tmp:
        tmp.write_text(render_markdown(result, figures, notes, source))
    return result
