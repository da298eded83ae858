"""The optimizer lab: every optimizer trains through both loops and resumes exactly, schedule-free
AdamW evaluates on its averaged weights the way Keras's own update defines them, gradient
clipping acts alike in both loops, and the learning-rate range test suggests rates in the right
range on real Fashion-MNIST."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from conftest import GROUPS, OPTIMIZER_NAMES, REPO, fit_members, prepared_digits, repo_params, write_params
from optlab.core.errors import OptlabError
from optlab.core.params import DEFAULTED, ParamsError, validate_params
from optlab.study import lr_find
from optlab.training import optimizers as optim
from optlab.training.backup import Backup
from optlab.training.callbacks import KeepBest
from optlab.training.engine import Engine
from optlab.training.loop import Member, trainer_for

LOOPS = ("compiled", "keras")


def small(**overrides):
    base = {"dataset": "digits", "train.epochs": 2, "train.batch_size": 64, "model.hidden": [32],
            "schedule": "constant", "train.backend": "jax", "model.dropout": 0.1}  # fmt: skip
    return validate_params(repo_params(**{**base, **overrides}))


def build(p, n_train: int = 64) -> Member:
    return Member.build(p, (64,), 10, -(-n_train // p.train.batch_size))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_trains_through_both_loops_and_resumes_exactly(name, digits, tmp_path):
    train, val = digits
    for loop_name in LOOPS:
        p = small(optimizer=name, **{"train.loop": loop_name})
        straight = build(p, len(train.y))
        backup = Backup(tmp_path / loop_name, "key")
        # The backup the train stage writes, here after epoch 1 only: as if killed then.
        fit_members(p, train, val, [straight], after_epoch=lambda e, b=backup, m=straight: e or b.save([m]))
        history = straight.history
        losses = history.column("loss")
        assert all(math.isfinite(v) for v in losses) and not history.diverged, (name, loop_name, history.epochs)
        assert losses[-1] < losses[0], (name, loop_name, history.epochs)  # it learns
        # Killed after epoch 1, resumed in a new process's objects: the same weights at the end.
        resumed = build(p, len(train.y))
        (restored,) = backup.restore([resumed])
        assert len(restored.epochs) == 1
        resumed.history = restored
        fit_members(p, train, val, [resumed])
        for a, b in zip(straight.model.get_weights(), resumed.model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} on the {loop_name} loop resumed elsewhere")


def test_knobs_conf_leaves_out_are_kerass_own_defaults():
    # conf/optimizer/adam.yaml lists no betas because the schema's defaults are Keras's: checked
    # against each optimizer's signature, so a Keras release that changes one fails here.
    import inspect

    checked = 0
    for name, schema in GROUPS["optimizer"].items():
        signature = inspect.signature(optim.optimizer_class(name))
        for knob, field in schema.model_fields.items():
            if not field.is_required():
                assert signature.parameters[knob].default == field.default, (name, knob)
                checked += 1
    assert checked >= 13  # the betas of adam, adamw, nadam, adamax, lamb, lion, schedule-free
    assert set(DEFAULTED["optimizer"]) <= set(GROUPS["optimizer"])  # no default for an option conf/ lacks
    cosine = inspect.signature(keras.optimizers.schedules.CosineDecay).parameters["alpha"].default
    assert cosine == GROUPS["schedule"]["cosine"].model_fields["alpha"].default == 0.0


def test_every_conf_knob_is_a_keyword_of_its_keras_optimizer():
    # What conf/optimizer/<name>.yaml lists is what the Keras class takes (a knob in epochs as the
    # steps it counts): a typo in a conf file, or a Keras release that renames a knob, fails here.
    for name in OPTIMIZER_NAMES:
        p = small(optimizer=name)
        assert isinstance(optim.build(p, p.optimizer.learning_rate, 10), optim.optimizer_class(name))


def test_an_unknown_optimizer_lists_every_choice_with_a_suggestion():
    with pytest.raises(ParamsError) as err:
        validate_params(repo_params(**{"optimizer.name": "lamp"}))
    message = str(err.value)
    assert "unknown optimizer 'lamp'" in message and "Did you mean 'lamb'?" in message
    assert all(name in message for name in OPTIMIZER_NAMES)


def test_schedule_free_chooses_its_constant_schedule_and_takes_its_own_warm_up():
    # -S optimizer=schedule_free_adamw brings the constant schedule (its conf file's defaults list);
    # a schedule named beside it, or left in a hand-edited params.yaml, is refused.
    assert validate_params(repo_params(optimizer="schedule_free_adamw")).schedule.name == "constant"
    with pytest.raises(ParamsError, match="schedule_free_adamw replaces the learning-rate schedule"):
        validate_params(repo_params(optimizer="schedule_free_adamw", schedule="cosine"))
    raw = repo_params()  # the default warmup_cosine, the optimizer's name edited by hand
    raw["optimizer"] = {
        "name": "schedule_free_adamw",
        "learning_rate": 0.0025,
        "weight_decay": 0.0,
        "warmup_epochs": 1.0,
    }
    with pytest.raises(ParamsError, match="not warmup_cosine; leave -S schedule=... out"):
        validate_params(raw)
    p = small(optimizer="schedule_free_adamw", **{"optimizer.warmup_epochs": 2.0})
    opt = optim.build(p, p.optimizer.learning_rate, steps_per_epoch=20)
    assert isinstance(opt, keras.optimizers.ScheduleFreeAdamW) and opt.warmup_steps == 40


def test_schedule_free_keeps_z_where_optlab_reads_it():
    # optlab.optim.evaluation_weights reads Keras 3.15's private ScheduleFreeAdamW._momentums: one z
    # per trainable variable, its shape, starting equal to the weights (x = y = z at step 0).
    model = build(small(optimizer="schedule_free_adamw")).model
    opt = model.optimizer
    opt.build(model.trainable_variables)
    assert len(opt._momentums) == len(model.trainable_variables)
    for z, w in zip(opt._momentums, model.trainable_variables, strict=True):
        assert z.shape == w.shape and any(z is v for v in opt.variables)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(z), keras.ops.convert_to_numpy(w))


def test_schedule_free_evaluates_its_average_and_matches_keras_fit(digits):
    # A few steps of Keras's own train step against the compiled loop's: the same training weights
    # y, and the evaluation weights x = (y - (1 - beta_1) z) / beta_1 from either's state.
    p = small(optimizer="schedule_free_adamw", **{"optimizer.warmup_epochs": 0.0, "model.dropout": 0.0,
                                                   "train.batch_size": 16})  # fmt: skip
    train, val = digits
    x, y = train.x[:64], train.y[:64]
    models = [build(p).model for _ in range(2)]
    for start in range(0, 64, 16):
        models[0].train_on_batch(x[start : start + 16], y[start : start + 16])
    engine = Engine([models[1]], 16, 1024, average=optim.evaluation_weights(models[1]))
    engine.train_epoch(jnp.asarray(x), jnp.asarray(y), np.arange(64, dtype="int32")[None])
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def average(model):
        values = [keras.ops.convert_to_numpy(v.value) for v in model.trainable_variables]
        return optim.evaluation_weights(model)(
            values, [keras.ops.convert_to_numpy(v.value) for v in model.optimizer.variables]
        )

    for a, b in zip(average(models[0]), average(models[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    trained = [v.numpy() for v in models[1].trainable_variables]
    assert not all(np.allclose(a, b) for a, b in zip(average(models[1]), trained, strict=True))
    # The compiled loop validates on x: the same numbers as a Keras model holding x.
    ((logs, _),) = engine.infer(jnp.asarray(val.x), jnp.asarray(val.y))
    probe = build(p).model
    for var, value in zip(probe.trainable_variables, average(models[1]), strict=True):
        var.assign(value)
    loss, accuracy = probe.evaluate(val.x, val.y, verbose=0)
    assert (logs["loss"], logs["accuracy"]) == pytest.approx((loss, accuracy), rel=1e-5)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_schedule_free_saves_and_keeps_the_best_of_its_average(digits, loop_name):
    p = small(optimizer="schedule_free_adamw", **{"train.loop": loop_name, "train.epochs": 3})
    train, val = digits
    member = build(p, len(train.y))
    member.keep_best = KeepBest("val_accuracy", member.all_evaluation_weights)
    member.callbacks = [member.keep_best]
    fit_members(p, train, val, [member])
    training = [w.copy() for w in member.model.get_weights()]
    member.finish()
    (measured,) = trainer_for([member], train, val).measure(val)
    assert measured["accuracy"] == pytest.approx(max(member.history.column("val_accuracy")), abs=1e-6)
    assert any(not np.array_equal(a, b) for a, b in zip(training, member.model.get_weights(), strict=True))


def test_gradient_clipping_acts_alike_in_both_loops(digits):
    train, _ = digits
    x, y = train.x[:64], train.y[:64]
    weights = {}
    for clip in ({"train.clip_value": 1e-4}, {"train.clip_global_norm": 1e-3}, {}):
        p = small(optimizer="sgd", **{"model.dropout": 0.0, "train.batch_size": 16, **clip})
        models = [build(p).model for _ in range(2)]
        for start in range(0, 64, 16):
            models[0].train_on_batch(x[start : start + 16], y[start : start + 16])
        Engine([models[1]], 16, 1024).train_epoch(jnp.asarray(x), jnp.asarray(y), np.arange(64, dtype="int32")[None])
        for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        weights[json.dumps(clip)] = models[1].get_weights()[0]
        assert models[1].optimizer.clipvalue == (clip.get("train.clip_value") or None)
        assert models[1].optimizer.global_clipnorm == (clip.get("train.clip_global_norm") or None)
    start = build(small(optimizer="sgd", **{"model.dropout": 0.0})).model.get_weights()[0]
    moved = {k: float(np.abs(w - start).max()) for k, w in weights.items()}
    # SGD at 0.01, momentum 0.9, 4 steps: each clipped entry moves less than 4 x 0.01 x 1e-4 x 3.
    assert moved['{"train.clip_value": 0.0001}'] < 2e-5 < moved["{}"], moved
    assert moved['{"train.clip_global_norm": 0.001}'] < moved["{}"] / 10, moved


def test_muon_leaves_the_output_layer_and_what_is_not_a_matrix_to_adamw():
    model = build(small(optimizer="muon", **{"model.hidden": [32, 32]})).model
    opt = model.optimizer
    opt.build(model.trainable_variables)
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    adamw = [v is not None for v in opt.adam_velocities]
    uses_adamw = [(adamw[index[id(d.kernel)]], adamw[index[id(d.bias)]]) for d in dense]
    # (kernel, bias): the hidden kernels are Muon's, the output layer and every bias AdamW's.
    assert [d.name == "output" for d in dense] == [False, False, True]
    assert uses_adamw == [(False, True), (False, True), (True, True)], uses_adamw


# --- the learning-rate range test -------------------------------------------------------------
@pytest.mark.parametrize("name, low, high", [("adam", 3e-4, 3e-3), ("sgd", 1e-2, 3e-1)])
def test_the_range_test_suggests_a_rate_in_the_known_range(fashion_mnist_prepared, name, low, high):
    # The default experiment (MLP 128-64, batch 32) with Adam, and with SGD (momentum 0.9).
    p = validate_params(repo_params(optimizer=name))
    result = lr_find.run(p, fashion_mnist_prepared)
    print(f"\n[record] lr-find {name}: {result.suggestions} after {len(result.rates)} steps ({result.stopped})")
    assert result.conclusive and ("passed 4x its minimum" in result.stopped or "above its start" in result.stopped)
    assert low <= result.suggested <= high, result.suggestions
    assert result.suggestions["steepest"] < result.rates[int(np.argmin(result.smoothed))]


def test_lr_find_writes_the_curve_the_figure_and_the_command(tmp_path):
    # As a user runs it, in a checkout whose prepare stage has run: the paths come from dvc.yaml.
    data = prepared_digits(tmp_path / "data" / "prepared")
    raw = repo_params(optimizer="sgd", dataset="digits")
    write_params(tmp_path / "params.yaml", raw)
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    assert data.is_dir()
    cmd = [sys.executable, "-m", "optlab.study.cli", "lr-find", "--repo", str(tmp_path), "--steps", "150"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "reports/lr_find.json").read_text())
    assert set(saved) >= {"suggestions", "suggested", "command", "curve"} and len(saved["curve"]) > 20
    assert (tmp_path / "reports/lr_find.png").read_bytes()[:4] == b"\x89PNG"
    rate = float(saved["suggested"])
    assert f"dvc exp run -S optimizer=sgd -S optimizer.learning_rate={rate:.2g}" in proc.stdout
    missing = subprocess.run([*cmd[:-4], "--repo", str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "error:" in missing.stderr and "Traceback" not in missing.stderr


def test_a_range_test_that_never_blows_up_says_so(digits, tmp_path):
    p = small(optimizer="adam")
    data = prepared_digits(tmp_path / "prepared")
    result = lr_find.run(p, data, start=1e-7, end=1e-4, steps=40)
    assert not result.conclusive and "never rose" in result.stopped
    with pytest.raises(OptlabError, match="--start"):
        lr_find.run(p, data, start=1.0, end=0.5)
