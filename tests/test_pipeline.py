"""The real pipeline, end to end, with real DVC commands, in a private copy of the baseline project
(tests/project.py: this repository on scikit-learn's real 8x8 digits, shrunken, `dvc repro` run
once per test session). Covered: the five stages and their outputs, the no-op rerun, which stages
a param change or a code change reruns, what `dvc exp show` and `dvc plots show` show, and bad
params refused before any work."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from conftest import REPO, TEST_METRIC_KEYS, TRAIN_SUMMARY_KEYS
from project import (
    DIGITS_IMAGES,
    FIGURES,
    SMALL,
    STAGES,
    UP_TO_DATE,
    params_of,
    ran,
    skipped,
)

pytestmark = pytest.mark.slow


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


# --- 3b. a code change reruns only the stages that run that code -------------------------------
def test_a_tool_edit_reruns_no_stage_and_a_training_edit_reruns_train_evaluate_and_plot(project):
    # Each stage depends on the role directories of the package it imports (dvc.yaml).
    with project.scratch():
        tool = project.root / "src/optlab/study/compare.py"
        tool.write_text(tool.read_text() + "\n# an edit to a tool: optlab compare\n")
        assert json.loads(project.dvc("status", "--json")) == {}, "editing a tool reran a stage"
    with project.scratch():
        training = project.root / "src/optlab/training/schedules.py"
        training.write_text(training.read_text() + "\n# an edit to the training code\n")
        changed = json.loads(project.dvc("status", "--json"))
        assert set(changed) == {"train", "evaluate", "plot"}, changed


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
    assert columns <= 44, repo_knobs

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
