"""optlab study: a study file's checks, its points (a sequence: a raised budget keeps the earlier
ones), tunability and the performance profile against their definitions, and a whole study on
digits through DVC (2 contenders x 3 trials x 3 final seeds): every trial an experiment or a
member of one, tracked by DVC; killed during its trials and run again, only the missing trials
run; its budget raised from 3 to 5, exactly 2 new trials per contender run; the report written."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO
from optlab.core.errors import OptlabError
from optlab.study import tuning

LR = "optimizer.learning_rate"
STUDY = {
    "contenders": {
        "adam": {"set": {"optimizer": "adam"}, "search": {LR: {"low": 3e-4, "high": 3e-2}}},
        "sgd": {"set": {"optimizer": "sgd"},  # two knobs: one experiment per trial
                "search": {LR: {"low": 3e-3, "high": 3e-1},
                           "optimizer.momentum": {"low": 0.5, "high": 0.95, "log": False}}},
        "rmsprop": {"set": {"optimizer": "rmsprop"}, "search": {LR: {"low": 1e-4, "high": 1e-2}}},
    },
    "budget": 6,
    "seeds": [1, 2, 3],
    "target": 0.8,
    "set": {"train.epochs": 2},
}  # fmt: skip


def _write(root: Path, name: str, spec: dict) -> None:
    (root / "conf" / "study").mkdir(parents=True, exist_ok=True)
    (root / "conf" / "study" / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def test_a_study_file_is_checked_and_every_problem_named(tmp_path):
    _write(tmp_path, "ok", STUDY)
    study = tuning.load(tmp_path, "ok")
    assert study.reference == "adam" and list(study.spec.problems) == ["default"]
    bad = {**STUDY, "select": "accuracy", "seeds": [1, 1, 2], "budget": 0}
    _write(tmp_path, "bad", bad)
    with pytest.raises(OptlabError) as err:
        tuning.load(tmp_path, "bad")
    assert "budget" in str(err.value) and "conf/study/bad.yaml" in str(err.value)
    _write(tmp_path, "test_set", {**STUDY, "select": "accuracy"})
    with pytest.raises(OptlabError, match="the test set never chooses"):
        tuning.load(tmp_path, "test_set")
    with pytest.raises(OptlabError, match="the studies in conf/study/: bad, ok, test_set"):
        tuning.load(tmp_path, "nope")


def test_the_points_are_a_sequence_a_raised_budget_extends():
    study = tuning.Study("s", tuning.StudySpec.model_validate(STUDY))
    six, eight = tuning.points(study, "default", "sgd"), tuning.points(study, "default", "sgd", budget=8)
    assert eight[:6] == six and len({p["optimizer.learning_rate"] for p in eight}) == 8
    assert all(3e-3 <= p["optimizer.learning_rate"] <= 3e-1 and 0.5 <= p["optimizer.momentum"] <= 0.95 for p in eight)
    # log-uniform: the rates spread over the decades, not bunched at the top
    decades = np.log10([p["optimizer.learning_rate"] for p in tuning.points(study, "default", "adam", budget=64)])
    assert abs(np.mean(decades) - np.log10(3e-3)) < 0.2
    assert tuning.points(study, "default", "adam") != tuning.points(study, "default", "rmsprop")  # own sequences
    assert tuning.trial(study, "default", "sgd", six[0])[:2] == ["optimizer=sgd", "++train.epochs=2"]


def test_expected_best_is_the_mean_best_of_k_draws():
    values = [0.5, 0.9, 0.7, 0.6]
    for k in (1, 2, 3):
        draws = list(itertools.product(values, repeat=k))  # every draw of k, with replacement
        assert tuning.expected_best(values, k) == pytest.approx(np.mean([max(d) for d in draws]))
        assert tuning.expected_best(values, k, higher_better=False) == pytest.approx(np.mean([min(d) for d in draws]))
    assert tuning.expected_best(values, 1) == pytest.approx(np.mean(values))


def test_a_trial_a_queue_worker_still_trains_is_not_yet_held():
    from optlab.study import experiments

    def exp(name, executor):
        return {"revs": [{"rev": name, "name": name}], "executor": executor, "name": name}

    records = [{"rev": "base", "experiments": [exp("done", None), exp("ran", {"state": "success"}),
                                                exp("going", {"state": "running"})]}]  # fmt: skip
    assert [s["rev"] for s in experiments.iter_states(records)] == ["base", "done", "ran", "going"]
    assert [s["rev"] for s in experiments.iter_states(records, finished=True)] == ["base", "done", "ran"]


def test_time_to_target_and_the_performance_profile():
    assert tuning.time_to_target([0.5, 0.79, 0.81, 0.9], 0.8) == 3 and tuning.time_to_target([0.5], 0.8) is None
    times = {"a": {"x": 10.0, "y": 20.0}, "b": {"x": 30.0, "y": math.inf}}
    profile = tuning.performance_profile(times, [1.0, 2.0, 3.0])
    assert profile == {"x": [1.0, 1.0, 1.0], "y": [0.0, 0.5, 0.5]}  # y: twice x's time on a, never reaching b


def test_phase_one_groups_rate_only_contenders_and_runs_the_others_one_by_one(tmp_path, monkeypatch):
    from optlab.study import tuning_run

    _write(tmp_path, "two", STUDY)
    study = tuning.load(tmp_path, "two")
    monkeypatch.setattr(tuning_run, "members", lambda repo: {})  # no experiment holds a trial yet
    runs, said = tuning_run.phase_one(study, REPO, groups=True)  # composed from this checkout's conf/
    group = "6 of 6 trials as one group (one experiment: 6 rates in one program)"
    assert said == [f"adam on default: {group}", f"rmsprop on default: {group}",  # the study file's order
                    "sgd on default: 6 of 6 trials, one experiment each (its space is more than the learning rate: "
                    "no group)"]  # fmt: skip
    sgd = [tuning.trial(study, "default", "sgd", p) for p in tuning.points(study, "default", "sgd")]
    assert len(runs) == 1 + 1 + 6 and runs[2:] == sgd
    grouped = [o for o in runs[0] if o.startswith(f"++{LR}=")]
    assert len(grouped) == 1 and grouped[0].count(",") == 5  # the six rates as one list
    runs, said = tuning_run.phase_one(study, REPO, groups=False)
    assert len(runs) == 18 and all("one experiment each" in line for line in said)
    # Muon gains nothing from a group (measured in NO_GAIN_IN_A_GROUP): its trials run one by one.
    muon = {"set": {"optimizer": "muon"}, "search": {LR: {"low": 3e-4, "high": 3e-2}}}
    _write(tmp_path, "muon", {**STUDY, "contenders": {"muon": muon}})
    runs, said = tuning_run.phase_one(tuning.load(tmp_path, "muon"), REPO, groups=True)
    assert len(runs) == 6 and said == ["muon on default: 6 of 6 trials, one experiment each (its orthogonalized "
                                       "step gains nothing from a group: no group)"]  # fmt: skip


# The study the suite runs through DVC on digits: Adam's rate-only space trains as one group, SGD's
# two knobs one experiment per trial; 3 trials each, then 5 (kept small: each trial is a DVC run).
DIGITS_STUDY = {**STUDY, "contenders": {c: STUDY["contenders"][c] for c in ("adam", "sgd")}, "budget": 3}


@pytest.mark.slow
def test_a_study_on_digits_resumes_after_a_kill_and_a_raised_budget_runs_only_the_new_trials(project):
    from optlab.study import queue, tuning_run

    with project.scratch():
        root = project.root
        _write(root, "small", DIGITS_STUDY)  # read by optlab only, no stage's input: it needs no commit
        before = project.exp_names()
        cmd = [
            sys.executable,
            "-m",
            "optlab.study.cli",
            "study",
            "run",
            "small",
            "-j",
            "2",
            "--repo",
            str(project.root),
        ]
        # Phase 1 queues 4 experiments (Adam's group, SGD's 3 trials) for 2 workers. Ctrl-C as soon
        # as the first trains, the other worker perhaps still starting: each finishes what it took,
        # then stops; at least two stay untrained.
        proc = subprocess.Popen(cmd, cwd=root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
        study = tuning.load(project.root, "small")

        def trained() -> int:  # the trials an experiment of HEAD already holds
            trials = tuning_run.gather(study, root)[0].trials.values()
            return sum(t.selected_by is not None for ts in trials for t in ts)

        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not queue.snapshot(root).busy:
            time.sleep(1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        said = proc.communicate(timeout=120)[0]
        assert "interrupted" in said, said[-3000:]
        deadline = time.time() + 600  # the workers finish the experiments they took
        while time.time() < deadline and queue.snapshot(root).workers:
            time.sleep(2)
        ran, trained = project.exp_names() - before, trained()
        assert 1 <= len(ran) <= 2 and 0 < trained < 6, (ran, trained, said[-3000:])
        again = project.sh(*cmd, timeout=1800).stdout
        assert _missing(again) == 6 - trained, again  # only the trials the kill left untrained
        outcome = tuning_run.gather(study, project.root)[0]
        assert all(t.selected_by is not None for ts in outcome.trials.values() for t in ts)
        assert {c: len(runs) for c, runs in outcome.final_runs.items()} == {"adam": 3, "sgd": 3}
        # Every trial is in dvc exp show: an experiment of its own (sgd's two knobs) or a member of
        # one, its metrics tracked inside it (replicas.json, replicas.csv).
        names = project.exp_names()
        assert all(t.name in names for ts in outcome.trials.values() for t in ts)
        assert len({t.name for t in outcome.trials["sgd"]}) == 3 and len({t.name for t in outcome.trials["adam"]}) <= 2
        report = project.sh(*cmd[:4], "report", "small", "--repo", str(project.root)).stdout
        md = (project.root / "reports/study/small.md").read_text()
        assert "wrote" in report and "| adam |" in md and "### Tunability" in md and "k = 3" in md
        for figure in ("sensitivity", "tunability", "curves"):
            assert (project.root / f"reports/study/small-default-{figure}.png").read_bytes()[:4] == b"\x89PNG"

        # The budget raised from 3 to 5: exactly 2 new trials per contender (Adam's as one group).
        _write(project.root, "small", {**DIGITS_STUDY, "budget": 5})
        raised = project.sh(*cmd, timeout=1800).stdout
        assert raised.count("2 of 5 trials") == 2 and "2 of 5 trials as one group" in raised, raised
        assert _missing(raised) == 4, raised
        outcome = tuning_run.gather(tuning.load(project.root, "small"), project.root)[0]
        assert all(len(ts) == 5 and all(t.selected_by is not None for t in ts) for ts in outcome.trials.values())


def _missing(output: str) -> int:
    """How many trials a study run's phase 1 said it would train (its lines "<n> of <budget> trials")."""
    import re

    return sum(int(n) for n in re.findall(r": (\d+) of \d+ trials", output))


def test_reading_experiments_waits_out_a_queue_task_ending_and_reports_the_rest(monkeypatch):
    import dvc.repo
    from dvc.exceptions import DvcException

    from optlab.study import experiments

    gone = FileNotFoundError(2, "No such file or directory", ".dvc/tmp/exps/run/abc/abc.run")
    raised: list[Exception] = []

    class Queue:  # its celery queue: no task running
        def iter_active(self):
            return iter(())

    class Repo:  # what experiments.exp_show opens: DVC's Repo, whose show() fails as told
        def __init__(self, root):
            self.experiments = self
            self.celery_queue = Queue()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def show(self, **kwargs):
            if raised:
                raise raised.pop(0)
            return []

    monkeypatch.setattr(dvc.repo, "Repo", Repo)
    monkeypatch.setattr(experiments.time, "sleep", lambda s: None)
    # A worker removed a finishing task's .run file before Celery marked the task done: read again.
    raised[:] = [gone, gone, gone]
    assert experiments.exp_show(REPO) == [] and not raised
    # Still missing after SHOW_PATIENCE_S: said, naming the repository.
    monkeypatch.setattr(experiments, "SHOW_PATIENCE_S", 0.0)
    raised[:] = [gone]
    with pytest.raises(OptlabError, match="cannot read experiments in .*abc.run"):
        experiments.exp_show(REPO)
    # Not a queue race: reported at once.
    monkeypatch.setattr(experiments, "SHOW_PATIENCE_S", 30.0)
    raised[:] = [DvcException("bad revision"), gone]
    with pytest.raises(OptlabError, match="bad revision"):
        experiments.exp_show(REPO)
    assert raised == [gone]
