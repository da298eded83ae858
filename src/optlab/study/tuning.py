"""``optlab study``: which optimizer (or schedule) is better for this model, each tuned on the same
budget, chosen on validation, re-run on final seeds (the protocol of DeepOBS and AlgoPerf, at
laptop scale, every trial a DVC experiment).

A study is a file of ``conf/study/`` (:class:`StudySpec`): the contenders (an optimizer and a
schedule each, with fixed knobs), the space each is tuned over (the learning rate, log-uniform,
and optionally other knobs), the budget (trials per contender, equal for all), the validation
metric that chooses, the final seeds, a target validation accuracy, and optionally several
problems (dataset x model). :func:`run` runs it in two phases through the sweep executors:

1. each contender's ``budget`` trials, at the first points of a scrambled Halton sequence over its
   space (``scipy.stats.qmc``: a sequence, so a raised budget keeps the earlier points and adds
   only the new ones), on the tuning seed;
2. each contender's best trial by the validation metric, re-run on the final seeds (one
   experiment with ``train.replicas`` when the seeds are consecutive).

Every run is an experiment named by the commit and its params (``optlab.study.sweep``), and a
trial is found by its params in whatever experiment trained it, so a killed study resumes, a
raised budget runs only the new trials, and a colleague's pushed runs are reused. Trials that
differ only in learning rate train as one experiment, a group (``optimizer.learning_rate`` a
list: one member per rate, one compiled program). ``optlab.study.tuning_run`` runs and reads it
back; ``optlab.study.tuning_report`` writes the report.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from optlab.core.errors import OptlabError
from optlab.core.params import improves

STUDY_DIR = "conf/study"  # beside conf/'s groups: a study is a file in the project's config style
SELECT_FROM = "metrics/train/metrics.json"  # where the selection metric is: the train stage's validation summary


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """One knob's search range: log-uniform by default (the learning rate, weight decay)."""

    low: float
    high: float
    log: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"needs low < high, got low {self.low}, high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0 (got {self.low}); write log: false for a linear one")
        return self


class Contender(_Strict):
    """What a contender fixes (``-S`` overrides: ``optimizer: sgd``, ``optimizer.momentum: 0.9``)
    and the knobs it is tuned over, each a range."""

    set: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Range] = Field(min_length=1)


class Problem(_Strict):
    """A dataset x model the contenders are compared on: ``-S`` overrides of the experiment."""

    set: dict[str, Any] = Field(default_factory=dict)


class StudySpec(_Strict):
    contenders: Annotated[dict[str, Contender], Field(min_length=1)]
    budget: Annotated[int, Field(ge=1, le=1024)]  # trials per contender, the same for every one
    select: str = "val_accuracy"  # the validation metric that chooses a contender's best trial
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=3)]  # the final seeds
    tuning_seed: Annotated[int, Field(ge=0)] = 0  # the seed every trial trains with
    target: Annotated[float, Field(gt=0, lt=1)]  # validation accuracy, for time to target
    reference: str | None = None  # the contender the others are tested against (default: the first)
    problems: dict[str, Problem] = Field(default_factory=lambda: {"default": Problem()})
    set: dict[str, Any] = Field(default_factory=dict)  # overrides every run shares (epochs, ...)

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        if not self.select.startswith("val_"):
            raise ValueError(f"select: {self.select!r} is not a validation metric; the test set never chooses "
                             "(use val_accuracy, or val_loss)")  # fmt: skip
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: {self.seeds} repeats a seed")
        if self.reference is not None and self.reference not in self.contenders:
            raise ValueError(f"reference: {self.reference!r} is not a contender ({', '.join(self.contenders)})")
        return self


@dataclass(frozen=True)
class Study:
    name: str
    spec: StudySpec

    @property
    def reference(self) -> str:
        return self.spec.reference or next(iter(self.spec.contenders))


def load(repo: str | Path, name: str) -> Study:
    """The study ``conf/study/<name>.yaml`` of ``repo``, validated; every problem named by key."""
    folder = Path(repo) / STUDY_DIR
    path = folder / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise OptlabError(f"{path}: no such study; the studies in {STUDY_DIR}/: {', '.join(have) or 'none'}")
    try:
        spec = StudySpec.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise OptlabError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        lines = "\n".join(f"  - {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise OptlabError(f"{path} has {exc.error_count()} problem(s):\n{lines}") from None
    return Study(name, spec)


# --- the points and the runs ------------------------------------------------------------------
def points(study: Study, problem: str, contender: str, budget: int | None = None) -> list[dict[str, float]]:
    """The contender's first ``budget`` trial points: a scrambled Halton sequence over its ranges,
    seeded by the study, problem and contender, so the same points on every machine, and a larger
    budget starts with the same ones."""
    from scipy.stats import qmc

    search = study.spec.contenders[contender].search
    n = study.spec.budget if budget is None else budget
    seed = int(hashlib.sha256(json.dumps([study.name, problem, contender]).encode()).hexdigest()[:8], 16)
    unit = qmc.Halton(d=len(search), scramble=True, seed=seed).random(n)
    found = []
    for row in unit:
        point = {}
        for u, (key, r) in zip(row, search.items(), strict=True):
            value = math.exp(math.log(r.low) + u * (math.log(r.high) - math.log(r.low))) if r.log else r.low + u * (
                r.high - r.low)  # fmt: skip
            point[key] = float(f"{value:.4g}")  # four digits: readable names and params, nothing lost
        found.append(point)
    return found


def override(key: str, value: Any) -> str:
    """One ``-S`` override in Hydra's syntax: a group's option as it is, any other key with ``++``
    (set it whether conf/ lists it or leaves it to its default)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list | tuple):
        text = "[" + ",".join(map(str, value)) + "]"
    else:
        text = str(value)
    return f"{key}={text}" if "." not in key else f"++{key}={text}"


def _fixed(study: Study, problem: str, contender: str) -> list[str]:
    spec = study.spec
    fixed = {**spec.set, **spec.problems[problem].set, **spec.contenders[contender].set}
    groups = [override(k, v) for k, v in fixed.items() if "." not in k]  # the option first, then its knobs
    return groups + [override(k, v) for k, v in fixed.items() if "." in k]


def trial(study: Study, problem: str, contender: str, point: dict[str, float]) -> list[str]:
    knobs = [override(k, v) for k, v in point.items()]
    return [*_fixed(study, problem, contender), *knobs, override("seed", study.spec.tuning_seed)]


def finals(study: Study, problem: str, contender: str, point: dict[str, float]) -> list[list[str]]:
    """The runs of the final seeds: one experiment of ``train.replicas`` when they are consecutive
    (replica r trains seed + r), else one per seed."""
    base = [*_fixed(study, problem, contender), *(override(k, v) for k, v in point.items())]
    seeds = sorted(study.spec.seeds)
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return [[*base, override("seed", seeds[0]), override("train.replicas", len(seeds))]]
    return [[*base, override("seed", s)] for s in seeds]


# --- what came back ---------------------------------------------------------------------------
@dataclass
class Trial:
    contender: str
    point: dict[str, float]
    name: str
    selected_by: float | None = None  # the selection metric (None: not run, failed or no value)
    diverged: bool = False


@dataclass
class Outcome:
    """Everything :func:`gather` read of one problem: every trial, the chosen point of each
    contender and its final runs (optlab.study.experiments.Run, one per seed)."""

    problem: str
    trials: dict[str, list[Trial]] = field(default_factory=dict)
    chosen: dict[str, Trial] = field(default_factory=dict)
    final_runs: dict[str, list] = field(default_factory=dict)


def best(trials: Sequence[Trial], select: str) -> Trial | None:
    """The trial with the best selection metric (a diverged trial never wins)."""
    scored = [t for t in trials if t.selected_by is not None and math.isfinite(t.selected_by) and not t.diverged]
    if not scored:
        return None
    return (min if improves(select) == "min" else max)(scored, key=lambda t: t.selected_by)


def expected_best(values: Sequence[float], k: int, higher_better: bool = True) -> float:
    """The expected best of ``k`` trials drawn at random (with replacement) from ``values``: what a
    tuning budget of k buys (Dodge et al. 2019's expected validation performance; Sivaprasad et al.
    2020 measure tunability by it). With v_(1) <= ... <= v_(n): sum_i v_(i) [(i/n)^k - ((i-1)/n)^k]."""
    v = np.sort(np.asarray(values, float)) if higher_better else -np.sort(-np.asarray(values, float))
    n = len(v)
    i = np.arange(1, n + 1)
    return float(np.sum(v * ((i / n) ** k - ((i - 1) / n) ** k)))


def time_to_target(curve: Sequence[float], target: float) -> int | None:
    """The first epoch (from 1) at which the validation accuracy reaches ``target``; None if never."""
    return next((e for e, v in enumerate(curve, start=1) if v >= target), None)


def performance_profile(times: dict[str, dict[str, float]], taus: Sequence[float]) -> dict[str, list[float]]:
    """AlgoPerf's aggregate over problems: for each contender, the share of problems on which its
    time to target is within tau times the best contender's (unreached: infinite), at each tau.
    ``times``: problem -> contender -> seconds."""
    contenders = sorted({c for by in times.values() for c in by})
    profile = {c: [] for c in contenders}
    for tau in taus:
        for c in contenders:
            within = 0
            for by in times.values():
                fastest = min((t for t in by.values() if math.isfinite(t)), default=math.inf)
                within += math.isfinite(by.get(c, math.inf)) and by[c] <= tau * fastest
            profile[c].append(within / max(len(times), 1))
    return profile
