"""The train side: every registry name builds and trains, the seed reports' parameter counts,
reproducibility, resume after a kill, divergence, and data that does not fit the model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import OPTIMIZER_NAMES, REPO, SCHEDULE_NAMES, prepared_digits, repo_params, run_stage, write_params
from optlab.core.params import MODEL_NAMES, ParamsError, validate_params
from optlab.data import files
from optlab.training import optimizers, record, schedules
from optlab.training import run as train
from optlab.training.backup import Backup
from optlab.training.engine import Engine
from optlab.training.loop import History, Member
from optlab.training.models import MODELS, build_model, trainable_params
from optlab.training.optimizers import optimizer_class
from optlab.training.schedules import SCHEDULES


def small(**overrides):
    base = {"dataset": "digits", "train.epochs": 2, "train.batch_size": 64, "model.hidden": [32]}
    return validate_params(repo_params(**{**base, **overrides}))


def run_train(p, data: Path, tmp_path: Path) -> dict:
    """The train stage's work, in this process, with every output under ``tmp_path``."""
    return train.run(p, data, tmp_path / "model.keras", tmp_path / "live", tmp_path / "backup", tmp_path / "logs")


def test_registries_match_the_names_params_accepts():
    assert set(MODELS) == set(MODEL_NAMES)
    assert set(SCHEDULES) == set(SCHEDULE_NAMES)
    for name in OPTIMIZER_NAMES:  # every conf/optimizer/ file is a Keras optimizer (by name) or one of optlab's
        assert issubclass(optimizer_class(name), keras.optimizers.Optimizer), name


@pytest.mark.parametrize("name,shape", [("mlp", (64,)), ("mlp", (8, 8, 1)), ("cnn", (8, 8, 1)), ("cnn", (32, 32, 3))])
def test_every_model_builds(name, shape):
    p = small(
        **{
            "model.name": name,
            "model.batch_norm": True,
            "model.dropout": 0.1,
            "model.l2": 5e-5,
            "model.conv_filters": [8, 16],
            "model.augment": True,
        }
    )
    model = build_model(p.model, shape, 10, seed=0)
    probs = keras.ops.convert_to_numpy(model(np.zeros((2, *shape), "float32")))
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_report_002_recipe_has_100778_trainable_parameters():
    # Report 002: CIFAR-10 flattened (3072), Dense 3x32 relu, softmax over 10 classes.
    p = validate_params(repo_params(**{"dataset": "cifar10", "model.hidden": [32, 32, 32], "model.dropout": 0.0}))
    assert trainable_params(build_model(p.model, (3072,), 10, p.seed)) == 100_778


def test_cnn_on_flat_data_is_refused_with_the_fix():
    from optlab.core.errors import OptlabError

    p = small(**{"model.name": "cnn"})
    with pytest.raises(OptlabError, match="run the prepare stage again for the cnn"):
        build_model(p.model, (64,), 10, p.seed)


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_optimizer_and_schedule_builds(optimizer, schedule):
    if optimizer == "schedule_free_adamw" and schedule != "constant":
        with pytest.raises(ParamsError, match="replaces the learning-rate schedule"):
            small(optimizer=optimizer, schedule=schedule)
        return
    p = small(optimizer=optimizer, schedule=schedule, **{"train.epochs": 3})
    opt = optimizers.build(p, schedules.build(p, steps_per_epoch=10), steps_per_epoch=10)
    assert isinstance(opt, optimizer_class(optimizer))
    lr0 = p.optimizer.learning_rate
    rate = opt.learning_rate
    first = float(keras.ops.convert_to_numpy(rate))
    if schedule in ("warmup_cosine", "wsd", "inverse_sqrt", "one_cycle", "cyclical"):
        assert first < lr0  # a warm-up, or a cycle, starts low
    else:
        assert first == pytest.approx(lr0, rel=1e-6)


def test_schedules_follow_their_shape():
    steps, epochs = 10, 10

    def rates(name, **kw):
        p = small(schedule=name, **{"train.epochs": epochs}, **kw)
        sched = schedules.build(p, steps)
        return [float(keras.ops.convert_to_numpy(sched(float(s)))) for s in range(0, steps * epochs, steps)]

    lr = 1e-3
    assert rates("step", **{"schedule.every_epochs": 3}) == pytest.approx(
        [lr] * 3 + [lr / 2] * 3 + [lr / 4] * 3 + [lr / 8]
    )
    assert rates("exponential")[3] == pytest.approx(lr * 0.9**3, rel=1e-5)
    cos = rates("cosine")
    assert (
        cos[0] == pytest.approx(lr) and cos[5] == pytest.approx(lr / 2, rel=1e-4) and cos == sorted(cos, reverse=True)
    )
    warm = rates("warmup_cosine", **{"schedule.warmup_epochs": 2.0})
    assert warm[0] < warm[1] < warm[2] == pytest.approx(lr, rel=1e-4) and warm[-1] < warm[2]


def _formula(name: str, s: int, total: int, warmup: int, k: dict) -> float:
    """Each new schedule's value (x the peak) at step s, written out from its paper's definition."""
    import math

    if warmup and s < warmup:
        return (s + 1) / warmup  # the linear warm-up any of them may take
    t, span = s - warmup, total - warmup
    if name == "linear_decay":
        return 1 - t / span
    if name == "wsd":
        x = min(max((t - (span - k["decay_fraction"] * span)) / (k["decay_fraction"] * span), 0), 1)
        return {"linear": 1 - x, "cosine": (1 + math.cos(math.pi * x)) / 2, "sqrt": 1 - math.sqrt(x)}[k["cooldown"]]
    if name == "one_cycle":
        rise, lo, hi = k["warmup_fraction"] * span, k["start_factor"], k["end_factor"]
        if t < rise:
            return lo + (1 - lo) * (1 - math.cos(math.pi * t / rise)) / 2
        return hi + (1 - hi) * (1 + math.cos(math.pi * (t - rise) / (span - rise))) / 2
    if name == "inverse_sqrt":
        return math.sqrt(warmup / (t + warmup))
    half = k["half_cycle_epochs"] * 10  # cyclical: Smith 2017's triangle, from the low rate
    cycle = math.floor(1 + t / (2 * half))
    return k["low_factor"] + (1 - k["low_factor"]) * max(0.0, 1 - abs(t / half - 2 * cycle + 1))


@pytest.mark.parametrize("name, knobs", [
    ("linear_decay", {}), ("linear_decay", {"schedule.warmup_epochs": 2.0}),
    ("wsd", {"schedule.cooldown": "sqrt"}), ("wsd", {"schedule.cooldown": "linear", "schedule.decay_fraction": 0.5}),
    ("wsd", {"schedule.cooldown": "cosine"}), ("one_cycle", {}), ("inverse_sqrt", {}), ("cyclical", {}),
    ("cyclical", {"schedule.warmup_epochs": 1.0, "schedule.low_factor": 0.0}),
])  # fmt: skip
def test_each_new_schedule_matches_its_formula_at_chosen_steps(name, knobs):
    p = small(schedule=name, **{"train.epochs": 10, **knobs})
    rate, lr = schedules.build(p, steps_per_epoch=10), p.optimizer.learning_rate
    k = p.schedule.model_dump()
    warmup = round(k.get("warmup_epochs", 0.0) * 10)
    for s in (0, 1, 5, 9, 10, 19, 20, 33, 50, 62, 79, 80, 85, 97, 99):
        got = float(keras.ops.convert_to_numpy(rate(s)))
        # float32 arithmetic: 1e-6 of the peak near the end of a cosine, where 1 + cos(x) cancels
        assert got == pytest.approx(lr * _formula(name, s, 100, warmup, k), rel=1e-5, abs=1e-6 * lr), (name, s)


@pytest.mark.parametrize("loop_name", ["compiled", "keras"])
def test_both_loops_learn_digits(tmp_path, loop_name):
    data = prepared_digits(tmp_path / "prepared")
    p = small(**{"train.loop": loop_name, "train.epochs": 5, "model.hidden": [64], "train.batch_size": 32})
    summary = run_train(p, data, tmp_path)
    assert summary["epochs_run"] == 5 and summary["trainable_params"] == 64 * 64 + 64 + 64 * 10 + 10
    assert summary["val_accuracy"] > 0.85, summary
    live = tmp_path / "live"
    for name in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        rows = record.history_file(live, name).read_text().splitlines()
        assert rows[0].startswith("step\t") and len(rows) == 1 + 5, name
    assert not (tmp_path / "backup").exists(), "the resume backup is removed once the run completes"


def test_compiled_loop_matches_keras_fit_on_one_step():
    # Same weights, same batch, same optimizer: one compiled step equals one Keras train step.
    p = small(**{"train.batch_size": 16, "model.hidden": [32]})
    x = np.random.default_rng(0).normal(size=(16, 64)).astype("float32")
    y = np.arange(16, dtype="int32") % 10
    models = [Member.build(p, (64,), 10, 1).model for _ in range(2)]
    models[0].train_on_batch(x, y)
    compiled = Engine([models[1]], batch_size=16, eval_rows=1024)
    import jax.numpy as jnp

    compiled.train_epoch(jnp.asarray(x), jnp.asarray(y), np.arange(16, dtype="int32")[None])
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_cnn_takes_one_call_per_batch_and_matches_keras_steps():
    # XLA:CPU runs convolution gradients far slower inside the epoch's scan, so a model with
    # convolutions is stepped one compiled call per batch; the arithmetic is Keras's own.
    p = small(**{"model.name": "cnn", "model.conv_filters": [4], "model.hidden": [32], "model.dropout": 0.0,
                 "train.batch_size": 8, "train.backend": "jax"})  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8, 8, 1)).astype("float32")  # two full batches and a partial one
    y = np.arange(20, dtype="int32") % 10
    models = [Member.build(p, (8, 8, 1), 10, 3).model for _ in range(2)]
    for start in range(0, 20, 8):
        models[0].train_on_batch(x[start : start + 8], y[start : start + 8])
    engine = Engine([models[1]], batch_size=8, eval_rows=1024)
    assert not engine.scans
    assert Engine([Member.build(small(), (64,), 10, 3).model], 8, 1024).scans  # the MLP: scanned chunks
    import jax.numpy as jnp

    engine.train_epoch(jnp.asarray(x), jnp.asarray(y), np.arange(20, dtype="int32")[None])
    for a, b in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
def test_a_cnn_trains_on_the_engine_the_auto_rule_picks_and_says_so(tmp_path):
    data = prepared_digits(tmp_path / "prepared", flatten=False)
    cnn = {"dataset": "digits", "model.name": "cnn", "model.conv_filters": [8], "model.hidden": [32],
           "train.epochs": 1}  # fmt: skip
    for tag, engine in (("auto", {}), ("jax", {"train.backend": "jax"})):
        proc = _train_stage(tmp_path, repo_params(**cnn, **engine), data, tag)
        assert proc.returncode == 0, proc.stderr
        info = json.loads((tmp_path / f"live{tag}" / "run.json").read_text())
        if tag == "auto":  # on this CPU machine with TensorFlow installed
            assert (info["backend"], info["loop"]) == ("tensorflow", "keras"), info
            assert (
                info["engine_rule"] == "backend auto: a cnn on a CPU trains on tensorflow (oneDNN convolutions); "
                "loop auto: keras on tensorflow"
            )
        else:  # overridden with -S train.backend=jax
            assert (info["backend"], info["loop"], info["engine_rule"]) == (
                "jax",
                "compiled",
                "loop auto: compiled on jax",
            )


@pytest.mark.parametrize("n", [300, 1024, 2500])  # fewer rows than one chunk, exactly one, a partial last one
def test_compiled_evaluation_matches_keras(n):
    p = small(**{"model.hidden": [32], "model.dropout": 0.3, "model.l2": 1e-3})
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 64)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    model = Member.build(p, (64,), 10, 1).model
    import jax.numpy as jnp

    ((logs, probs),) = Engine([model], 64, eval_rows=1024).infer(jnp.asarray(x), jnp.asarray(y))
    loss, accuracy = model.evaluate(x, y, batch_size=256, verbose=0)
    np.testing.assert_allclose(probs, model.predict(x, batch_size=256, verbose=0), rtol=1e-5, atol=1e-6)
    assert logs["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert logs["loss"] == pytest.approx(loss, rel=1e-5)  # includes the L2 penalty, as Keras's does


def train_args(data: Path, tag: str = "") -> list[str]:
    return ["--data", str(data), "--model", f"models{tag}/model.keras", "--replicas", f"models{tag}/replicas",
            "--live", f"live{tag}", "--backup", ".optlab/backup", "--tensorboard-logs", "logs"]  # fmt: skip


# The two ways optlab trains: its default (JAX, compiled loop) and Keras's own fit on TensorFlow.
# TensorFlow's import alone is about 8 s per stage process: those runs are left to `make test`.
BACKENDS = pytest.mark.parametrize(
    "engine",
    [
        pytest.param({"train.backend": "jax", "train.loop": "compiled"}, id="jax-compiled"),
        pytest.param(
            {"train.backend": "tensorflow", "train.loop": "keras"}, id="tensorflow-keras", marks=pytest.mark.slow
        ),
    ],
)


def _train_stage(tmp_path: Path, params: dict, data: Path, tag: str = "") -> subprocess.CompletedProcess:
    write_params(tmp_path / "params.yaml", params)
    return run_stage("train", *train_args(data, tag), cwd=tmp_path)


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
def test_same_seed_gives_bit_identical_metrics_and_model(tmp_path):
    # On JAX here; the TensorFlow engine's two runs give the same metrics, curves and model bytes
    # through DVC in tests/test_experiments.py::test_tensorflow_backend_trains_the_pipeline_and_reruns_bit_identically.
    engine = {"train.backend": "jax", "train.loop": "compiled"}
    data = prepared_digits(tmp_path / "prepared")
    params = repo_params(
        **{"dataset": "digits", "train.epochs": 3, "model.hidden": [64], "model.dropout": 0.2}, **engine
    )
    for tag in ("1", "2"):
        proc = _train_stage(tmp_path, params, data, tag)
        assert proc.returncode == 0, proc.stderr
    for rel in ("plots/metrics/val/accuracy.tsv", "plots/metrics/train/loss.tsv", "plots/metrics/learning_rate.tsv"):
        assert (tmp_path / "live1" / rel).read_bytes() == (tmp_path / "live2" / rel).read_bytes(), rel
    m1, m2 = (json.loads((tmp_path / f"live{t}" / "metrics.json").read_text()) for t in "12")
    assert m1 == m2 and "seconds_per_epoch" not in m1  # timings are in run.json, not among the metrics
    # Each run records what produced it.
    info = json.loads((tmp_path / "live1" / "run.json").read_text())
    assert info["backend"] == engine["train.backend"] and info["loop"] == engine["train.loop"]
    assert info["params"]["seed"] == 0 and info["versions"]["keras"]
    assert info["cpu"] == record.cpu_model() and info["cpu"]  # XLA's float bits depend on it
    assert set(info["data_sha256"]) >= {"x_train.npy", "y_train.npy", "meta.json"}
    # The .keras bytes are identical too, so DVC does not rerun evaluate and plot for nothing.
    assert (tmp_path / "models1/model.keras").read_bytes() == (tmp_path / "models2/model.keras").read_bytes()


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
def test_different_seeds_differ(tmp_path):
    data = prepared_digits(tmp_path / "prepared")
    for seed in (0, 1):
        params = repo_params(**{"dataset": "digits", "train.epochs": 1, "model.hidden": [32], "seed": seed})
        assert _train_stage(tmp_path, params, data, str(seed)).returncode == 0
    assert (tmp_path / "live0/plots/metrics/val/loss.tsv").read_text() != (
        tmp_path / "live1/plots/metrics/val/loss.tsv"
    ).read_text()


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
@BACKENDS
def test_a_killed_run_leaves_no_outputs_and_resumes_to_the_same_result(tmp_path, engine):
    data = prepared_digits(tmp_path / "prepared")
    # Enough epochs that the kill lands mid-run; dropout makes the RNG state matter on resume.
    params = repo_params(
        **{
            "dataset": "digits",
            "train.epochs": 8,
            "model.hidden": [256, 256],
            "model.dropout": 0.2,
            "schedule": "cosine",
            "train.batch_size": 16,
            **engine,
        }
    )
    ref = tmp_path / "ref"
    ref.mkdir()
    assert _train_stage(ref, params, data).returncode == 0

    write_params(tmp_path / "params.yaml", params)
    cmd = [sys.executable, str(REPO / "stages" / "train.py"), *train_args(data)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    history = tmp_path / ".optlab/backup"
    deadline = time.time() + 300
    # Kill once at least two epochs are backed up.
    while time.time() < deadline and proc.poll() is None:
        if backed_up_epochs(history) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # What the kill left: no model, and a live directory that says it is incomplete (dvclive wrote
    # the epochs as they ended; DVC records nothing, as the stage did not succeed).
    assert not (tmp_path / "models/model.keras").exists()
    assert json.loads((tmp_path / "live/run.json").read_text())["status"] == "running"
    assert not (tmp_path / "live/metrics.json").exists() or "epochs_run" not in json.loads(
        (tmp_path / "live/metrics.json").read_text()
    ), "a killed run's summary must not look complete"

    resumed = _train_stage(tmp_path, params, data)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the backup of epoch" in resumed.stdout
    for rel in ("plots/metrics/val/accuracy.tsv", "plots/metrics/train/loss.tsv", "plots/metrics/learning_rate.tsv"):
        assert (tmp_path / "live" / rel).read_text() == (ref / "live" / rel).read_text(), rel
    assert json.loads((tmp_path / "live/metrics.json").read_text())["epochs_run"] == 8
    assert not history.exists(), "the backup, and any save the kill cut short, is removed once the run completes"
    assert not list(tmp_path.glob("**/.*.tmp-*")), "no temporaries of a killed write are left behind"


def backed_up_epochs(root: Path) -> int:
    """Epochs in the (single) completed backup under ``root``; temporaries start with a dot."""
    done = list(root.glob("[!.]*.npz")) if root.exists() else []
    if not done:
        return 0
    try:
        with np.load(done[0]) as saved:
            return len(json.loads(str(saved["history"]))[0]["epochs"])  # replica 0's
    except (FileNotFoundError, ValueError, OSError):  # replaced or removed while we looked
        return 0


def test_a_backup_save_cut_short_by_a_kill_is_ignored_and_cleared(tmp_path):
    # SIGKILL can land inside Backup.save: its temporary file stays beside the last whole backup.
    p = small(**{"model.dropout": 0.2})
    member = Member.build(p, (64,), 10, 4)
    member.history = History(epochs=[{"loss": 1.0}], seconds=[0.5])
    backup = Backup(tmp_path / "backup", "key")
    backup.save([member])
    assert backed_up_epochs(tmp_path / "backup") == 1
    cut_short = tmp_path / "backup" / ".key.npz.tmp-killed.npz"
    cut_short.write_bytes(b"half a file")
    other_run = tmp_path / "backup" / ".other.npz.tmp-running.npz"  # another key's save in progress: not ours
    other_run.write_bytes(b"")

    resumed = backup.restore([member])
    assert resumed is not None and resumed[0].epochs == [{"loss": 1.0}]
    assert not cut_short.exists() and other_run.exists()
    other_run.unlink()
    backup.clear()
    assert not (tmp_path / "backup").exists()


def test_stage_start_removes_temporaries_a_killed_write_left(tmp_path):
    from optlab.core.outputs import remove_outputs, temporaries

    (tmp_path / "models").mkdir()
    leftovers = [tmp_path / "models/.model.keras.tmp-a1.keras", tmp_path / ".live.tmp-b2"]
    leftovers[0].write_bytes(b"partial")
    leftovers[1].mkdir()
    (leftovers[1] / "metrics.json").write_text("{")
    unrelated = tmp_path / "models/.other.keras.tmp-c3.keras"
    unrelated.write_bytes(b"")
    assert temporaries(tmp_path / "models/model.keras") == [leftovers[0]]
    remove_outputs(tmp_path / "models/model.keras", tmp_path / "live")
    assert not any(p.exists() for p in leftovers) and unrelated.exists()


def _diverging(engine: dict, **extra) -> dict:
    # Adam at learning rate 10, no warm-up: the loss explodes in the first epoch.
    knobs = {"dataset": "digits", "train.epochs": 5, "optimizer.learning_rate": 10.0, "schedule": "constant",
             "model.hidden": [64], **engine, **extra}  # fmt: skip
    return repo_params(**knobs)


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
@BACKENDS
def test_a_diverged_run_is_recorded_as_a_result(tmp_path, engine):
    data = prepared_digits(tmp_path / "prepared")
    proc = _train_stage(tmp_path, _diverging(engine), data)
    assert proc.returncode == 0, proc.stderr
    assert "warning: training diverged at epoch 1" in proc.stderr and "learning rate too high" in proc.stderr
    assert "epoch 1/5:" in proc.stdout and "epoch 2/5:" not in proc.stdout  # stopped after the diverged epoch
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert (summary["diverged"], summary["diverged_epoch"], summary["epochs_run"]) == (1, 1, 1), summary
    rows = (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert len(rows) == 2 and float(rows[1].split("\t")[1]) > 3 * np.log(10)  # the exploded epoch is in the curve
    info = json.loads((tmp_path / "live/run.json").read_text())
    assert info["status"] == "complete" and info["diverged"]["0"].startswith("training diverged at epoch 1")
    model = keras.saving.load_model(tmp_path / "models/model.keras")
    assert all(np.isfinite(w).all() for w in model.get_weights())  # the last finite weights
    assert not (tmp_path / ".optlab/backup").exists()


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
@BACKENDS
def test_a_diverged_run_fails_and_records_nothing_when_asked(tmp_path, engine):
    data = prepared_digits(tmp_path / "prepared")
    proc = _train_stage(tmp_path, _diverging(engine, **{"train.on_divergence": "fail"}), data)
    assert proc.returncode == 2
    assert "diverged at epoch 1" in proc.stderr and "learning rate too high" in proc.stderr, proc.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    assert not (tmp_path / "live").exists()


def test_a_collapse_to_chance_after_learning_counts_as_divergence_but_slow_learning_does_not():
    from optlab.training.loop import divergence

    p = small()
    chance = {"loss": 2.35, "accuracy": 0.1, "val_loss": 2.31, "val_accuracy": 0.10}
    learned = {"loss": 1.2, "accuracy": 0.6, "val_loss": 1.1, "val_accuracy": 0.62}
    assert divergence(1, chance, [learned], p, 10).startswith("training collapsed at epoch 2")
    assert divergence(1, chance, [chance], p, 10) == ""  # slow, never better than chance: not stopped
    assert divergence(0, {**chance, "loss": float("nan")}, [], p, 10).startswith("training diverged at epoch 1")
    assert divergence(3, learned, [chance, learned], p, 10) == ""


def test_prepared_data_of_another_dataset_is_refused(tmp_path):
    data = prepared_digits(tmp_path / "prepared")
    params = repo_params(**{"dataset": "mnist", "train.epochs": 1})
    proc = _train_stage(tmp_path, params, data)
    assert proc.returncode == 2 and "run `dvc repro`" in proc.stderr, proc.stderr


@BACKENDS
def test_cnn_on_flat_prepared_data_fails_before_training(tmp_path, engine):
    data = prepared_digits(tmp_path / "prepared", flatten=True)
    proc = _train_stage(tmp_path, repo_params(**{"dataset": "digits", "model.name": "cnn"}, **engine), data)
    assert proc.returncode == 2 and "prepare reads model.name" in proc.stderr, proc.stderr


def test_cnn_trains_on_image_shaped_data(tmp_path):
    data = prepared_digits(tmp_path / "prepared", flatten=False)
    p = small(**{"model.name": "cnn", "model.conv_filters": [8], "model.augment": True, "train.epochs": 2,
                 "train.backend": "jax"})  # fmt: skip
    summary = run_train(p, data, tmp_path)
    assert summary["epochs_run"] == 2 and np.isfinite(summary["val_accuracy"])
    assert keras.saving.load_model(tmp_path / "model.keras").input_shape == (None, 8, 8, 1)


@pytest.mark.parametrize(
    "extra",
    [
        {"train.early_stopping": 1, "train.monitor": "val_loss"},
        {"schedule": "plateau", "schedule.monitor": "val_loss", "schedule.patience": 0},
        {"train.keep_best": True, "train.monitor": "val_accuracy"},
    ],
)
def test_callbacks_act_in_the_compiled_loop(tmp_path, extra):
    data = prepared_digits(tmp_path / "prepared")
    # A rate high enough that validation loss stops improving quickly.
    p = small(**{"train.epochs": 12, "optimizer.learning_rate": 0.05, **extra})
    summary = run_train(p, data, tmp_path)
    lrs = [
        float(r.split("\t")[1])
        for r in (tmp_path / "live/plots/metrics/learning_rate.tsv").read_text().splitlines()[1:]
    ]
    if "train.early_stopping" in extra:
        assert summary["epochs_run"] < 12
    elif "schedule" in extra:
        assert min(lrs) < max(lrs) == pytest.approx(0.05), lrs
    else:
        val = [
            float(r.split("\t")[1])
            for r in (tmp_path / "live/plots/metrics/val/accuracy.tsv").read_text().splitlines()[1:]
        ]
        assert summary["best_epoch"] == int(np.argmax(val)) + 1
        assert summary["val_accuracy"] == pytest.approx(max(val), abs=1e-6)


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
def test_train_stage_holds_the_data_about_once():
    # A memory regression guard (benchmarks/train_memory.py gives the CIFAR-10-sized figure):
    # beyond the fixed cost of Python, JAX and XLA, the stage's peak grows by about one copy of
    # the data it trains on; 1.3 leaves room for allocator noise, not for a second copy.
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_memory", REPO / "benchmarks/train_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(n=20_000)
    assert result["data_mb"] == 234
    assert result["ratio_above_fixed"] < 1.3, result


# --- watching it learn: progress, live logs, diagnostics ---------------------------------------
def test_progress_prints_a_line_per_epoch_and_a_bar_inside_slow_epochs():
    import io

    from optlab.training.callbacks import Progress

    out = io.StringIO()
    progress = Progress(epochs=12, stream=out)
    progress.on_epoch_begin(0)
    for done in range(1, 101):
        progress.steps_done(done, 100)  # a fast epoch: no bar
    logs = {"loss": 0.5, "accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85, "learning_rate": 1e-3}
    progress.on_epoch_end(0, logs)
    progress.SLOW = 0.0  # as if every quarter took long
    progress.on_epoch_begin(1)
    for done in range(1, 101):
        progress.steps_done(done, 100)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(
        "epoch  1/12: loss 0.5000, accuracy 0.8000; val loss 0.4000, val accuracy 0.8500; lr 0.001"
    )
    bars = lines[1:]
    assert [b.split("]")[1].split("%")[0].strip() for b in bars] == ["25", "50", "75"], bars
    assert all(b.startswith("  epoch  2/12 [") and "of 100 steps" in b for b in bars)


def test_chunk_plan_is_a_pure_function_of_the_step_count():
    from optlab.training.engine import chunk_plan

    assert chunk_plan(0) == [] and chunk_plan(100, most=256) == [100]
    assert chunk_plan(1687, most=256) == [241] * 7  # 1687 = 7 x 241: one program for every chunk
    assert chunk_plan(1031, most=256) == [256, 256, 256, 256, 7]  # a prime: equal chunks and a rest
    assert all(sum(chunk_plan(n, 64)) == n and max(chunk_plan(n, 64)) <= 64 for n in range(1, 500))


def test_chunks_and_diagnostics_do_not_change_what_is_trained(monkeypatch, tmp_path):
    import jax.numpy as jnp

    from optlab.training import engine as compiled
    from optlab.training.loop import epoch_order

    train_split = files.load_prepared(prepared_digits(tmp_path / "prepared"), ("train",)).splits["train"]
    weights = []
    for most, diagnostics in ((1 << 30, False), (7, False), (5, True)):
        monkeypatch.setattr(compiled, "CHUNK_STEPS", most)
        model = Member.build(small(**{"train.batch_size": 16}), (64,), 10, 4).model
        engine = Engine([model], 16, 1024, diagnostics)
        for epoch in range(2):
            order = epoch_order(0, epoch, len(train_split.y))[None]
            engine.train_epoch(jnp.asarray(train_split.x), jnp.asarray(train_split.y), order)
        weights.append(np.concatenate([w.ravel() for w in model.get_weights()]))
    assert all(np.array_equal(weights[0], w) for w in weights[1:])  # bit-identical


def test_dead_units_of_a_layer_whose_biases_are_very_negative(tmp_path):
    import jax.numpy as jnp

    train_split = files.load_prepared(prepared_digits(tmp_path / "prepared"), ("train",)).splits["train"]
    x, y = jnp.asarray(train_split.x), jnp.asarray(train_split.y)
    p = small(**{"model.hidden": [64, 32], "model.dropout": 0.0, "optimizer.learning_rate": 1e-6,
                 "schedule": "constant"})  # fmt: skip
    model = Member.build(p, (64,), 10, 4).model
    engine = Engine([model], 64, 1024, diagnostics=True)
    engine.probe = x[:256]
    engine.train_epoch(x, y, np.arange(len(y), dtype=np.int32)[None])
    (alive,) = engine.last_epoch
    assert set(alive) == {"dense1", "dense2", "output"} and alive["output"].dead_fraction is None
    assert alive["dense1"].dead_fraction < 0.5
    first = next(layer for layer in model.layers if isinstance(layer, keras.layers.Dense))
    first.bias.assign(np.full(64, -100.0, "float32"))  # no image can activate these units
    engine.train_epoch(x, y, np.arange(len(y), dtype=np.int32)[None])
    (dead,) = engine.last_epoch
    assert dead["dense1"].dead_fraction == 1.0
    assert all(d.grad_norm >= 0 and d.weight_norm > 0 for d in dead.values())


@pytest.mark.slow  # stage processes that train: `make test`, not test-fast
def test_the_live_directory_grows_epoch_by_epoch_and_says_when_it_is_complete(tmp_path):
    data = prepared_digits(tmp_path / "prepared")
    # Epochs long enough (about a second each) to be seen one by one, short enough for the suite.
    params = repo_params(**{"dataset": "digits", "train.epochs": 12, "model.hidden": [512, 512], "train.batch_size": 8,
                            "train.sharpness_images": 0, "train.noise_scale_images": 0})  # fmt: skip
    write_params(tmp_path / "params.yaml", params)
    cmd = [sys.executable, str(REPO / "stages" / "train.py"), *train_args(data)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    curve, seen, deadline = tmp_path / "live/plots/metrics/val/accuracy.tsv", {}, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            rows = len(curve.read_text().splitlines()) - 1
            status = json.loads((tmp_path / "live/run.json").read_text())["status"]
        except (FileNotFoundError, ValueError, KeyError):
            rows, status = 0, None
        if rows > 0 and not (tmp_path / "models/model.keras").exists():
            seen[rows] = status
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    mid_run = {rows: status for rows, status in seen.items() if rows < 12}
    assert len(mid_run) >= 3, f"the history should grow while training runs: {seen}"
    assert set(mid_run.values()) == {"running"}, seen
    assert json.loads((tmp_path / "live/run.json").read_text())["status"] == "complete"
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch")] == [
        f"epoch {e:>2}/12" for e in range(1, 13)
    ]


def test_the_diagnostics_explain_adam_at_0_1_on_fashion_mnist(fashion_mnist_prepared, tmp_path):
    # Report 003's failed recipe with optimizer=adam, learning rate 0.1: the first epoch's updates
    # are far larger relative to the weights than the default run's, and the run collapses.
    runs = {}
    # Two epochs of the default run (its first epoch is the 20-epoch run's: the warm-up does not
    # depend on the epoch count); the whole of the other, which stops when it collapses.
    for name, knobs in (("default", {"train.epochs": 2}), ("adam 0.1", {"optimizer.learning_rate": 0.1})):
        p = validate_params(repo_params(**knobs))
        runs[name] = train.run(p, fashion_mnist_prepared, tmp_path / name / "m.keras", tmp_path / name / "live",
                               tmp_path / "backup", tmp_path / "logs", progress=False)  # fmt: skip
    default, fast = runs["default"], runs["adam 0.1"]
    ratio = fast["first_epoch_update_ratio"] / default["first_epoch_update_ratio"]
    print(f"\n[record] epoch-1 update/weight ratio: default {default['first_epoch_update_ratio']:.2e}, "
          f"adam 0.1 {fast['first_epoch_update_ratio']:.2e} ({ratio:.0f}x)")  # fmt: skip
    assert ratio >= 10, (default, fast)
    # Where it collapses depends on the CPU's float arithmetic (epoch 2 on one 2-core machine, 4 on
    # another); that it stops long before its 20 epochs does not.
    assert default["diverged"] == 0 and fast["diverged"] == 1 and fast["diverged_epoch"] <= 10, fast
    assert fast["dead_unit_fraction"] > 0.5 > default["dead_unit_fraction"]
