"""The sharpness, the gradient noise scale and the loss landscape measure what they say: against the
exact Hessian of a small model, every per-example gradient, and Keras's own evaluation and steps."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import REPO, prepared_digits, repo_params, write_params
from optlab.core.params import validate_params
from optlab.training import hessian, preconditioning
from optlab.training.backend import keras


def softmax_regression(seed: int = 0, hidden: int = 0, l2: float = 0.0) -> keras.Model:
    """Multinomial logistic regression on digits' 64 pixels (650 weights), or with a tanh layer."""
    keras.utils.set_random_seed(seed)
    penalty = keras.regularizers.L2(l2) if l2 else None
    layers = [keras.layers.Dense(hidden, activation="tanh", kernel_regularizer=penalty)] if hidden else []
    output = keras.layers.Dense(10, activation="softmax", kernel_regularizer=penalty)
    return keras.Sequential([keras.Input((64,)), *layers, output])


def state(model: keras.Model):
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


def trained(model: keras.Model, x, y, steps: int = 100, rate: float = 0.5):
    """Weights some gradient steps in, where the Hessian is no longer the initial one."""
    tv, ntv = state(model)
    flat, unravel = ravel_pytree(tv)
    grad = jax.jit(jax.grad(lambda w: hessian.inference_loss(model, unravel(w), ntv, x, y)))
    for _ in range(steps):
        flat = flat - rate * grad(flat)
    return unravel(flat), ntv


def measured(model, scale, sharp: int, noise: int, tv, ntv, ov, x, y) -> dict:
    """hessian.measure compiled, as the engine runs it (eagerly it would compile op by op)."""
    chunk = hessian.chunk_size(noise) if noise else 0
    return jax.jit(functools.partial(hessian.measure, model, scale, sharp, noise, chunk))(tv, ntv, ov, x, y)


def exact_hessian(model, tv, ntv, x, y) -> np.ndarray:
    flat, unravel = ravel_pytree(tv)
    loss = jax.jit(jax.hessian(lambda w: hessian.inference_loss(model, unravel(w), ntv, x, y)))
    return np.asarray(loss(flat), np.float64)


@pytest.mark.parametrize("hidden", [0, pytest.param(8, marks=pytest.mark.slow)])  # with 8 tanh units: not convex
def test_the_sharpness_is_the_top_eigenvalue_of_the_exact_hessian(digits, hidden):
    train, _ = digits
    x, y = jnp.asarray(train.x[:400]), jnp.asarray(train.y[:400])
    model = softmax_regression(hidden=hidden)
    tv, ntv = trained(model, x, y)
    exact = np.linalg.eigvalsh(exact_hessian(model, tv, ntv, x, y))[-1]
    found = float(measured(model, None, 400, 0, tv, ntv, [], x, y)["sharpness"])
    assert abs(found / exact - 1) < 0.01, (found, exact)


def test_the_preconditioned_sharpness_is_the_top_eigenvalue_of_the_scaled_hessian(digits):
    # P from a real Adam state: the eigenvalues of P^-1 H are those of P^-1/2 H P^-1/2.
    train, _ = digits
    x, y = jnp.asarray(train.x[:400]), jnp.asarray(train.y[:400])
    model = softmax_regression()
    optimizer = keras.optimizers.Adam(0.01)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(np.asarray(x), np.asarray(y), batch_size=50, epochs=2, verbose=0, shuffle=False)
    tv, ntv = state(model)
    ov = [v.value for v in optimizer.variables]
    pre = preconditioning.preconditioner(optimizer)
    p = np.asarray(ravel_pytree(pre.scale(tv, ov))[0], np.float64)
    scaled = exact_hessian(model, tv, ntv, x, y) / np.sqrt(np.outer(p, p))
    exact = np.linalg.eigvalsh(scaled)[-1]
    found = float(measured(model, pre.scale, 400, 0, tv, ntv, ov, x, y)["preconditioned_sharpness"])
    assert abs(found / exact - 1) < 0.01, (found, exact)
    assert pre.factor == pytest.approx(38.0)  # (2 + 2 * 0.9) / (1 - 0.9)


def test_the_noise_scale_matches_a_brute_force_computation_from_every_per_example_gradient(digits):
    train, _ = digits
    n = 300
    x, y = jnp.asarray(train.x[:n]), jnp.asarray(train.y[:n])
    model = softmax_regression(hidden=16)
    tv, ntv = trained(model, x, y, steps=10, rate=0.2)
    one = jax.jit(lambda xi, yi: ravel_pytree(jax.grad(hessian.inference_loss, argnums=1)(model, tv, ntv, xi, yi))[0])
    per_example = np.stack([np.asarray(one(x[i : i + 1], y[i : i + 1]), np.float64) for i in range(n)])
    mean = per_example.mean(axis=0)
    trace = np.trace(np.cov(per_example, rowvar=False, ddof=1))  # tr(Σ), the unbiased sample covariance
    signal = mean @ mean - trace / n  # |G|²: E|ḡ|² = |G|² + tr(Σ)/n
    found = measured(model, None, 0, n, tv, ntv, [], x, y)
    assert float(found["gradient_noise"]) == pytest.approx(trace, rel=1e-4)
    assert float(found["gradient_signal"]) == pytest.approx(signal, rel=1e-3)
    rows = hessian.Curvature(model, keras.optimizers.SGD(0.1), hessian.Settings(0, n, 1), n)(
        jax.tree.map(lambda a: a[None], (tv, ntv, [])), x, y, [0.1])  # fmt: skip
    assert rows[0]["noise_scale"] == pytest.approx(trace / signal, rel=1e-3) and signal > 0


# --- each optimizer's preconditioner and threshold ------------------------------------------------
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adam_amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
    "nadam": lambda: keras.optimizers.Nadam(0.01),
    "adamax": lambda: keras.optimizers.Adamax(0.01),
    "lamb": lambda: keras.optimizers.Lamb(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "rmsprop_momentum_centered": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
    "adagrad": lambda: keras.optimizers.Adagrad(0.01),
}


def _direction(opt, name: str, grads, ov_before, ov_after):
    """What Keras's step divides by P (times the learning rate): the step is -lr P^-1 d."""
    at = {id(v): i for i, v in enumerate(opt.variables)}
    if name.startswith(("adam", "lamb")) and name != "adamax":
        return [ov_after[at[id(m)]] for m in opt._momentums]
    if name == "adamax":
        return [ov_after[at[id(m)]] for m in opt._m]
    if name == "nadam":  # Keras's Nesterov average of the new momentum and the gradient
        t = float(ov_before[at[id(opt.iterations)]]) + 1
        u_t, u_next = (0.9 * (1 - 0.5 * 0.96**s) for s in (t, t + 1))
        product = float(ov_after[at[id(opt._u_product)]])
        return [u_next * ov_after[at[id(m)]] / (1 - product * u_next) + (1 - u_t) * g / (1 - product)
                for m, g in zip(opt._momentums, grads, strict=True)]  # fmt: skip
    return grads  # RMSprop and Adagrad divide the gradient itself


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_preconditioner_is_what_the_keras_step_divides_by(digits, name):
    # Reads Keras 3.15.1's private slots (optlab.training.preconditioning): fails if they move.
    train, _ = digits
    x, y = jnp.asarray(train.x[:64]), jnp.asarray(train.y[:64])
    model, opt = softmax_regression(hidden=8), OPTIMIZERS[name]()
    opt.build(model.trainable_variables)
    tv, ntv = state(model)
    ov = [v.value for v in opt.variables]
    loss = jax.grad(lambda t, i: hessian.inference_loss(model, t, ntv, x[i : i + 16], y[i : i + 16]))
    for i in range(0, 64, 16):  # a few steps, so every slot holds something
        grads = loss(tv, i)
        new_tv, new_ov = opt.stateless_apply(ov, grads, tv)
        if i < 48:
            tv, ov = new_tv, new_ov
    scale = preconditioning.preconditioner(opt).scale(tv, new_ov)
    d = _direction(opt, name, grads, ov, new_ov)
    if name.startswith("rmsprop_momentum"):  # heavy ball: m' = 0.5 m + lr g / P, and w' = w - m'
        at = {id(v): i for i, v in enumerate(opt.variables)}
        steps = [new_ov[at[id(m)]] - 0.5 * ov[at[id(m)]] for m in opt._momentums]
    else:
        decay = 0.05 * 0.01 if name == "adamw" else 0.0  # AdamW's decoupled decay, lr x weight_decay x w
        steps = [w - w2 - decay * w for w, w2 in zip(tv, new_tv, strict=True)]
    for step, p, di in zip(steps, scale, d, strict=True):
        np.testing.assert_allclose(np.asarray(step), 0.01 * np.asarray(di) / np.asarray(p), rtol=2e-3, atol=1e-7)


def test_each_thresholds_factor_follows_the_steps_momentum_form():
    sgd = keras.optimizers.SGD
    assert preconditioning.gradient_descent_factor(sgd(0.1, momentum=0.0)) == 2.0  # 2/η
    assert preconditioning.gradient_descent_factor(sgd(0.1, momentum=0.9)) == pytest.approx(3.8)  # (2 + 2β)/η
    assert preconditioning.gradient_descent_factor(sgd(0.1, momentum=0.9, nesterov=True)) == pytest.approx(3.8 / 2.8)
    assert preconditioning.gradient_descent_factor(keras.optimizers.Adam(0.1)) == 2.0  # the reference line
    for name, factor in (("adam", 38.0), ("nadam", 3.8 / (2.8 * 0.1)), ("rmsprop", 2.0), ("adagrad", 2.0)):
        opt = OPTIMIZERS[name]()
        opt.build(softmax_regression().trainable_variables)
        assert preconditioning.preconditioner(opt).factor == pytest.approx(factor), name
    for opt in (sgd(0.1), keras.optimizers.Lion(1e-4), keras.optimizers.Adafactor(1e-3)):
        assert preconditioning.preconditioner(opt) is None


# --- in the compiled loop, the train stage's record and the plot stage --------------------------------
def _train_stage_run(tmp_path, **knobs):
    """The train stage's work in-process on digits (2 replicas of a small MLP, Adam at a constant 1e-3)."""
    from optlab.training import run

    data = prepared_digits(tmp_path / "prepared")
    knobs = {"dataset": "digits", "train.epochs": 3, "train.replicas": 2, "model.hidden": [32], "schedule": "constant",
             "train.backend": "jax", "train.loop": "compiled", **knobs}  # fmt: skip
    raw = repo_params(**knobs)
    write_params(tmp_path / "params.yaml", raw)  # the workspace's params, as optlab landscape reads them
    params = validate_params(raw, conf=REPO / "conf")
    run.run(params, data, tmp_path / "models/model.keras", tmp_path / "live", tmp_path / "backup", tmp_path / "logs",
            tmp_path / "models/replicas", progress=False)  # fmt: skip
    return params, data


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    params, data = _train_stage_run(tmp_path, **{"train.curvature_every": 2, "train.trajectory": True})
    return tmp_path, params, data


@pytest.mark.slow
def test_the_compiled_loop_logs_each_members_sharpness_and_noise_scale(trained_run):
    from optlab.training import record

    root, _, _ = trained_run
    table = record.read_curvature(root / "live")
    assert list(table.index) == [1, 2]  # the first epoch, then every train.curvature_every = 2
    assert set(table.columns) == set(record.CURVATURE)
    assert np.allclose(table["stability_threshold"], 2 / 1e-3) and np.allclose(table["preconditioned_threshold"], 38e3)
    assert (table["sharpness"] > 0).all() and (table["preconditioned_sharpness"] > table["sharpness"]).all()
    each = [record.read_series(root / f"live/plots/metrics/replicas/r{r}/diagnostics/sharpness.tsv") for r in (0, 1)]
    assert each[0].iloc[0] != each[1].iloc[0], "two seeds, two models: two sharpnesses"
    np.testing.assert_allclose(table["sharpness"], (each[0] + each[1]) / 2, rtol=1e-6)  # the run's is their mean
    summary = record.read_summary(root / "live")
    assert not any(k in summary for k in record.CURVATURE), "curves, not dvc exp show columns"


@pytest.mark.slow
def test_the_trajectory_starts_at_the_seeds_weights_and_ends_at_the_saved_model(trained_run):
    from optlab.study import landscape
    from optlab.training import record

    root, params, data = trained_run
    epochs, weights, saved_params = record.read_trajectory(root / "logs")
    assert list(epochs) == [0, 1, 2, 3] and saved_params["seed"] == params.seed
    meta = landscape.files.prepared_meta(data)
    final = landscape.load_solution(root, None, "models/model.keras", meta)
    np.testing.assert_array_equal(weights[0], landscape.initial_point(final, meta).flat)  # rebuilt from the seed
    np.testing.assert_array_equal(weights[-1], landscape.Point.of(final.model).flat)


@pytest.mark.slow
def test_the_keras_loop_measures_none_of_them(digits):
    from conftest import fit_members

    params = validate_params(repo_params(**{"dataset": "digits", "train.epochs": 1, "model.hidden": [32],
                                            "train.backend": "jax", "train.loop": "keras"}))  # fmt: skip
    (member,) = fit_members(params, *digits)
    assert member.history.diagnostics == []


def test_the_plot_stage_draws_the_sharpness_and_noise_scale_or_says_why_not(tmp_path):
    import pandas as pd
    from PIL import Image

    from optlab.evaluation import figures

    epochs = pd.Index([1, 2, 4], name="epoch")
    table = pd.DataFrame({"sharpness": [5.0, 9.0, 19.0], "stability_threshold": 20.0, "preconditioned_sharpness":
                          [300.0, 900.0, 400.0], "preconditioned_threshold": 380.0, "noise_scale": [40.0, None, 90.0],
                          "gradient_noise": 9.0, "gradient_signal": [0.2, -0.1, 0.1]}, index=epochs)  # fmt: skip
    for name, draw in {"sharpness.png": lambda p: figures.sharpness(table, p, "adam"),
                       "sgd.png": lambda p: figures.sharpness(table.drop(columns="preconditioned_sharpness"), p),
                       "noise_scale.png": lambda p: figures.noise_scale(table, 32, p),
                       "none.png": lambda p: figures.sharpness(pd.DataFrame(), p),
                       "no_noise.png": lambda p: figures.noise_scale(pd.DataFrame(), None, p)}.items():  # fmt: skip
        draw(tmp_path / name)
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 300, name


# --- the landscape --------------------------------------------------------------------------------------
def test_filter_normalized_directions_match_each_filters_norm_and_leave_biases_alone():
    from optlab.study.landscape import filter_normalized

    model = softmax_regression(hidden=16)
    d = filter_normalized(model, np.random.default_rng(0))
    at = 0
    for v in model.trainable_variables:
        w = np.asarray(v.value)
        part = d[at : at + w.size].reshape(w.shape)
        at += w.size
        if w.ndim == 1:
            assert not part.any()  # biases: not moved (Li et al.'s "biasbn")
        else:  # each column (the weights into one unit) as long as the model's
            np.testing.assert_allclose(np.linalg.norm(part, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5)


def test_the_lines_ends_are_the_two_models_evaluated_losses(digits):
    from optlab.study import landscape

    train, val = digits
    models = [softmax_regression(seed, hidden=16, l2=1e-3) for seed in (0, 1)]  # two of one architecture
    evaluate = landscape.Evaluator(models[1], train.x, train.y), landscape.Evaluator(models[1], val.x, val.y)
    found = landscape.line(*evaluate, landscape.Point.of(models[0]), landscape.Point.of(models[1]))
    alpha = np.asarray(found["alpha"])
    for end, model in zip((0.0, 1.0), models, strict=True):
        i = int(np.flatnonzero(alpha == end)[0])
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        for split, prefix in ((train, "train"), (val, "val")):
            loss, accuracy = model.evaluate(split.x, split.y, batch_size=256, verbose=0)  # Keras's, L2 included
            assert found[f"{prefix}_loss"][i] == pytest.approx(loss, rel=1e-5)
            assert found[f"{prefix}_accuracy"][i] == pytest.approx(accuracy, abs=1e-6)
    assert found["train_loss"][10] != pytest.approx(found["train_loss"][5])  # and the line between them moves


@pytest.mark.slow
def test_the_landscape_draws_the_line_the_plane_and_the_trajectory(trained_run):
    from optlab.study import landscape

    root, _, data = trained_run
    out = root / "reports/landscape"
    where = landscape.Where(root, data, "models/model.keras", root / "logs", out)
    found = landscape.run(where, points=5, train_images=200)
    assert found["figures"] == ["line.png", "plane.png", "trajectory.png"]
    assert all((out / name).is_file() for name in found["figures"])
    saved = json.loads((out / "landscape.json").read_text())
    plane = np.asarray(saved["plane"]["train_loss"])
    assert plane.shape == (5, 5) and plane[2, 2] == pytest.approx(saved["line"]["train_loss"][25], rel=1e-5)
    assert len(saved["trajectory"]["path"]) == 4 and saved["trajectory"]["path"][-1] == pytest.approx([0, 0], abs=1e-4)
    assert "trajectory plane" in landscape.summary(found)
