"""`dvc exp run -S` variants beside the baseline, in a private copy of the baseline project
(tests/project.py): an optimizer variant (`dvc exp show`, `dvc metrics diff`, `dvc plots diff`),
SGD, Keras's own fit on TensorFlow rerun bit-identically, and a diverged run as a result."""

from __future__ import annotations

import json

import pytest

from project import (
    metrics_of,
    params_of,
    ran,
    ran_experiment,
    ran_or_restored,
    skipped,
)

pytestmark = pytest.mark.slow


# --- 4. an optimizer variant, beside the baseline -------------------------------------------
def test_exp_run_rmsprop_reruns_training_only_and_is_compared_with_the_baseline(project, tmp_path):
    with project.scratch():
        out = project.dvc("exp", "run", "-S", "optimizer=rmsprop")  # exactly as the README says
        name = ran_experiment(out)
        for stage in ("download", "prepare"):
            assert ran(stage) not in out and skipped(stage) in out, out
        for stage in ("train", "evaluate", "plot"):  # (or restored from the run cache another copy filled)
            assert ran_or_restored(stage, out), out

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
