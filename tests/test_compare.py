"""optlab compare: the statistics on hand-computed numbers, the grouping and refusal rules on
constructed runs, and one end-to-end run on a real git + DVC repository whose train stage is a
tiny script that writes the real metric files deterministically from params."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from optlab.core.errors import OptlabError
from optlab.core.params import compose
from optlab.evaluation.metrics import describe
from optlab.study import cli, compare, experiments, stats
from optlab.study.compare import incomparable_reasons
from optlab.study.experiments import Group, Run, group_runs
from optlab.study.pipeline import Pipeline
from optlab.study.stats import welch

# --- a real, fast DVC project ----------------------------------------------------------------
# The stage writes what optlab's train and evaluate stages write: test accuracy is a base per
# optimizer plus a seed-dependent offset, so the expected ranking and verdicts are known.
FAKE_TRAIN = textwrap.dedent(
    """
    import json, math, os, sys, yaml
    live = sys.argv[sys.argv.index("--live") + 1]
    p = yaml.safe_load(open("params.yaml"))
    BASE = {"adam": 0.88, "rmsprop": 0.90, "sgd": 0.80}
    NOISE = [0.01, -0.01, 0.0, 0.005, -0.005]
    opt, epochs, hidden = p["optimizer"], p["train"]["epochs"], p["model"]["hidden"]
    opt = opt["name"] if isinstance(opt, dict) else opt  # an older commit's layout: optimizer: adam
    best = BASE[opt] + NOISE[(p["seed"] + len(opt)) % 5]
    rate = 0.5 if opt == "sgd" else 1.0
    curve = [best - (best - 0.5) * math.exp(-rate * e) for e in range(1, epochs + 1)]
    sizes = [784, *hidden, 10]
    params = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    for split, name, values in [("val", "accuracy", curve), ("val", "loss", [1 - c for c in curve]),
                                ("train", "loss", [0.9 - c for c in curve])]:
        os.makedirs(f"{live}/plots/metrics/{split}", exist_ok=True)
        with open(f"{live}/plots/metrics/{split}/{name}.tsv", "w") as f:
            f.write(f"step\\t{name}\\n" + "".join(f"{i}\\t{v}\\n" for i, v in enumerate(values)))
    spe = 0.5 * (1 + hidden[0] / 64)
    json.dump({"trainable_params": params, "epochs_run": epochs, "best_epoch": epochs,
               "val_accuracy": best, "diverged": 0}, open(f"{live}/metrics.json", "w"))
    json.dump({"timings": {"train_seconds": spe * epochs, "seconds_per_epoch": spe}}, open(f"{live}/run.json", "w"))
    """
)
FAKE_EVALUATE = textwrap.dedent(
    """
    import json, sys
    out = sys.argv[sys.argv.index("--metrics") + 1]
    best = json.load(open("metrics/train/metrics.json"))["val_accuracy"]
    json.dump({"accuracy": best, "loss": 1 - best, "f1_macro": best - 0.01, "top_k_accuracy": 0.99,
               "generalization_gap": 0.02}, open(out, "w"))
    """
)
FAKE_PREPARE = textwrap.dedent(
    """
    import os, sys, yaml
    p = yaml.safe_load(open("params.yaml"))
    os.makedirs(sys.argv[1], exist_ok=True)
    open(os.path.join(sys.argv[1], "x.txt"), "w").write(f"{p['dataset']} {p['prepare']}\\n")
    """
)
# optlab's layout: the tools find the test metrics, the live directory and the prepared data by
# the evaluate and train stages' command-line options.
DVC_YAML = textwrap.dedent(
    """
    stages:
      prepare:
        cmd: python prepare.py data/prepared
        deps: [prepare.py]
        params: [dataset, prepare]
        outs: [data/prepared]
      train:
        cmd: python train.py --data data/prepared --live metrics/train
        deps: [train.py, data/prepared]
        params: [seed, optimizer, model, train]
        outs:
          - metrics/train:
              cache: false
      evaluate:
        cmd: python evaluate.py --metrics metrics/test.json
        deps: [evaluate.py, metrics/train/metrics.json]
        metrics:
          - metrics/test.json:
              cache: false
    metrics:
      - metrics/train/metrics.json
    """
)
# optlab's layout: conf/config.yaml and a config group of optimizers, which `dvc exp run`
# composes into params.yaml (Hydra), so each run starts from conf/ plus its own -S.
CONF = {
    "defaults": [{"optimizer": "adam"}, {"schedule": "constant"}, "_self_"],
    "dataset": "fashion_mnist",
    "seed": 0,
    "prepare": {"val_fraction": 0.1},
    "model": {"hidden": [64]},
    "train": {"epochs": 4},
}
OPTIMIZERS = {
    "adam": {"name": "adam", "learning_rate": 0.001},
    "sgd": {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9},
    "rmsprop": {"name": "rmsprop", "learning_rate": 0.001},
}
SCHEDULES = {"constant": {"name": "constant"}}


def _env() -> dict[str, str]:
    # Stage commands run `python`: make it this interpreter, which has PyYAML.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": path}


def sh(cwd: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def git_init(path: Path) -> None:
    sh(path, "git", "init", "-q", "-b", "main")
    git_identity(path)


def git_identity(path: Path) -> None:
    sh(path, "git", "config", "user.name", "optlab test")
    sh(path, "git", "config", "user.email", "test@optlab.invalid")


def make_project(path: Path, commit: bool = True) -> Path:
    """A git + DVC repo with the fake pipeline reproduced and committed (seed 0, adam)."""
    import yaml

    path.mkdir(parents=True, exist_ok=True)
    if not (path / ".git").exists():
        git_init(path)
    dvc(path, "init", "-q")
    dvc(path, "config", "hydra.enabled", "true")
    (path / "conf/config.yaml").parent.mkdir(parents=True)
    (path / "conf/config.yaml").write_text(yaml.safe_dump(CONF, sort_keys=False))
    for group, options in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        (path / "conf" / group).mkdir()
        for name, knobs in options.items():
            (path / f"conf/{group}/{name}.yaml").write_text(yaml.safe_dump(knobs, sort_keys=False))
    compose(path)
    (path / "prepare.py").write_text(FAKE_PREPARE)
    (path / "train.py").write_text(FAKE_TRAIN)
    (path / "evaluate.py").write_text(FAKE_EVALUATE)
    (path / "dvc.yaml").write_text(DVC_YAML)
    dvc(path, "repro", "-q")
    if commit:
        sh(path, "git", "add", "-A")
        sh(path, "git", "commit", "-q", "-m", "baseline: adam, seed 0")
    return path


def exp_run(repo: Path, name: str, **changes) -> None:
    sets = [a for k, v in changes.items() for a in ("-S", f"{k}={v}")]
    dvc(repo, "exp", "run", "-q", "--name", name, *sets)


# --- statistics on known numbers -------------------------------------------------------------
def test_summary_by_hand():
    s = describe([0.80, 0.82, 0.84])
    assert s.n == 3
    assert s.mean == pytest.approx(0.82)
    assert s.std == pytest.approx(0.02)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, df=2)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.82 - half, 0.82 + half))


def test_summary_of_one_value_has_no_spread():
    s = describe([0.9])
    assert s.mean == 0.9 and math.isnan(s.std) and math.isnan(s.ci_low)


def test_welch_clearly_significant():
    d = welch([0.90, 0.91, 0.92], [0.80, 0.81, 0.82])
    assert d.tested and d.diff == pytest.approx(0.10)
    # equal variances (0.01^2) and sizes: t = 0.1 / sqrt(2 * 0.0001 / 3), df = 4
    assert d.df == pytest.approx(4.0)
    assert d.p_value < 1e-3
    half = 2.7764451051977987 * math.sqrt(2 * 0.0001 / 3)  # t(0.975, df=4)
    assert (d.ci_low, d.ci_high) == pytest.approx((0.10 - half, 0.10 + half))
    assert stats.verdict(d) == "better, larger than seed noise"


def test_welch_clearly_not_significant():
    d = welch([0.80, 0.84, 0.82, 0.83], [0.81, 0.85, 0.80, 0.82])
    assert d.tested and d.p_value > 0.5 and d.ci_low < 0 < d.ci_high
    assert stats.verdict(d) == "within seed noise"


def test_welch_unequal_variances_uses_satterthwaite_df():
    d = welch([0.5, 0.7, 0.9], [0.80, 0.81, 0.82])
    va, vb = 0.04, 0.0001
    df = (va / 3 + vb / 3) ** 2 / ((va / 3) ** 2 / 2 + (vb / 3) ** 2 / 2)
    assert d.df == pytest.approx(df)


def test_welch_needs_three_seeds_each():
    d = welch([0.90, 0.91], [0.80, 0.81, 0.82])
    assert not d.tested and math.isnan(d.p_value)
    assert d.diff == pytest.approx(0.905 - 0.81)
    assert stats.verdict(d) == "not enough seeds"


def test_welch_without_any_seed_noise_says_why():
    d = welch([0.9] * 3, [0.8] * 3)
    assert not d.tested and "seed" in stats.verdict(d)


def test_holm_step_down():
    assert stats.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


def test_time_to_reach_and_mean_curve():
    assert stats.time_to_reach([0.5, 0.7, 0.9], 2.0, 0.7) == 4.0  # epoch 2 x 2 s
    assert stats.time_to_reach([0.5, 0.6], 2.0, 0.7) is None
    m = stats.mean_curve([[0.5, 0.7, 0.9], [0.7, 0.9]])  # the second seed stopped early
    assert m["mean"].tolist() == pytest.approx([0.6, 0.8, 0.9])
    assert m["n"].tolist() == [2, 2, 1] and m.index.tolist() == [1, 2, 3]


# --- grouping and the refusal rule -----------------------------------------------------------
def run(seed=0, acc=0.8, data="d1", code="c1", **params) -> Run:
    p = {"dataset": "fashion_mnist", "seed": seed, "optimizer": "adam", "train.epochs": 4, "prepare.val_fraction": 0.1}
    return Run(
        rev=f"{seed}{params}{data}",
        name=f"r{seed}",
        params={**p, **params},
        metrics={"accuracy": acc},
        data_hash=data,
        code_hash=code,
    )


def test_runs_differing_only_by_seed_group_together():
    groups = group_runs([run(0), run(1), run(2), run(0, optimizer="sgd"), run(1, optimizer="sgd")])
    assert [len(g.runs) for g in groups] == [3, 2]
    assert compare.label_against(groups[1], groups[0]) == "optimizer=sgd"
    assert compare.label_against(groups[0], groups[0]) == "baseline"


def test_a_repeated_seed_is_counted_once():
    (group,) = group_runs([run(0, 0.80), run(1, 0.82), run(0, 0.81)])
    assert group.values("accuracy") == [0.80, 0.82] and len(group.repeats) == 1


def test_code_changes_never_pool_seeds():
    groups = group_runs([run(0), run(1, code="c2")])
    assert len(groups) == 2 and compare.label_against(groups[1], groups[0]) == "code changed"


@pytest.mark.parametrize(
    "other, reason",
    [
        (run(dataset="cifar10"), "dataset"),
        (run(**{"train.epochs": 8}), "train.epochs"),
        (run(**{"prepare.val_fraction": 0.2}, data="d2"), "prepare.val_fraction"),
        (run(data="d2"), "data hash"),
    ],
)
def test_groups_differing_beyond_studied_params_are_refused(other, reason):
    a, b = Group([run()]), Group([other])
    assert any(r.startswith(reason) for r in incomparable_reasons(a, b))
    with pytest.raises(OptlabError, match="differ in more than the studied params"):
        compare.require_comparable(a, b)
    cmp = compare.build_comparison([a, b], a)
    assert cmp.ranked == [a] and cmp.excluded[0][0] is b


def test_build_comparison_ranks_and_tests_against_baseline():
    base = Group([run(s, 0.80 + s / 100) for s in range(3)])
    # Seed by seed 0.100, 0.102, 0.098 above the baseline: a paired test (both ran seeds 0-2).
    better = Group([run(s, v, optimizer="sgd") for s, v in enumerate((0.90, 0.912, 0.918))])
    few = Group([run(s, 0.85, optimizer="nadam") for s in range(2)])
    cmp = compare.build_comparison([base, better, few], base)
    assert cmp.ranked == [better, few, base]
    d, p_holm = cmp.differences[id(better)]
    assert d.test == "paired" and d.diff == pytest.approx(0.10) and p_holm == pytest.approx(d.p_value)  # one test
    assert not cmp.differences[id(few)][0].tested


# --- end to end on a real DVC repository -----------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = make_project(tmp_path_factory.mktemp("compare") / "repo")
    for seed in (1, 2):
        exp_run(repo, f"adam-{seed}", seed=seed)
    for seed in (0, 1, 2):
        exp_run(repo, f"sgd-{seed}", seed=seed, optimizer="sgd")
    for seed in (0, 1):
        exp_run(repo, f"rmsprop-{seed}", seed=seed, optimizer="rmsprop")
    exp_run(repo, "long", **{"train.epochs": 8})
    return repo


def _rows(report: str, section: str) -> list[list[str]]:
    body = report.split(f"## {section}")[1].split("\n## ")[0]
    lines = [line for line in body.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.xdist_group("compare-project")  # shares the module's project
def test_compare_end_to_end(project, capsys):
    assert cli.main(["compare", "--repo", str(project)]) == 0
    report = (project / "reports/compare.md").read_text()

    ranking = _rows(report, "Ranking by test accuracy")
    # rmsprop's mean is the best, but two seeds are too few to say it beats the baseline.
    assert [r[1] for r in ranking] == ["optimizer=rmsprop", "baseline", "optimizer=sgd"]
    assert [r[2] for r in ranking] == ["2", "3", "3"]
    assert ranking[1][3] == f"{(0.875 + 0.89 + 0.87) / 3:.4f} ± {describe([0.875, 0.89, 0.87]).std:.4f}"

    verdicts = {r[0]: r[-1] for r in _rows(report, "Against the baseline")}
    assert verdicts == {
        "optimizer=rmsprop": "not enough seeds",
        "optimizer=sgd": "worse, larger than seed noise",
    }
    assert "train.epochs=8" in report.split("## Not compared")[1] and "train.epochs: 8 vs 4" in report
    for suffix in ("accuracy", "curves", "params", "time"):
        assert f"](compare-{suffix}.png)" in report
        assert (project / f"reports/compare-{suffix}.png").read_bytes()[:4] == b"\x89PNG"
    # sgd learns at half the rate: it reaches the threshold last, or never.
    times = {r[0]: r[2] for r in _rows(report, "Time to reach")}
    assert times["optimizer=sgd"] == "not reached"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.xdist_group("compare-project")  # shares the module's project
def test_compare_against_another_baseline(project, tmp_path):
    out = tmp_path / "vs-sgd.md"
    assert cli.main(["compare", "--repo", str(project), "--baseline", "sgd-1", "--all-commits", "--out", str(out)]) == 0
    verdicts = {r[0]: r[-1] for r in _rows(out.read_text(), "Against the baseline")}
    assert verdicts["optimizer=adam"] == "better, larger than seed noise"
    assert (tmp_path / "vs-sgd-accuracy.png").exists()


@pytest.mark.xdist_group("compare-project")  # shares the module's project
def test_compare_user_errors(project, tmp_path, capsys):
    assert cli.main(["compare", "--repo", str(project), "--baseline", "nope", "--out", str(tmp_path / "x.md")]) == 2
    assert "error: no run with test metrics matches --baseline 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    git_init(empty)
    dvc(empty, "init", "-q")
    assert cli.main(["compare", "--repo", str(empty)]) == 2
    assert "error: " in capsys.readouterr().err


@pytest.mark.xdist_group("compare-project")  # shares the module's project
def test_exp_show_records_carry_params_metrics_and_data_hash(project):
    states = list(experiments.iter_states(experiments.exp_show(project)))
    names = {s["name"] for s in states}
    assert {"adam-1", "sgd-2", "long"} <= names
    sgd = next(s for s in states if s["name"] == "sgd-2")
    assert sgd["data"]["params"]["params.yaml"]["data"]["optimizer"] == {
        "name": "sgd",
        "learning_rate": 0.01,
        "momentum": 0.9,
    }
    assert sgd["data"]["metrics"]["metrics/test.json"]["data"]["accuracy"] == pytest.approx(0.81)
    assert sgd["data"]["deps"]["data/prepared"]["hash"].endswith(".dir")
    assert json.dumps(sgd, default=str)  # the same shape as `dvc exp show --json`


PIPELINE = Pipeline(
    {"train": {"cmd": "python -m optlab.stages.train --data data/prepared --live metrics/train"},
     "evaluate": {"cmd": "python -m optlab.stages.evaluate --metrics metrics/test.json"}},
    Path("dvc.yaml"),
)  # fmt: skip


def _state(seed: int, history_hash: str) -> dict:
    """One `dvc exp show --json` state, shaped like optlab's pipeline: evaluate and plot depend on
    train's dvclive directory, whose hash differs on every run."""
    return {
        "rev": f"rev{seed}",
        "name": f"exp{seed}",
        "data": {
            "params": {"params.yaml": {"data": {"seed": seed, "optimizer": "adam"}}},
            "metrics": {"metrics/test.json": {"data": {"accuracy": 0.9, "loss": 0.3, "f1_macro": 0.9}}},
            "deps": {
                "src/optlab/train.py": {"hash": "code1"},
                "data/prepared": {"hash": "data1"},
                "metrics/train": {"hash": history_hash},
            },
            "outs": {"metrics/train": {"hash": history_hash}, "models/model.keras": {"hash": "m"}},
        },
    }


def test_a_dependency_inside_an_output_is_a_result_not_code():
    runs = [experiments.run_from_state(_state(seed, f"hist{seed}"), PIPELINE) for seed in range(3)]
    assert len({r.code_hash for r in runs}) == 1
    assert "src/optlab/train.py" in runs[0].code_hash and "metrics/train" not in runs[0].code_hash
    assert len(group_runs(runs)) == 1


@pytest.mark.xdist_group("compare-project")  # shares the module's project
def test_the_report_states_the_threshold_it_was_given(project, tmp_path):
    out = tmp_path / "t.md"
    assert cli.main(["compare", "--repo", str(project), "--threshold", "0.9", "--out", str(out)]) == 0
    report = out.read_text()
    assert "The threshold is 90% of the best variant's best mean validation accuracy" in report
    assert "The threshold is 95%" not in report


# --- the params in use ---------------------------------------------------------------------
def test_a_knob_set_to_its_default_is_the_same_variant_as_one_left_out():
    # -S +train.keep_best=false writes the default into params.yaml; leaving it out means the same.
    base = {"optimizer.name": "adam", "optimizer.learning_rate": 0.001, "schedule.name": "constant"}
    flats = [{**base, "seed": 0}, {**base, "seed": 1, "train.keep_best": False, "optimizer.beta_1": 0.9},
             {**base, "seed": 2, "train.keep_best": True}]  # fmt: skip
    runs = [
        experiments.Run(f"r{i}", f"r{i}", experiments.with_defaults(f), {"accuracy": 0.8}) for i, f in enumerate(flats)
    ]
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 1]
    assert groups[1].params["train.keep_best"] is True and groups[0].params["optimizer.beta_2"] == 0.999


# An older commit's layout: the optimizer by name, every option's knobs in blocks of their own.
LEGACY_PARAMS = {
    "optimizer": "adam",
    "schedule": "constant",
    "optim": {"adam": {"learning_rate": 0.001}, "sgd": {"learning_rate": 0.01, "momentum": 0.9}},
    "sched": {"step": {"every_epochs": 5, "factor": 0.5}},
    "dataset": "fashion_mnist",
    "seed": 1,
    "prepare": {"val_fraction": 0.1},
    "model": {"hidden": [64]},
    "train": {"epochs": 4},
}


def test_runs_with_another_params_layout_are_left_out_and_counted(tmp_path):
    import yaml

    today = experiments.flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert experiments.other_layout(today) is None
    assert experiments.other_layout(experiments.flatten(LEGACY_PARAMS)) == "`optimizer: adam`"

    # Commits: today's layout (seed 0), an older layout (seed 1), today's again (HEAD, seed 2).
    repo = make_project(tmp_path / "repo")
    today_params = (repo / "params.yaml").read_text()
    for text, seed in ((yaml.safe_dump(LEGACY_PARAMS), 1), (today_params.replace("seed: 0", "seed: 2"), 2)):
        (repo / "params.yaml").write_text(text)
        dvc(repo, "repro", "-q")
        sh(repo, "git", "commit", "-q", "-am", f"seed {seed}")
    legacy_rev = sh(repo, "git", "rev-parse", "HEAD~1").strip()

    runs, notes = experiments.load_runs(repo, all_commits=True)
    assert sorted(r.seed for r in runs) == [0, 2] and legacy_rev not in {r.rev for r in runs}
    (note,) = notes
    assert note.startswith("1 experiment left out: its params have another layout than this commit's")
    assert f"`{legacy_rev[:7]}` has `optimizer: adam`" in note
    assert cli.main(["compare", "--repo", str(repo), "--all-commits"]) == 0
    report = (repo / "reports/compare.md").read_text()
    assert note in report and "optim.sgd" not in report
    assert [r[1] for r in _rows(report, "Ranking by test accuracy")] == ["baseline"]


def test_a_group_option_is_labelled_by_its_name_and_the_knobs_it_changed():
    base = {"seed": 0, "optimizer.name": "adam", "optimizer.learning_rate": 0.001, "optimizer.beta_1": 0.9}
    sgd_defaults = {"optimizer.name": "sgd", "optimizer.learning_rate": 0.01, "optimizer.momentum": 0.9}
    baseline = Group([Run("b", "b", base, {"accuracy": 0.8})])

    def variant(**knobs):
        params = {"seed": 0, **sgd_defaults, **{f"optimizer.{k}": v for k, v in knobs.items()}}
        return Group([Run("v", "v", params, {"accuracy": 0.8}, choice_defaults=sgd_defaults)])

    assert compare.label_against(variant(), baseline) == "optimizer=sgd"
    assert compare.label_against(variant(momentum=0.5), baseline) == "optimizer=sgd, optimizer.momentum=0.5"
    tuned = Group([Run("t", "t", {**base, "optimizer.learning_rate": 0.01}, {"accuracy": 0.8})])
    assert compare.label_against(tuned, baseline) == "optimizer.learning_rate=0.01"


@pytest.mark.xdist_group("compare-project")  # shares the module's project
def test_compare_by_another_metric_ranks_in_its_direction(project, tmp_path):
    out = tmp_path / "loss.md"
    assert cli.main(["compare", "--repo", str(project), "--metric", "loss", "--out", str(out)]) == 0
    report = out.read_text()
    ranking = _rows(report, "Ranking by test loss")
    assert [r[1] for r in ranking] == ["optimizer=rmsprop", "baseline", "optimizer=sgd"]  # lowest loss first
    verdicts = {r[0]: r[-1] for r in _rows(report, "Against the baseline")}
    assert verdicts["optimizer=sgd"] == "worse, larger than seed noise"  # its loss is higher
    assert "lower is better" in report
    assert cli.main(["compare", "--repo", str(project), "--metric", "nope", "--out", str(tmp_path / "n.md")]) == 2
