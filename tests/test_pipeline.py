"""The real pipeline, end to end, with real DVC commands, in a temporary copy of this repository.

One module-scoped project runs `dvc repro` once on scikit-learn's real 8x8 digits (offline, 1797
images) with a shrunken config; every test starts from that committed baseline and puts the
workspace back afterwards. Covered: the five stages and their outputs, the no-op rerun, which
stages a param change reruns, `dvc exp run -S` variants beside the baseline (`dvc exp show`,
`dvc metrics diff`, `dvc plots diff`), bad params refused before any work, a queued sweep on two
parallel workers, and recovery after `dvc repro` is killed mid-train.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_METRIC_KEYS, TRAIN_SUMMARY_KEYS, write_experiment, write_params

pytestmark = pytest.mark.slow

STAGES = ("download", "prepare", "train", "evaluate", "plot")
# Small enough for 2 CPU cores, large enough that the MLP really learns digits (> 0.8 test accuracy).
SMALL = {
    "dataset": "digits",
    "seed": 0,
    "optimizer": "adam",
    "schedule": "constant",
    "model.hidden": [64],
    "train.epochs": 3,
    "train.batch_size": 32,
    "train.backend": "jax",
    "train.loop": "compiled",
}
DIGITS_IMAGES = 1797  # scikit-learn's digits: every image lands in exactly one split
FIGURES = {
    "learning_curves.png",
    "learning_rate.png",
    "confusion_matrix.png",
    "per_class_f1.png",
    "confused_images.png",
    "gradients.png",
}
UP_TO_DATE = "Data and pipelines are up to date."
QUEUE_TIMEOUT_S = 900


def ran(stage: str) -> str:
    return f"Running stage '{stage}'"


def skipped(stage: str) -> str:
    return f"Stage '{stage}' didn't change, skipping"


# --- the temporary project ---------------------------------------------------------------
def _dvc_outputs(dvc_yaml: Path) -> list[str]:
    """Every path a stage writes (outs, metrics, plots), as dvc.yaml names them."""
    paths = []
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        for key in ("outs", "metrics", "plots"):
            paths += [e if isinstance(e, str) else next(iter(e)) for e in stage.get(key, [])]
    return paths


def copy_checkout(src: Path, dst: Path) -> None:
    """Copy what a clone would hold: files tracked by git plus untracked, non-ignored ones, minus
    the results of runs made here (dvc.lock and the stages' outputs), so the copy starts fresh."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    outputs = _dvc_outputs(src / "dvc.yaml")
    for rel in filter(None, dict.fromkeys(listed)):
        if rel == "dvc.lock" or any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outputs):
            continue
        if not (src / rel).is_file():
            continue  # deleted in the working tree but not yet in the index
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)


class Project:
    """A git + DVC copy of optlab and the commands the README gives users."""

    first_repro: str  # the output of the fixture's `dvc repro`
    baseline: dict[str, dict]  # the committed baseline's test, train and data metrics

    def __init__(self, root: Path, dvc_bin: str) -> None:
        self.root, self.dvc_bin = root, dvc_bin
        bin_dir = str(Path(sys.executable).parent)  # stage commands call `python`: make it this venv's
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "OPTLAB_THREADS": "1",  # two processes on two cores share them instead of fighting
            # The copy's own package, so its stages run the code its dvc.yaml tracks.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")])),
        }

    def sh(
        self, *cmd: str, check: bool = True, env: dict | None = None, timeout: int = 600, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        # Output goes to a file, not a pipe: `dvc queue start` leaves worker daemons holding its
        # stdout, and reading a pipe to its end would wait for them to finish the whole queue.
        with tempfile.TemporaryFile("w+") as out:
            code = subprocess.run(
                cmd, cwd=cwd or self.root, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
            out.seek(0)
            done = subprocess.CompletedProcess(cmd, code, out.read())
        if check:
            assert done.returncode == 0, f"`{' '.join(cmd)}` exited with {done.returncode}:\n{done.stdout}"
        return done

    def dvc(self, *args: str, **kw) -> str:
        return self.sh(self.dvc_bin, *args, **kw).stdout

    def dvc_run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.sh(self.dvc_bin, *args, check=False, **kw)

    def git(self, *args: str) -> str:
        return self.sh("git", *args).stdout

    def json(self, rel: str) -> dict:
        return json.loads((self.root / rel).read_text())

    def git_json(self, rev: str, rel: str) -> dict:
        return json.loads(self.git("show", f"{rev}:{rel}"))

    def set_params(self, **dotted) -> None:
        raw = yaml.safe_load((self.root / "params.yaml").read_text())
        for key, value in dotted.items():
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value
        write_params(self.root / "params.yaml", raw)

    def reset(self) -> None:
        """Back to the committed baseline: git files, then DVC outputs from the cache.
        (`dvc exp run` leaves params.yaml and the results in the workspace.)"""
        self.git("reset", "-q", "--hard", "HEAD")
        self.dvc("checkout", "-q", "--force")

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Project]:
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    def assert_clean(self) -> None:
        assert UP_TO_DATE in self.dvc("status")
        assert json.loads(self.dvc("status", "--json")) == {}

    # `dvc exp show --json`: a workspace row, then the baseline commit with its experiments.
    def exp_show(self) -> list[dict]:
        return json.loads(self.dvc("exp", "show", "--json"))

    def baseline_state(self) -> dict:
        head = self.git("rev-parse", "HEAD").strip()
        return next(row for row in self.exp_show() if row["rev"] == head)

    def experiments(self) -> dict[str, dict]:
        """name -> {state: the experiment's row, executor: its run record} under the baseline."""
        found = {}
        for exp_range in self.baseline_state().get("experiments") or []:
            for state in exp_range["revs"]:
                found[state["name"]] = {"state": state, "executor": exp_range.get("executor")}
        return found

    def exp_names(self) -> set[str]:
        return set(self.dvc("exp", "list", "--name-only").split())


def params_of(state: dict) -> dict:
    return state["data"]["params"]["params.yaml"]["data"]


def metrics_of(state: dict) -> dict:
    return state["data"]["metrics"]["metrics/test.json"]["data"]


def ran_experiment(output: str) -> str:
    match = re.search(r"Ran experiment\(s\): (\S+)", output)
    assert match, f"no experiment name in `dvc exp run` output:\n{output}"
    return match.group(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory, dvc_bin) -> Project:
    root = tmp_path_factory.mktemp("pipeline") / "optlab"
    copy_checkout(REPO, root)
    p = Project(root, dvc_bin)
    p.git("init", "-q", "-b", "main")
    p.git("config", "user.name", "optlab test")
    p.git("config", "user.email", "test@optlab.invalid")
    if not (root / ".dvc/config").is_file():  # .dvc/ is tracked, so DVC comes initialised
        p.dvc("init", "-q")
    write_experiment(root, **SMALL)  # in conf/, which `dvc exp run` composes into params.yaml
    p.git("add", "-A")
    p.git("commit", "-q", "-m", "optlab on digits, shrunken")

    p.first_repro = p.dvc("repro")
    # What a user commits after a run: dvc.lock (staged by DVC's autostage) and the metrics
    # that DVC leaves to git (cache: false). This commit is every test's baseline.
    p.git("add", "-A")
    p.git("commit", "-q", "-m", "baseline: dvc repro")
    p.baseline = {
        name: p.json(f"metrics/{rel}")
        for name, rel in (("test", "test.json"), ("train", "train/metrics.json"), ("data", "data.json"))
    }
    return p


# --- 1. the whole pipeline -----------------------------------------------------------------
def test_repro_runs_all_five_stages_and_writes_every_output(project):
    out = project.first_repro
    positions = [out.find(ran(s)) for s in STAGES]
    assert all(i >= 0 for i in positions) and positions == sorted(positions), out
    # A line per epoch while the train stage runs, before the evaluate stage starts.
    lines = [out.find(f"epoch {e}/3: loss ") for e in (1, 2, 3)]
    assert positions[2] < lines[0] < lines[1] < lines[2] < positions[3], out

    test = project.json("metrics/test.json")
    assert test["accuracy"] > 0.8, test
    assert set(test) == TEST_METRIC_KEYS, set(test) ^ TEST_METRIC_KEYS
    assert test["top_k_accuracy"] >= test["accuracy"]
    per_class = (project.root / "metrics/per_class.csv").read_text().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support" and [r.split(",")[0] for r in per_class[1:]] == list(
        "0123456789"
    )

    train = project.json("metrics/train/metrics.json")
    assert set(train) == TRAIN_SUMMARY_KEYS, set(train) ^ TRAIN_SUMMARY_KEYS
    assert train["epochs_run"] == 3 and train["best_epoch"] in (1, 2, 3)
    # dvclive's step is the epoch, from 1, as best_epoch counts it.
    steps = [
        r.split("\t")[0]
        for r in (project.root / "metrics/train/plots/metrics/val/accuracy.tsv").read_text().splitlines()
    ]
    assert steps == ["step", "1", "2", "3"], steps
    sizes = [8 * 8, *SMALL["model.hidden"], 10]  # flattened digits -> hidden -> 10 classes
    assert train["trainable_params"] == sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    run = project.json("metrics/train/run.json")
    assert run["params"]["dataset"] == "digits" and run["backend"] == "jax" and run["threads"] == "1"

    pngs = {p.name: p.read_bytes() for p in (project.root / "plots").glob("*.png")}
    assert set(pngs) == FIGURES
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) > 1000 for b in pngs.values())

    counts = project.json("metrics/data.json")
    assert sum(counts[s]["n"] for s in ("train", "val", "test")) == DIGITS_IMAGES
    for split in ("train", "val", "test"):
        assert sum(counts[split]["per_class"].values()) == counts[split]["n"]
    assert counts["test"]["n"] == 360  # the fixed 20 % test split the dataset ships with


# --- 2. nothing to do twice ------------------------------------------------------------------
def test_second_repro_runs_nothing_and_status_is_clean(project):
    out = project.dvc("repro")
    assert UP_TO_DATE in out and "Running stage" not in out, out
    for stage in STAGES:
        assert skipped(stage) in out
    project.assert_clean()
    assert project.git("status", "--porcelain") == "", "a no-op repro changed tracked files"


# --- 3. a param reruns only the stages that read it -----------------------------------------
def test_changing_val_fraction_reruns_prepare_and_downstream_but_not_download(project):
    with project.scratch():
        project.set_params(**{"prepare.val_fraction": 0.2})
        changed = json.loads(project.dvc("status", "--json"))
        assert "prepare" in changed and "download" not in changed, changed

        out = project.dvc("repro")
        assert ran("download") not in out and skipped("download") in out, out
        for stage in ("prepare", "train", "evaluate", "plot"):
            assert ran(stage) in out, out
        counts = project.json("metrics/data.json")
        assert sum(counts[s]["n"] for s in ("train", "val", "test")) == DIGITS_IMAGES
        # A stratified 20 % of the training images, up from 10 %; the test split is untouched.
        n_train_before = DIGITS_IMAGES - counts["test"]["n"]
        assert abs(counts["val"]["n"] - 0.2 * n_train_before) <= 10, counts
        assert counts["test"] == project.baseline["data"]["test"]
        project.assert_clean()


# --- 4. an optimizer variant, beside the baseline -------------------------------------------
def test_exp_run_rmsprop_reruns_training_only_and_is_compared_with_the_baseline(project, tmp_path):
    with project.scratch():
        out = project.dvc("exp", "run", "-S", "optimizer=rmsprop")  # exactly as the README says
        name = ran_experiment(out)
        for stage in ("download", "prepare"):
            assert ran(stage) not in out and skipped(stage) in out, out
        for stage in ("train", "evaluate", "plot"):
            assert ran(stage) in out, out

        # dvc exp show: the experiment beside the baseline, each with its params and metrics.
        base = project.baseline_state()
        assert params_of(base)["optimizer"]["name"] == "adam"
        assert metrics_of(base) == project.baseline["test"]
        exp = project.experiments()[name]["state"]
        # Only the chosen optimizer's knobs, from conf/optimizer/rmsprop.yaml (Hydra composition).
        assert params_of(exp)["optimizer"] == {"name": "rmsprop", "learning_rate": 0.001, "rho": 0.9, "momentum": 0.0}
        assert exp["error"] is None
        exp_test = metrics_of(exp)
        assert exp_test == project.json("metrics/test.json")  # the results are in the workspace
        assert exp_test["loss"] != project.baseline["test"]["loss"]

        # dvc metrics diff (workspace = the experiment, against HEAD = the baseline), as CI runs it.
        plain = project.dvc("metrics", "diff")
        assert "metrics/test.json" in plain and "loss" in plain, plain
        diff = json.loads(project.dvc("metrics", "diff", "--all", "--json"))
        accuracy = diff["metrics/test.json"]["accuracy"]
        assert accuracy["old"] == pytest.approx(project.baseline["test"]["accuracy"])
        assert accuracy["new"] == pytest.approx(exp_test["accuracy"])

        # dvc plots diff renders both runs' curves and confusion matrices into one page, and the
        # figures optlab draws, one image per revision.
        html_dir = tmp_path / "plots-diff"
        project.dvc("plots", "diff", "HEAD", name, "-o", str(html_dir))
        html = (html_dir / "index.html").read_text()
        assert f'"rev": "{name}"' in html and '"rev": "HEAD"' in html
        for chart in ("accuracy", "loss", "learning_rate", "F1_per_class", "confusion_matrix"):  # dvc.yaml's plots
            assert f"vegaEmbed('#{chart}'" in html, chart
        for rev in ("HEAD", name):
            image = f"static/{rev}_plots_learning_curves.png"
            assert f'src="{image}"' in html, html[-3000:]
            assert (html_dir / image).read_bytes().startswith(b"\x89PNG")
        assert (html_dir / "static/HEAD_plots_learning_curves.png").read_bytes() != (
            html_dir / f"static/{name}_plots_learning_curves.png"
        ).read_bytes()


# --- 4b. what DVC shows ----------------------------------------------------------------------
def test_dvc_shows_the_figures_a_person_compares(project, tmp_path):
    # dvc exp show: the test metrics and the training summary as columns, nothing per class, no
    # timings, no image counts; the params in use (the chosen optimizer's and schedule's only).
    head = project.baseline_state()
    metric_files = head["data"]["metrics"]
    assert set(metric_files) == {"metrics/test.json", "metrics/train/metrics.json"}, set(metric_files)
    assert set(metric_files["metrics/test.json"]["data"]) == TEST_METRIC_KEYS
    assert set(metric_files["metrics/train/metrics.json"]["data"]) == TRAIN_SUMMARY_KEYS
    optimizer = params_of(head)["optimizer"]
    assert set(optimizer) == {"name", "learning_rate"}, optimizer  # adam's betas are Keras's defaults
    from optlab.study.experiments import flatten

    # What a fresh clone shows (no experiments of the other tests): DVC's own 5 columns, the 12
    # metrics, the keys of params.yaml and one hash per dependency path, nothing else.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project.root), str(clone)], check=True)
    header = project.dvc("exp", "show", "--csv", cwd=clone).splitlines()[0].split(",")
    stages = yaml.safe_load((project.root / "dvc.yaml").read_text())["stages"]
    deps = {d for stage in stages.values() for d in stage.get("deps", [])}
    own = ["Experiment", "rev", "typ", "Created", "parent"]
    knobs = list(flatten(yaml.safe_load((project.root / "params.yaml").read_text())))
    assert header[:6] == [*own, "accuracy"], header
    assert sorted(header) == sorted(own + [*TEST_METRIC_KEYS, *TRAIN_SUMMARY_KEYS] + knobs + [*deps]), header
    # The repository's own params.yaml in the same pipeline: the columns of `make repro` on a
    # fresh clone (this project's conf/ adds train.backend and train.loop, and has no warm-up).
    repo_knobs = list(flatten(yaml.safe_load((REPO / "params.yaml").read_text())))
    columns = len(own) + len(TEST_METRIC_KEYS) + len(TRAIN_SUMMARY_KEYS) + len(repo_knobs) + len(deps)
    print(f"\n[record] dvc exp show --csv: {len(header)} columns here, {columns} for the repository's params.yaml")
    assert columns <= 40, repo_knobs

    # dvc plots show: training and validation accuracy on one chart, x in epochs from 1.
    shown = json.loads(project.dvc("plots", "show", "--json"))["data"]
    values = shown["accuracy"][0]["content"]["data"]["values"]
    assert {v["filename"] for v in values} == {"train/accuracy.tsv", "val/accuracy.tsv"}, values[:2]
    assert sorted({int(v["step"]) for v in values}) == [1, 2, 3]
    assert {"loss", "learning rate", "F1 per class", "confusion matrix", "plots/learning_curves.png"} <= set(shown)

    # The model as a DVC artifact (Studio's model registry, `dvc artifacts get`).
    from dvc.repo import Repo

    with Repo(str(project.root)) as repo:
        (artifact,) = repo.artifacts.read()["dvc.yaml"].values()
    assert (artifact.path, artifact.type) == ("models/model.keras", "model")


# --- 5. SGD --------------------------------------------------------------------------------
def test_exp_run_sgd_trains_its_own_model(project):
    with project.scratch():
        name = ran_experiment(project.dvc("exp", "run", "-S", "optimizer=sgd"))
        exp = project.experiments()[name]["state"]
        assert params_of(exp)["optimizer"]["name"] == "sgd"
        metrics = metrics_of(exp)
        assert metrics["accuracy"] > 0.5, metrics
        assert metrics["loss"] != project.baseline["test"]["loss"]
        # The train stage really read sgd (not a stale params file or a cached adam model).
        assert project.json("metrics/train/run.json")["params"]["optimizer"]["name"] == "sgd"


# --- 5b. Keras's own fit on TensorFlow, the reference backend -------------------------------
def test_tensorflow_backend_trains_the_pipeline_and_reruns_bit_identically(project):
    tensorflow = ("-S", "train.backend=tensorflow", "-S", "train.loop=keras")
    results = []
    with project.scratch():
        for force in ((), ("--force",)):  # the second run retrains although DVC could restore the first
            out = project.dvc("exp", "run", *force, *tensorflow)
            for stage in ("train", "evaluate", "plot"):
                assert ran(stage) in out, out
            run = project.json("metrics/train/run.json")
            assert (run["backend"], run["loop"]) == ("tensorflow", "keras") and run["versions"]["tensorflow"]
            results.append(
                {
                    "test": project.json("metrics/test.json"),
                    "train": project.json("metrics/train/metrics.json"),
                    "curve": (project.root / "metrics/train/plots/metrics/val/loss.tsv").read_bytes(),
                    "model": (project.root / "models/model.keras").read_bytes(),
                }
            )
    assert results[0]["test"]["accuracy"] > 0.8, results[0]["test"]
    assert results[0]["test"]["loss"] != project.baseline["test"]["loss"]  # not the JAX baseline's numbers
    assert results[0] == results[1], "two TensorFlow runs of the same params and seed differ"


# --- 5c. a diverged run is a result ---------------------------------------------------------
def test_a_diverged_run_is_an_experiment_and_fail_mode_records_nothing(project):
    diverging = ("-S", "optimizer.learning_rate=10", "-S", "schedule=constant")  # explodes in epoch 1
    with project.scratch():
        out = project.dvc("exp", "run", *diverging)
        name = ran_experiment(out)
        assert "warning: training diverged at epoch 1" in out, out
        for stage in ("train", "evaluate", "plot"):
            assert ran(stage) in out, out
        state = project.experiments()[name]["state"]  # dvc exp show lists it beside the baseline
        summary = state["data"]["metrics"]["metrics/train/metrics.json"]["data"]
        assert (summary["diverged"], summary["diverged_epoch"], summary["epochs_run"]) == (1, 1, 1)
        assert metrics_of(state)["accuracy"] < 0.5  # evaluated: the model it ended with
        assert (project.root / "plots/learning_curves.png").stat().st_size > 1000
    before = project.exp_names()
    with project.scratch():
        failed = project.dvc_run("exp", "run", *diverging, "-S", "+train.on_divergence=fail")
        assert failed.returncode != 0 and "diverged at epoch 1" in failed.stdout, failed.stdout
        assert ran("evaluate") not in failed.stdout
    assert project.exp_names() == before, "a failed run left an experiment behind"


# --- 5d. a queued experiment can be watched while it runs ------------------------------------
def test_dvc_exp_show_follows_a_running_queued_experiment(project):
    long_run = ("-S", "train.epochs=400", "-S", "model.hidden=[1024,1024]", "-S", "train.batch_size=8")
    with project.scratch():
        queued = project.dvc("exp", "run", "--queue", *long_run)
        name = re.search(r"Queued experiment '([^']+)'", queued).group(1)
        project.dvc("queue", "start", "-j", "1")
        steps, deadline = [], time.time() + 300
        try:
            while len(set(steps)) < 3 and time.time() < deadline:
                for exp_range in project.baseline_state().get("experiments") or []:
                    for state in exp_range["revs"]:
                        running = (exp_range.get("executor") or {}).get("state") == "running"
                        summary = ((state.get("data") or {}).get("metrics") or {}).get("metrics/train/metrics.json")
                        # dvclive's running summary counts the epochs done in `step` (the final
                        # summary, and the workspace copy it starts from, have none).
                        step = ((summary or {}).get("data") or {}).get("step")
                        if state.get("name") == name and running and step is not None:
                            steps.append(step)
                time.sleep(1)
        finally:
            project.dvc_run("queue", "kill", name)
            project.dvc_run("queue", "stop")  # no idle worker left for the sweep below
            project.dvc_run("queue", "remove", "--all")
            deadline = time.time() + 60
            while "0 active, 0 idle" not in project.dvc_run("queue", "status").stdout and time.time() < deadline:
                time.sleep(1)
        assert len(set(steps)) >= 3 and steps == sorted(steps), f"the running experiment's steps: {steps}"


# --- 5e. seeds inside one experiment --------------------------------------------------------
def test_replicas_give_every_row_its_noise_and_compare_pairs_their_seeds(project, tmp_path):
    from optlab.study import cli

    with project.scratch():
        names = {}
        for variant in ((), ("-S", "optimizer=sgd")):
            out = project.dvc("exp", "run", "-S", "train.replicas=3", *variant)
            assert "(mean of 3 replicas)" in out, out
            names[variant] = ran_experiment(out)
        state = project.experiments()[names[()]]["state"]
        test = metrics_of(state)  # dvc exp show: the mean and its interval, for one experiment
        assert params_of(state)["train"]["replicas"] == 3 and "replicas" not in test  # a param, not a metric
        assert test["accuracy_ci_low"] < test["accuracy"] < test["accuracy_ci_high"]
        _assert_the_workspace_holds_three_replicas(project.root)
        out = tmp_path / "replicas.md"
        assert cli.main(["compare", "--repo", str(project.root), "--baseline", names[()], "--out", str(out)]) == 0
        report = out.read_text()
        ranking = {r[1]: r[2] for r in _report_rows(report, "Ranking by test accuracy")}
        assert ranking["optimizer=sgd"] == "3", ranking  # three replicas are three seeds of the variant
        against = {r[0]: r for r in _report_rows(report, "Against the baseline")}
        assert against["optimizer=sgd"][3] == "paired", against  # both ran seeds 0, 1, 2
        if against["optimizer=sgd"][-1] == "within seed noise":
            assert against["optimizer=sgd"][-2].startswith("≈") or "more than" in against["optimizer=sgd"][-2]


def _assert_the_workspace_holds_three_replicas(root: Path) -> None:
    """What the last `dvc exp run -S train.replicas=3` left: every replica, and their means."""
    import numpy as np
    import pandas as pd

    from optlab.evaluation import metrics
    from optlab.training import record

    live = root / "metrics/train"
    summary, each = json.loads((live / "metrics.json").read_text()), json.loads((live / "replicas.json").read_text())
    assert [e["seed"] for e in each] == [0, 1, 2] and "replicas" not in summary
    assert summary["val_accuracy"] == pytest.approx(np.mean([e["val_accuracy"] for e in each]))
    assert sorted(p.name for p in (root / "models/replicas").iterdir()) == ["0.keras", "1.keras", "2.keras"]
    assert (root / "models/model.keras").read_bytes() == (root / "models/replicas/0.keras").read_bytes()
    curves = record.read_replica_histories(live)
    assert len(curves) == 3  # the curve DVC plots is their mean
    mean = np.mean([c["val_accuracy"] for c in curves], axis=0)
    np.testing.assert_allclose(record.read_history(live)["val_accuracy"], mean)
    test, table = json.loads((root / "metrics/test.json").read_text()), pd.read_csv(root / "metrics/replicas.csv")
    assert list(table["seed"]) == [0, 1, 2]  # the evaluate stage evaluated every replica
    spread = metrics.describe(table["accuracy"])
    assert test["accuracy"] == pytest.approx(spread.mean)
    assert (test["accuracy_sd"], test["accuracy_ci_low"], test["accuracy_ci_high"]) == pytest.approx(
        (spread.std, spread.ci_low, spread.ci_high)
    )


def _report_rows(report: str, section: str) -> list[list[str]]:
    body = report.split(f"## {section}")[1].split("\n## ")[0]
    lines = [line for line in body.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


# --- 6. bad params stop before any work -----------------------------------------------------
def test_bad_params_fail_fast_naming_the_key_and_leave_no_experiment(project):
    before = project.exp_names()
    with project.scratch():
        # DVC itself refuses to set a key that params.yaml does not have, before running anything.
        typo = project.dvc_run("exp", "run", "-S", "model.hiden=[32]")
        assert typo.returncode != 0
        assert "model.hiden" in typo.stdout and "+model.hiden=[32]" in typo.stdout, typo.stdout
        assert "Running stage" not in typo.stdout
        project.reset()

        # Forced in with DVC's `+key=value` append syntax, optlab's validation refuses it and
        # suggests the key that exists, before the train stage builds or trains anything.
        appended = project.dvc_run("exp", "run", "-S", "+model.hiden=[32]")
        assert appended.returncode != 0
        assert "model.hiden: unknown key. Did you mean 'model.hidden'?" in appended.stdout, appended.stdout
        assert "trainable_params=" not in appended.stdout and ran("evaluate") not in appended.stdout
        project.reset()

        # Out of range: the prepare stage refuses it; nothing downstream starts.
        # A knob conf/ leaves to its default, set with `+` as the README says.
        out_of_range = project.dvc_run("exp", "run", "-S", "+prepare.val_fraction=1.5")
        assert out_of_range.returncode != 0
        assert "prepare.val_fraction" in out_of_range.stdout and "(got 1.5)" in out_of_range.stdout, out_of_range.stdout
        assert ran("train") not in out_of_range.stdout
    assert project.exp_names() == before, "a failed run left an experiment behind"
    project.assert_clean()


# --- 7. a queued sweep on two parallel workers ----------------------------------------------
def _queue_table(status: str) -> dict[str, str]:
    """name -> Queued | Running | Success | Failed, from `dvc queue status`."""
    rows = {}
    for line in status.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[-1] in {"Queued", "Running", "Success", "Failed"}:
            rows[cols[1]] = cols[-1]
    return rows


def test_queued_sweep_runs_on_two_workers_without_interference(project):
    with project.scratch():
        # Queued without OPTLAB_THREADS, so a value seen by the stages came from `queue start`.
        queue_env = {k: v for k, v in project.env.items() if k != "OPTLAB_THREADS"}
        queued = project.dvc(
            "exp", "run", "--queue", "-S", "optimizer=adam,sgd", "-S", "seed=range(0,2)", env=queue_env
        )
        combos = [(o, int(s)) for o, s in re.findall(r"'optimizer=(\w+)', 'seed=(\d+)'", queued)]
        names = re.findall(r"Queued experiment '([^']+)' for future execution", queued)
        assert sorted(combos) == [("adam", 0), ("adam", 1), ("sgd", 0), ("sgd", 1)], queued
        assert len(names) == 4
        wanted = dict(zip(names, combos, strict=False))

        project.dvc("queue", "start", "-j", "2")  # with OPTLAB_THREADS=1 in its environment
        most_running, table, seen, deadline = 0, {}, [], time.time() + QUEUE_TIMEOUT_S
        while time.time() < deadline:
            status = project.dvc("queue", "status")
            table = {n: s for n, s in _queue_table(status).items() if n in wanted}
            seen.append(table)
            most_running = max(most_running, sum(s == "Running" for s in table.values()))
            if len(table) == 4 and all(s in {"Success", "Failed"} for s in table.values()) and "0 active" in status:
                break
            time.sleep(2)
        logs = {n: project.dvc_run("queue", "logs", n).stdout for n in wanted}
        failed = {n: logs[n][-3000:] for n, s in table.items() if s != "Success"}
        assert len(table) == 4 and not failed, f"queue: {table}\n{failed}"
        assert most_running == 2, f"the two workers never ran experiments at the same time: {seen}"

        exps = project.experiments()
        runs = {}
        for name, (optimizer, seed) in wanted.items():
            state, executor = exps[name]["state"], exps[name]["executor"]
            assert state["error"] is None and executor["state"] == "success", executor
            assert (params_of(state)["optimizer"]["name"], params_of(state)["seed"]) == (optimizer, seed)
            # What the train stage itself read, from the experiment's commit: each worker trained
            # its own params in its own workspace.
            run = project.git_json(state["rev"], "metrics/train/run.json")
            assert (run["params"]["optimizer"]["name"], run["params"]["seed"]) == (optimizer, seed)
            runs[name] = {"test": metrics_of(state), "run": run, "trained_here": "trainable_params=" in logs[name]}
            if runs[name]["trained_here"]:  # `dvc queue logs` keeps the progress lines
                assert "epoch 3/3: loss " in logs[name], logs[name][-2000:]
            assert runs[name]["test"]["accuracy"] > 0.5

        # Different optimizers and seeds give different models; the baseline's recipe
        # (adam, seed 0) gives the baseline's numbers exactly, even on a worker.
        losses = [r["test"]["loss"] for r in runs.values()]
        assert len(set(losses)) == 4, losses
        adam0 = next(n for n, c in wanted.items() if c == ("adam", 0))
        assert runs[adam0]["test"] == project.baseline["test"]

        # OPTLAB_THREADS set for `dvc queue start` reaches the stage processes of its workers.
        # (Runs that DVC restored from its run cache, or found up to date, trained nowhere: only
        # the logs that show training count. The seed-1 runs are new, so they trained there.)
        trained = [n for n, r in runs.items() if r["trained_here"]]
        assert {n for n, (_, seed) in wanted.items() if seed == 1} <= set(trained), {n: logs[n][-2000:] for n in wanted}
        assert {n: runs[n]["run"]["threads"] for n in trained} == {n: "1" for n in trained}

        # The shared cache is intact: an experiment applies, checks out and matches its record.
        sgd1 = next(n for n, c in wanted.items() if c == ("sgd", 1))
        project.dvc("exp", "apply", sgd1)
        project.assert_clean()
        assert project.json("metrics/test.json") == runs[sgd1]["test"]
        assert project.json("metrics/train/run.json")["params"]["seed"] == 1


# --- 8. a repro killed mid-train ------------------------------------------------------------
def _alive_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in {"Z", "X"}:
            alive.append(int(stat.parent.name))
    return alive


def test_a_repro_killed_mid_train_recovers_with_the_next_repro(project):
    with project.scratch():
        project.set_params(seed=7)  # a run no cache holds, so train really trains
        backups = project.root / ".optlab/backup"
        proc = subprocess.Popen(
            [project.dvc_bin, "repro"],
            cwd=project.root,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            # Kill once the first epoch is backed up: DVC and the train stage, like a closed terminal.
            while time.time() < deadline and proc.poll() is None and not list(backups.glob("[!.]*.npz")):
                time.sleep(0.05)
            assert proc.poll() is None, "repro finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
            killed_out = proc.communicate(timeout=60)[0]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        deadline = time.time() + 30
        while _alive_in_group(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive_in_group(proc.pid), "the killed stage is still running"
        assert proc.returncode == -signal.SIGKILL and ran("train") in killed_out, killed_out

        # The kill left DVC's lock entries behind, and no half-written training outputs.
        rwlock = json.loads((project.root / ".dvc/tmp/rwlock").read_text())
        assert any(e["pid"] == proc.pid for e in rwlock["write"].values()), rwlock
        assert not (project.root / "models/model.keras").exists()
        # dvclive wrote the epochs as they ended: what is left says it is incomplete.
        assert project.json("metrics/train/run.json")["status"] == "running"

        # Recovery is the next `dvc repro`: DVC sees the holder is dead, drops its lock entries,
        # and the train stage resumes from the epoch it had backed up.
        again = project.dvc("repro")
        stale = re.findall(
            rf"Process '[^']*' with \(Pid {proc.pid}\), in RWLock-file '[^']+' had been killed\. "
            r"Auto removed it from the lock file\.",
            again,
        )
        assert stale, again
        assert "resuming from the backup of epoch" in again, again
        for stage in ("train", "evaluate", "plot"):
            assert ran(stage) in again, again
        assert project.json("metrics/train/metrics.json")["epochs_run"] == 3
        assert project.json("metrics/train/run.json")["status"] == "complete"
        timings = project.json("metrics/train/run.json")["timings"]
        assert math.isfinite(timings["seconds_per_epoch"]) and timings["seconds_per_epoch"] > 0, timings
        assert project.json("metrics/test.json")["accuracy"] > 0.8
        assert not list(backups.glob("*")), "the backup is removed once the run completes"
        project.assert_clean()
