"""docs/extending.md's recipes, each performed on a toy: an optimizer (one conf file, or a class
and one registry line), a schedule (a function with its registry line, and a conf file), a
per-epoch metric (one registry line) and a stage (a script, its code, its dvc.yaml entry), in a
copy of the repository's conf/ or of the baseline project."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import REPO, fit_members, repo_params
from optlab.core.params import validate_params
from optlab.training import models, optimizers, record, schedules


@pytest.fixture
def conf(tmp_path) -> Path:
    """A copy of the repository's conf/, to add an option to."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    return tmp_path / "conf"


def _add(conf: Path, group: str, text: str) -> dict:
    import yaml

    knobs = yaml.safe_load(textwrap.dedent(text))
    (conf / group / f"{knobs['name']}.yaml").write_text(textwrap.dedent(text))
    return knobs


def test_an_optimizer_is_one_conf_file(conf, digits):
    knobs = _add(
        conf,
        "optimizer",
        """\
        # FTRL-proximal (McMahan et al. 2013), made for sparse linear models; a toy here.
        name: ftrl
        learning_rate: 0.05
        l1_regularization_strength: 0.0
    """,
    )
    raw = repo_params(**{"dataset": "digits", "train.epochs": 2, "model.hidden": [32], "schedule": "constant"})
    raw["optimizer"] = knobs  # what `dvc exp run -S optimizer=ftrl` composes
    p = validate_params(raw, conf=conf)
    train, val = digits
    (member,) = fit_members(p, train, val)
    assert isinstance(member.model.optimizer, keras.optimizers.Ftrl)
    assert member.model.optimizer.l1_regularization_strength == 0.0
    assert member.history.column("loss")[-1] < member.history.column("loss")[0]


def test_an_optimizer_keras_lacks_is_its_class_and_one_registry_line(conf, digits, monkeypatch):
    class HalvedSGD(keras.optimizers.SGD):
        """SGD at half the rate it is given: a toy optimizer of one's own."""

        def __init__(self, learning_rate=0.01, **kwargs):
            super().__init__(learning_rate=learning_rate * 0.5, **kwargs)

    monkeypatch.setitem(optimizers.OWN, "halved_sgd", HalvedSGD)  # the registry line
    knobs = _add(
        conf,
        "optimizer",
        """\
        name: halved_sgd
        learning_rate: 0.1
        momentum: 0.9
    """,
    )
    raw = repo_params(**{"dataset": "digits", "train.epochs": 1, "model.hidden": [32], "schedule": "constant"})
    raw["optimizer"] = knobs
    p = validate_params(raw, conf=conf)
    train, val = digits
    (member,) = fit_members(p, train, val)
    assert isinstance(member.model.optimizer, HalvedSGD)
    assert member.history.epochs[0]["learning_rate"] == pytest.approx(0.05)


def test_a_schedule_is_a_function_with_its_registry_line_and_a_conf_file(conf, digits, monkeypatch):
    def halving(lr, args, steps_per_epoch, epochs):
        """The rate halves every ``every_epochs`` epochs."""
        boundaries = [args.every_epochs * steps_per_epoch * k - 1 for k in range(1, epochs // args.every_epochs + 1)]
        values = [lr * 0.5**k for k in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)

    monkeypatch.setitem(schedules.SCHEDULES, "halving", halving)  # the function's registry line
    knobs = _add(conf, "schedule", "name: halving\nevery_epochs: 2\n")
    raw = repo_params(**{"dataset": "digits", "train.epochs": 4, "model.hidden": [32], "optimizer": "sgd"})
    raw["schedule"] = knobs
    p = validate_params(raw, conf=conf)
    rate = schedules.build(p, steps_per_epoch=10)
    at = [float(keras.ops.convert_to_numpy(rate(s))) for s in (0, 19, 20, 39, 40)]
    assert at == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.0025])
    train, val = digits
    (member,) = fit_members(p, train, val)
    assert [e["learning_rate"] for e in member.history.epochs] == pytest.approx([0.01, 0.01, 0.005, 0.005])
    with pytest.raises(Exception, match="every_epochs"):  # its knob is validated by name (KNOBS)
        validate_params({**raw, "schedule": {"name": "halving", "every_epochs": 0}}, conf=conf)


@pytest.mark.parametrize("loop", ["compiled", "keras"])
def test_a_per_epoch_metric_is_one_registry_line(digits, tmp_path, monkeypatch, loop, capsys):
    def top_2(y_true, probs):
        return keras.metrics.sparse_top_k_categorical_accuracy(y_true, probs, k=2)

    monkeypatch.setitem(models.EPOCH_METRICS, "top_2", top_2)  # the registry line
    from conftest import prepared_digits
    from optlab.training import run

    p = validate_params(repo_params(**{"dataset": "digits", "train.epochs": 2, "model.hidden": [32],
                                       "train.backend": "jax", "train.loop": loop}))  # fmt: skip
    data = prepared_digits(tmp_path / "prepared")
    run.run(p, data, tmp_path / "m.keras", tmp_path / "live", tmp_path / "backup", tmp_path / "logs")
    history = record.read_history(tmp_path / "live")
    assert {"top_2", "val_top_2"} <= set(history.columns)
    assert (history["val_top_2"] >= history["val_accuracy"]).all() and (history["top_2"] <= 1).all()
    assert "top_2 " in capsys.readouterr().out  # the progress line prints it
    # Both loops compute it from the same function: the compiled engine by summing it.
    train, val = digits
    knobs = {"dataset": "digits", "train.epochs": 1, "model.hidden": [32], "train.loop": loop}
    (member,) = fit_members(validate_params(repo_params(**knobs)), train, val)
    assert 0 < member.history.epochs[0]["val_top_2"] <= 1


@pytest.mark.slow
def test_a_stage_is_a_script_its_code_and_its_dvc_yaml_entry(project):
    with project.scratch():
        root = project.root
        # 1. the script
        (root / "stages/summary.py").write_text(
            textwrap.dedent('''\
            """DVC stage `summary`: the test metrics as a Markdown table."""

            from pathlib import Path

            from optlab.core import stage
            from optlab.core.params import load_params
            from optlab.evaluation import summary


            def main(argv=None) -> None:
                p = stage.parser(__doc__)
                p.add_argument("--metrics", type=Path, required=True, help="test metrics JSON (input)")
                p.add_argument("--out", type=Path, required=True, help="the Markdown table (output)")
                args = p.parse_args(argv)
                load_params(args.params)
                summary.write(args.metrics, args.out)


            if __name__ == "__main__":
                raise SystemExit(stage.run(main))
        ''')
        )
        # 2. its code, in the role directory it belongs to
        (root / "src/optlab/evaluation/summary.py").write_text(
            textwrap.dedent('''\
            """The test metrics as a Markdown table."""

            import json
            from pathlib import Path

            from optlab.core.outputs import atomic_file


            def write(metrics: Path, out: Path) -> None:
                rows = [f"| {k} | {v:.4f} |" for k, v in sorted(json.loads(metrics.read_text()).items())]
                with atomic_file(out) as tmp:
                    tmp.write_text("\\n".join(["| metric | value |", "|---|---|", *rows]) + "\\n")
        ''')
        )
        # 3. its entry in dvc.yaml
        import yaml

        dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
        dvc_yaml["stages"]["summary"] = {
            "cmd": "python stages/summary.py --params params.yaml --metrics metrics/test.json --out metrics/summary.md",
            "deps": ["stages", "src/optlab/core", "src/optlab/evaluation", "metrics/test.json"],
            "outs": [{"metrics/summary.md": {"cache": False}}],
        }
        (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
        # stages/ is every stage's dependency (dvc.yaml says why): a new script there makes them all
        # changed, so this runs the new stage alone; a plain `dvc repro` would rerun the pipeline.
        assert set(json.loads(project.dvc("status", "--json"))) >= {"download", "train", "summary"}
        out = project.dvc("repro", "--single-item", "summary")
        assert "Running stage 'summary'" in out and "Running stage 'train'" not in out, out
        table = (root / "metrics/summary.md").read_text()
        accuracy = json.loads((root / "metrics/test.json").read_text())["accuracy"]
        assert f"| accuracy | {accuracy:.4f} |" in table
        assert "summary" not in json.loads(project.dvc("status", "--json"))
        assert np.isfinite(accuracy)
