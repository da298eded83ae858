"""The CI regression gate: fail when a test metric got worse than the baseline revision's.

It reads ``dvc metrics diff <baseline> --all --json`` (the workspace against ``baseline``).
DVC exits 0 even when it could not load a metric on one side (the value is just ``null``), so
a missing or unreadable value fails the gate here instead of passing silently. The metric is
test accuracy unless ``--metric`` names another number of the evaluate stage's test metrics;
losses and the generalization gap get worse by going up, everything else by going down. A
change may worsen it by ``--max-drop`` (absolute) and, where given, ``--max-relative-drop``
(a fraction of the baseline's value), whichever is smaller.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optlab.core.errors import OptlabError
from optlab.study.pipeline import Pipeline
from optlab.study.stats import higher_is_better
from optlab.training.record import SUMMARY

METRIC_KEY = "accuracy"
MAX_DROP = 0.01  # absolute, in the metric's units: test accuracy 0.870 -> 0.860 still passes
# A drop of exactly --max-drop passes; without this slack 0.87 - 0.86 > 0.01 in floating point.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateResult:
    passed: bool
    old: float | None
    new: float | None
    max_drop: float  # the allowed worsening, absolute (the smaller of the two limits)
    reason: str

    @property
    def change(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def judge(
    diff: dict[str, Any],
    file: str,
    max_drop: float = MAX_DROP,
    key: str = METRIC_KEY,
    max_relative_drop: float | None = None,
) -> GateResult:
    """Judge one metric in ``dvc metrics diff --all --json`` output."""
    if max_drop < 0:
        raise OptlabError(f"--max-drop must be >= 0, got {max_drop}")
    if max_relative_drop is not None and not 0 <= max_relative_drop < 1:
        raise OptlabError(f"--max-relative-drop must be a fraction in [0, 1), got {max_relative_drop}")
    entry = (diff.get(file) or {}).get(key)
    if entry is None:
        known = sorted(diff.get(file) or {})
        hint = f" (the metrics there: {', '.join(known)})" if known else ""
        return GateResult(False, None, None, max_drop, f"`{file}:{key}` is missing on both sides{hint}")
    old, new = _number(entry.get("old")), _number(entry.get("new"))
    missing = " and ".join(side for side, value in (("the baseline", old), ("this change", new)) if value is None)
    if missing:
        return GateResult(False, old, new, max_drop, f"`{file}:{key}` is missing or not a number in {missing}")
    allowed = max_drop if max_relative_drop is None else min(max_drop, max_relative_drop * abs(old))
    up = higher_is_better(key)
    worse = (old - new) if up else (new - old)  # > 0: got worse
    verb = "dropped" if up else "rose"
    if worse > allowed + _TOLERANCE:
        reason = f"{key} {verb} by {worse:.4f}, more than the allowed {allowed:.4f}"
    elif worse > 0:
        reason = f"{key} {verb} by {worse:.4f}, within the allowed {allowed:.4f}"
    else:
        reason = f"{key} did not get worse" if not up else f"{key} did not drop"
    return GateResult(worse <= allowed + _TOLERANCE, old, new, allowed, reason)


def metrics_diff(baseline: str, repo: str | Path = ".") -> dict[str, Any]:
    """``dvc metrics diff <baseline> --all --json`` in ``repo`` (``--all``: unchanged values too,
    which DVC otherwise leaves out, so an unchanged metric would look missing)."""
    cmd = [sys.executable, "-m", "dvc", "metrics", "diff", baseline, "--all", "--json"]
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OptlabError(f"`dvc metrics diff {baseline}` failed: {done.stderr.strip() or done.stdout.strip()}")
    try:
        return json.loads(done.stdout or "{}")
    except json.JSONDecodeError as exc:
        raise OptlabError(f"`dvc metrics diff {baseline}` printed no JSON: {done.stdout[:200]!r}") from exc


def _cell(value: float | None, sign: bool = False) -> str:
    return "missing" if value is None else (f"{value:+.4f}" if sign else f"{value:.4f}")


def summary_markdown(result: GateResult, baseline: str, file: str, key: str = METRIC_KEY) -> str:
    """A short PR comment: the verdict, the numbers and the reason."""
    status = "✅ passed" if result.passed else "❌ failed"
    change = _cell(result.change, sign=True)
    return "\n".join(
        [
            f"### Regression gate {status}",
            "",
            f"| metric | baseline (`{baseline}`) | this change | change | allowed worsening |",
            "|---|---|---|---|---|",
            f"| `{file}:{key}` | {_cell(result.old)} | {_cell(result.new)} | {change} | {result.max_drop:.4f} |",
            "",
            result.reason[0].upper() + result.reason[1:] + ".",
            "",
        ]
    )


def gate(
    baseline: str,
    max_drop: float = MAX_DROP,
    repo: str | Path = ".",
    metric: str = METRIC_KEY,
    max_relative_drop: float | None = None,
) -> tuple[GateResult, str]:
    """Judge the evaluate stage's test ``metric`` (the file dvc.yaml names) against ``baseline``;
    a change whose training diverged fails whatever its metrics."""
    pipeline = Pipeline.load(repo)
    file = pipeline.test_metrics
    diff = metrics_diff(baseline, repo)
    result = judge(diff, file, max_drop, metric, max_relative_drop)
    summary = f"{pipeline.live_dir}/{SUMMARY}"
    diverged = (diff.get(summary) or {}).get("diverged", {}).get("new")
    if isinstance(diverged, (int, float)) and diverged >= 1:  # how many replicas diverged
        reason = f"training diverged in this change (`{summary}`: diverged = {diverged:g}); {result.reason}"
        result = GateResult(False, result.old, result.new, result.max_drop, reason)
    return result, summary_markdown(result, baseline, file, metric)
