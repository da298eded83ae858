"""Running a study (``optlab study run``) and reading it back (``optlab study report``).

A trial is found by its params, whatever experiment trained it: each experiment of HEAD is read
as its members (one, the replicas of a variant, or a group's rates), each with its params in full
(the schema's defaults filled in), and a trial is the member whose params are exactly what the
trial's overrides compose to. So a trial run alone, in a group or by a colleague counts, and only
the trials no experiment holds are run: a killed study resumes, a raised budget runs only the new
points. The missing trials of a contender whose space is the learning rate alone train as one
group (one experiment, one compiled program: ``optimizer.learning_rate`` a list), unless their
optimizer gains nothing from one (``NO_GAIN_IN_A_GROUP``); the others one experiment each;
:func:`run` says which it used.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optlab.study import experiments, sweep
from optlab.study.pipeline import Pipeline
from optlab.study.tuning import (
    SELECT_FROM,
    Outcome,
    Study,
    Trial,
    best,
    finals,
    override,
    points,
    trial,
)

RATE = "optimizer.learning_rate"
MEMBER_KEYS = ("seed", RATE)  # what tells a run's members apart
# Optimizers whose step a group does not speed up, so their trials run one experiment each, two
# at a time, instead of one long group on one core. Muon's orthogonalization is a chain of small
# per-member matmuls: on Fashion-MNIST's default MLP (2-core AMD EPYC, 1 thread each) a member
# of a group of 8 took 13.4 s per epoch against 12.2 s alone, and the group kept one worker busy
# 45 minutes while the other idled.
NO_GAIN_IN_A_GROUP = {"muon": "its orthogonalized step gains nothing from a group"}


@dataclass(frozen=True)
class Member:
    """One trained model of an experiment, with its full params and figures."""

    name: str  # the experiment's
    params: dict[str, Any]  # flattened, the schema's defaults filled in, this member's seed and rate
    summary: dict[str, Any]  # its figures: val_accuracy, diverged, ... (replicas.json's entry)
    run: experiments.Run  # its test metrics, validation curve and seconds per epoch


def _key(params: dict[str, Any]) -> str:
    """What identifies a trained model: every param but how many ran beside it."""
    return json.dumps({k: v for k, v in params.items() if k != experiments.REPLICAS_KEY}, sort_keys=True, default=str)


def members(repo: Path) -> dict[str, Member]:
    """Every trained model of HEAD's finished experiments (not one a queue worker still trains),
    by :func:`_key` of its params."""
    pipeline, found = Pipeline.load(repo), {}
    for state in experiments.iter_states(experiments.exp_show(repo), finished=True):
        if not state.get("name") or state.get("error") or state.get("rev") == "workspace":
            continue
        try:
            rev = state["rev"]
            curve, seconds = experiments.read_curve(repo, rev, pipeline), experiments.read_seconds_per_epoch(
                repo, rev, pipeline)  # fmt: skip
            run = experiments.run_from_state(state, pipeline, curve, seconds)
        except experiments.UnusableRun:
            continue
        text = experiments.read_at(repo, state["rev"], f"{pipeline.live_dir}/replicas.json")
        each = json.loads(text) if text else [((state.get("data") or {}).get("metrics") or {}).get(SELECT_FROM, {}).get(
            "data") or {}]  # fmt: skip
        for r, member_run in enumerate(experiments.replica_runs(run, repo, pipeline)):
            m = Member(state["name"], member_run.params, each[r] if r < len(each) else {}, member_run)
            found[_key(m.params)] = m
    return found


@functools.cache
def _composed(repo: Path, overrides: tuple[str, ...]) -> str:
    """The key of the params ``overrides`` compose to, as ``dvc exp run -S`` would."""
    from optlab.core.params import load_variant

    return _key(experiments.with_defaults(experiments.flatten(load_variant(repo, list(overrides)).model_dump())))


def _member_of(repo: Path, found: dict[str, Member], overrides: Sequence[str]) -> Member | None:
    return found.get(_composed(repo, tuple(overrides)))


def rate_only(study: Study, contender: str) -> bool:
    return set(study.spec.contenders[contender].search) == {RATE}


def _no_gain(study: Study, contender: str) -> str:
    """Why a group would not train this contender faster, or ``""``."""
    return NO_GAIN_IN_A_GROUP.get(str(study.spec.contenders[contender].set.get("optimizer", "")), "")


def _trial_of(study: Study, problem: str, contender: str, point: dict[str, float], found, repo: Path) -> Trial:
    m = _member_of(repo, found, trial(study, problem, contender, point))
    value = m.summary.get(study.spec.select) if m else None
    value = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return Trial(contender, point, m.name if m else "", value, bool(m and m.summary.get("diverged")))


def gather(study: Study, repo: str | Path) -> list[Outcome]:
    """What the study's runs gave, per problem: each trial's selection metric (None: no experiment
    holds it, or it gave none), each contender's chosen trial and its final runs, one per seed."""
    repo = Path(repo).resolve()
    found, outcomes = members(repo), []
    for problem in study.spec.problems:
        out = Outcome(problem)
        for contender in study.spec.contenders:
            out.trials[contender] = [_trial_of(study, problem, contender, p, found, repo)
                                     for p in points(study, problem, contender)]  # fmt: skip
            chosen = best(out.trials[contender], study.spec.select)
            if chosen is None:
                continue
            out.chosen[contender] = chosen
            runs = []
            for overrides in finals(study, problem, contender, chosen.point):
                seeds = _final_seeds(overrides)
                for seed in seeds:
                    single = [o for o in overrides if not o.startswith(("seed=", "++train.replicas="))]
                    m = _member_of(repo, found, [*single, override("seed", seed)])
                    runs += [m.run] if m else []
            out.final_runs[contender] = runs
        outcomes.append(out)
    return outcomes


def _final_seeds(overrides: Sequence[str]) -> list[int]:
    seed = int(next(o.split("=", 1)[1] for o in overrides if o.startswith("seed=")))
    replicas = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("++train.replicas=")), 1)
    return list(range(seed, seed + replicas))


def phase_one(study: Study, repo: Path, groups: bool) -> tuple[list[list[str]], list[str]]:
    """The experiments that would train the trials no experiment holds yet, and a line per
    contender saying how (a group, or one experiment per trial)."""
    found, runs, said = members(repo), [], []
    for problem in study.spec.problems:
        for contender in study.spec.contenders:
            missing = [p for p in points(study, problem, contender)
                       if _member_of(repo, found, trial(study, problem, contender, p)) is None]  # fmt: skip
            budget = study.spec.budget
            # Why these trials do not train as a group, when groups are asked for ("" for none).
            why = "" if not groups else "its space is more than the learning rate" if not rate_only(
                study, contender) else _no_gain(study, contender) if len(missing) > 1 else ""  # fmt: skip
            if not missing:
                said.append(f"{contender} on {problem}: all {budget} trials already run")
            elif groups and not why and len(missing) > 1:
                rates = [p[RATE] for p in missing]
                base = [o for o in trial(study, problem, contender, missing[0]) if not o.startswith(f"++{RATE}=")]
                runs.append([*base, override(RATE, rates)])
                said.append(f"{contender} on {problem}: {len(missing)} of {budget} trials as one group "
                            f"(one experiment: {len(missing)} rates in one program)")  # fmt: skip
            else:
                runs += [trial(study, problem, contender, p) for p in missing]
                how = "one experiment each" + (f" ({why}: no group)" if why else "")
                said.append(f"{contender} on {problem}: {len(missing)} of {budget} trials, {how}")
    return runs, said


def run(study: Study, repo: str | Path, executor: str = "local", jobs: int = 2, groups: bool = True,
        progress: bool = True, **sweep_kw) -> tuple[Any, Any]:  # fmt: skip
    """Phase 1, the trials no experiment holds; phase 2, each contender's best trial on the final
    seeds. Returns the two phases' accounts (optlab.study.sweep.Account, or None: nothing to run)."""
    repo = Path(repo).resolve()
    runs, said = phase_one(study, repo, groups)
    _say(f"study {study.name}, phase 1 (tuning on seed {study.spec.tuning_seed}):\n  " + "\n  ".join(said))
    first = sweep.run_points(repo, runs, executor=executor, jobs=jobs, progress=progress, **sweep_kw) if runs else None
    outcomes = gather(study, repo)
    for out in outcomes:
        for c in study.spec.contenders:
            if c not in out.chosen:
                _say(f"study {study.name}: {c} on {out.problem} has no usable trial (none ran, or all failed or "
                     "diverged): no final runs")  # fmt: skip
    seeds = study.spec.seeds
    finals_todo = [o for out in outcomes for c, t in out.chosen.items() if len(out.final_runs.get(c, [])) < len(seeds)
                   for o in finals(study, out.problem, c, t.point)]  # fmt: skip
    _say(f"study {study.name}, phase 2: {len(finals_todo)} experiments of the chosen trials on seeds {seeds}")
    second = sweep.run_points(repo, finals_todo, executor=executor, jobs=jobs, progress=progress,
                              **sweep_kw) if finals_todo else None  # fmt: skip
    return first, second


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
