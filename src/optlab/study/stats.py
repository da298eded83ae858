"""Statistics for comparing variants over seeds, as small pure functions on lists of numbers.

Each variant's runs differ only by seed: :func:`describe` gives the mean, standard deviation and a
Student-t confidence interval; :func:`welch` tests a variant against the baseline; :func:`holm`
corrects for testing several variants against one baseline. Tested on hand-computed numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from optlab.core.params import improves
from optlab.evaluation.metrics import CONFIDENCE

if TYPE_CHECKING:
    import pandas as pd

ALPHA = 1 - CONFIDENCE
# Two seeds give a variance estimate with one degree of freedom: a t-test on it says almost nothing.
MIN_SEEDS_FOR_TEST = 3


def higher_is_better(metric: str) -> bool:
    return improves(metric) == "max"


# --- tests of differences -------------------------------------------------------------------
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
    test: str = "Welch"  # "Welch" (independent seeds) or "paired" (the same seeds on both sides)


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
    from scipy import stats  # here, not above: every `optlab` command imports this module (0.5 s)

    result = stats.ttest_ind(variant, baseline, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Difference(diff, True, "", float(ci.low), float(ci.high), float(result.pvalue), float(result.df))


def paired(variant: dict[object, float], baseline: dict[object, float], confidence: float = CONFIDENCE) -> Difference:
    """The paired t-test of ``variant - baseline`` over the seeds both ran (seed -> value).

    Where two variants share their seeds, they share each seed's initial weights (for one
    architecture), dropout stream and batch order, so a seed that is lucky for one tends to be
    lucky for the other: the differences seed by seed vary less than either variant does, and
    the test on them sees a smaller true difference than Welch's, with the same seeds."""
    seeds = sorted(set(variant) & set(baseline), key=str)
    diffs = [variant[s] - baseline[s] for s in seeds]
    diff = sum(diffs) / len(diffs) if diffs else math.nan
    if len(seeds) < MIN_SEEDS_FOR_TEST:
        return Difference(diff, tested=False, reason="not enough seeds", test="paired")
    if max(diffs) == min(diffs):
        return Difference(diff, tested=False, reason="no seed variation: check that `seed` reaches the training",
                          test="paired")  # fmt: skip
    from scipy import stats

    result = stats.ttest_rel([variant[s] for s in seeds], [baseline[s] for s in seeds])
    ci = result.confidence_interval(confidence)
    return Difference(diff, True, "", float(ci.low), float(ci.high), float(result.pvalue), float(result.df), "paired")


def seeds_needed(
    diff: float, spread: float, is_paired: bool, power: float = 0.8, alpha: float = ALPHA, most: int = 10_000
) -> int | None:
    """Roughly how many seeds (per variant) a t-test needs to call ``diff`` larger than seed noise
    with probability ``power`` at level ``alpha``, if ``diff`` were the true difference and
    ``spread`` the standard deviation (of the seed-by-seed differences when ``is_paired``, else of
    one seed's result, the two variants' pooled). None: more than ``most``, or no difference."""
    if not (math.isfinite(diff) and math.isfinite(spread)) or diff == 0 or spread <= 0:
        return None
    from scipy import stats

    for n in range(2, most + 1):
        df = n - 1 if is_paired else 2 * n - 2
        ncp = abs(diff) / (spread / math.sqrt(n) if is_paired else spread * math.sqrt(2 / n))
        t = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(t, df, ncp) + stats.nct.cdf(-t, df, ncp) >= power:
            return n
    return None


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


def verdict(d: Difference, p_holm: float = math.nan, alpha: float = ALPHA, higher_better: bool = True) -> str:
    """What the test says of ``d`` (variant - baseline) for a metric that improves upwards
    (``higher_better``) or downwards (a loss)."""
    if not d.tested:
        return d.reason
    if d.p_value >= alpha:
        return "within seed noise"
    direction = "better" if (d.diff > 0) == higher_better else "worse"
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
    import pandas as pd

    frame = pd.DataFrame({i: pd.Series(c, dtype=float) for i, c in enumerate(curves)})
    out = pd.DataFrame({"mean": frame.mean(axis=1), "std": frame.std(axis=1), "n": frame.count(axis=1)})
    out.index = out.index + 1
    out.index.name = "epoch"
    return out
