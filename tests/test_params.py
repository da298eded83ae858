"""params.yaml validation: every bad value is refused before any work, with a message that
names the key and says what to write instead; every stage exits 2 on it."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from conftest import REPO, repo_params, run_stage, stage_args, write_params
from optlab.core.params import (
    DATASET_NAMES,
    GROUP_NAMES,
    ParamsError,
    compose,
    load_params,
    load_variant,
    schema,
    validate_params,
)

GROUPS = schema(REPO / "conf").groups
OPTIMIZER_NAMES, SCHEDULE_NAMES = tuple(GROUPS["optimizer"]), tuple(GROUPS["schedule"])


def test_the_repository_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p.dataset == "fashion_mnist" and p.optimizer.name in OPTIMIZER_NAMES and p.schedule.name in SCHEDULE_NAMES
    assert p.optimizer.name == "adam" and p.optimizer.beta_1 == 0.9


def test_params_yaml_is_conf_composed(tmp_path):
    # What `dvc exp run` would write first (DVC's own Hydra composition) is what is committed, so
    # `dvc repro` on a fresh clone runs the experiment conf/ describes.
    composed = compose(REPO, tmp_path / "params.yaml")
    assert composed.read_text() == (REPO / "params.yaml").read_text(), (
        "params.yaml is not what conf/ composes to: run `optlab params` and commit it"
    )


def test_every_group_option_is_a_valid_conf_file():
    # Each file of conf/optimizer/ and conf/schedule/ is one member of the schema's union, by name,
    # and composes into valid params.
    for group, members in GROUPS.items():
        files = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert files == sorted(members), (group, files)
    for name in OPTIMIZER_NAMES:
        assert load_variant(REPO, [f"optimizer={name}"]).optimizer.name == name
    p = load_variant(REPO, ["optimizer=sgd", "optimizer.momentum=0.5", "schedule=step"])
    assert (p.optimizer.name, p.optimizer.momentum, p.schedule.name) == ("sgd", 0.5, "step")


def test_schedule_free_adamw_chooses_the_constant_schedule_as_dvc_exp_run_composes_it():
    # `dvc exp run -S optimizer=schedule_free_adamw`, typed as the README types -S optimizer=rmsprop:
    # its conf file's defaults list overrides the schedule, so params.yaml says constant.
    p = load_variant(REPO, ["optimizer=schedule_free_adamw"])
    assert (p.optimizer.name, p.schedule.name) == ("schedule_free_adamw", "constant")
    assert p.schedule.model_dump() == {"name": "constant"}  # no warmup_epochs left of warmup_cosine
    assert load_variant(REPO, ["schedule=constant", "optimizer=schedule_free_adamw"]).schedule.name == "constant"
    # Only a schedule the user names beside it is refused, in either order.
    for overrides in (
        ["optimizer=schedule_free_adamw", "schedule=cosine"],
        ["schedule=step", "optimizer=schedule_free_adamw"],
    ):
        with pytest.raises(ParamsError, match="schedule: optimizer schedule_free_adamw replaces the learning-rate"):
            load_variant(REPO, overrides)
    # The other optimizers keep the experiment's schedule.
    assert load_variant(REPO, ["optimizer=sgd"]).schedule.name == load_params(REPO / "params.yaml").schedule.name


def test_a_knob_of_another_optimizer_is_refused_by_hydra_and_by_optlab():
    with pytest.raises(ParamsError, match="Could not override 'optimizer.momentum'"):
        load_variant(REPO, ["optimizer.momentum=0.5"])  # adam has no momentum: Hydra refuses it
    with pytest.raises(ParamsError, match="Could not find 'optimizer/adamm'") as err:
        load_variant(REPO, ["optimizer=adamm"])
    assert all(name in str(err.value) for name in OPTIMIZER_NAMES)  # Hydra lists the options
    # params.yaml edited by hand: the name changed, the knobs did not.
    raw = repo_params(**{"optimizer.beta_1": 0.95})
    raw["optimizer"] |= {"name": "sgd", "momentum": 0.9, "nesterov": False}
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    assert "optimizer.beta_1: unknown key" in str(err.value) and "switch with -S optimizer=<name>" in str(err.value)


@pytest.mark.parametrize(
    "override,expected",
    [
        ({"dataset": "cifar"}, ["unknown dataset 'cifar'", *DATASET_NAMES, "Did you mean 'cifar10'?"]),
        ({"optimizer.name": "adamm"}, ["unknown optimizer 'adamm'", *OPTIMIZER_NAMES, "Did you mean 'adam'?"]),
        ({"schedule.name": "cosin"}, ["unknown schedule 'cosin'", "warmup_cosine", "Did you mean 'cosine'?"]),
        ({"model.name": "resnet"}, ["unknown model.name 'resnet'", "mlp, cnn"]),
        ({"model.activation": "sigmoid"}, ["model.activation", "'relu'", "'gelu'"]),
        ({"optimizer.learning_rate": -0.001}, ["optimizer.learning_rate", "greater than 0", "-0.001"]),
        ({"optimizer": "sgd", "optimizer.learning_rate": 0}, ["optimizer.learning_rate", "greater than 0"]),
        ({"schedule": "plateau", "schedule.factor": 1.5}, ["schedule.factor", "less than 1"]),
        ({"model.dropout": 1.0}, ["model.dropout", "less than 1"]),
        ({"model.dropout": -0.1}, ["model.dropout", "greater than or equal to 0"]),
        ({"train.epochs": 0}, ["train.epochs", "greater than or equal to 1"]),
        ({"train.epochs": "ten"}, ["train.epochs", "valid integer", "'ten'"]),
        ({"train.batch_size": 32.5}, ["train.batch_size", "valid integer"]),
        ({"model.hidden": []}, ["model.hidden", "at least 1 item"]),
        ({"model.hidden": [64, 64, 64, 64, 64, 64]}, ["model.hidden", "at most 5 items"]),
        ({"model.hidden": [4096]}, ["model.hidden.0", "less than or equal to 2048"]),
        ({"prepare.val_fraction": 1.5}, ["prepare.val_fraction", "less than 1"]),
        ({"prepare.val_fraction": 0}, ["prepare.val_fraction", "greater than 0"]),
        (
            {"train.backend": "tensorflow", "train.loop": "compiled"},
            ["train.loop 'compiled' runs on the jax backend only", "train.loop: keras"],
        ),
    ],
)
def test_bad_values_are_refused_with_the_key_and_the_fix(override, expected):
    with pytest.raises(ParamsError) as err:
        validate_params(repo_params(**override))
    for fragment in expected:
        assert fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.parametrize(
    "raw_key,suggestion",
    [
        ("optimizr", "'optimizer'"),
        ("model.hiden", "'model.hidden'"),
        ("optimizer.lr", None),
        ("train.epoch", "'train.epochs'"),
    ],
)
def test_unknown_keys_are_refused_with_a_suggestion_and_the_valid_keys(raw_key, suggestion):
    raw = repo_params()
    node = raw
    *parents, leaf = raw_key.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = 1
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    msg = str(err.value)
    assert f"{raw_key}: unknown key." in msg and "Valid keys here:" in msg
    if suggestion:
        assert f"Did you mean {suggestion}?" in msg


def test_every_problem_is_listed_at_once():
    with pytest.raises(ParamsError) as err:
        validate_params(repo_params(**{"train.epochs": 0, "model.dropout": 2, "optimizer.name": "x"}))
    assert "3 problem(s)" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


@pytest.mark.parametrize("stage", ["download", "prepare", "train", "evaluate", "plot"])
def test_every_stage_exits_2_on_a_typo_before_touching_its_inputs(tmp_path, stage):
    raw = repo_params()
    raw["model"]["hiden"] = [32]
    write_params(tmp_path / "params.yaml", raw)
    args = stage_args(stage)  # exactly as dvc.yaml runs it, paths relative to tmp_path
    proc = run_stage(stage, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "model.hiden: unknown key. Did you mean 'model.hidden'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf", "params.yaml"], "nothing else was written"


def _fields(model, prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_value_lives_in_one_place_conf_or_the_schema():
    # A knob conf/ lists has no schema default (a params.yaml that lacks it is refused: never a
    # silent default that runs another experiment); a knob with a schema default is not in conf/
    # (so it is not a `dvc exp show` column until a run sets it with -S +key=value).
    from optlab.core.params import defaulted_knobs
    from optlab.study.experiments import flatten

    for group, members in GROUPS.items():
        for name, option in members.items():
            raw = repo_params(**{group: name})
            listed = {k for k in flatten(raw) if k.startswith(f"{group}.")}
            required = {f"{group}.{k}" for k, f in option.model_fields.items() if f.is_required()}
            assert listed == required, (group, name, listed ^ required)
    raw = repo_params()
    required = {key for key, field in _fields(schema(REPO / "conf").params) if field.is_required()} - set(GROUP_NAMES)
    listed = {k for k in flatten(raw) if k.split(".")[0] not in GROUPS}
    assert listed == required, listed ^ required
    defaults = defaulted_knobs(flatten(raw))
    assert not set(defaults) & set(flatten(raw))
    assert defaults["train.keep_best"] is False and defaults["optimizer.beta_2"] == 0.999
    del raw["train"]["epochs"]
    with pytest.raises(ParamsError, match="train.epochs: Field required"):
        validate_params(raw)
    raw = repo_params(schedule="plateau")
    del raw["schedule"]["min_lr"]
    with pytest.raises(ParamsError, match="schedule.min_lr: Field required"):
        validate_params(raw)


def test_a_knob_left_to_its_default_is_set_with_plus_and_listed_by_optlab_params(tmp_path):
    # Hydra refuses a key conf/ does not list unless it is added with `+`; then it is in params.yaml.
    with pytest.raises(ParamsError, match=r"\+train.keep_best=true"):
        load_variant(REPO, ["train.keep_best=true"])
    p = load_variant(REPO, ["+train.keep_best=true", "+optimizer.beta_2=0.99", "+prepare.scale=zero_one"])
    assert (p.train.keep_best, p.optimizer.beta_2, p.prepare.scale) == (True, 0.99, "zero_one")
    assert (p.train.on_divergence, p.evaluate.top_k) == ("record", 3)  # the others: their defaults
    import shutil
    import subprocess
    import sys

    shutil.copytree(REPO / "conf", tmp_path / "conf")
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", tmp_path / ".dvc" / "config")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    out = subprocess.run([sys.executable, "-m", "optlab.study.cli", "params", "--all", "--repo", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "train.keep_best" in out and "-S +<key>=<value>" in out and "optimizer.beta_1" in out, out
    assert "train.epochs" not in out  # in params.yaml, not left to a default
