"""The train stage's work: load prepared data, build, fit, log with dvclive, save.

Outputs appear only when training succeeded: dvclive writes into a temporary directory that
replaces the live directory at the end, and the model is renamed into place last. A run that
is killed leaves a per-epoch backup outside DVC's outputs, and the next run with the same
params and data resumes from its last completed epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

from optlab.backend import require_chosen

require_chosen(__name__)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from optlab import artifacts  # noqa: E402
from optlab.backend import Engine  # noqa: E402
from optlab.errors import OptlabError  # noqa: E402
from optlab.loop import History, KeepBest, Loop, Progress  # noqa: E402
from optlab.models import trainable_params  # noqa: E402
from optlab.optim import mode  # noqa: E402
from optlab.outputs import atomic_file, remove_outputs, temporaries  # noqa: E402
from optlab.params import Params  # noqa: E402


def run_info(params: Params, engine: Engine, fingerprint: dict[str, str]) -> dict:
    """What produced this model: enough to re-create it or explain why it differs."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("keras", "jax", "jaxlib", "tensorflow", "numpy", "dvc", "dvclive", "optlab"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {
        "params": params.model_dump(),
        "backend": engine.backend,
        "loop": engine.loop,
        "engine_rule": engine.rule,
        "threads": os.environ.get("OPTLAB_THREADS", "0"),
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "data_sha256": fingerprint,
    }


# --- resuming --------------------------------------------------------------------------------
def backup_key(params: Params, fingerprint: dict[str, str]) -> str:
    """Resume only into a run with the same training params and the same data."""
    train_params = params.model_dump(exclude={"evaluate", "plot", "prepare", "dataset"})
    blob = json.dumps({"params": train_params, "data": fingerprint, "backend": keras.backend.backend()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Backup:
    """The state after the last completed epoch, and the history up to it, in one file.

    Every variable is saved: weights, batch-norm statistics, the dropout layers' RNG state
    (which ``get_weights()`` and ``.keras`` files leave out) and the optimizer's moments, step
    count and current rate, and keep_best's best weights so far, so a resumed run follows exactly
    the path of an uninterrupted one. One file, because replacing a file is atomic: a kill at any
    moment leaves either the previous epoch's backup or this one, never neither.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / f"{key}.npz"
        self.root = root

    @staticmethod
    def _variables(model: keras.Model) -> list:
        model.optimizer.build(model.trainable_variables)
        return [*model.trainable_variables, *model.non_trainable_variables, *model.optimizer.variables]

    def save(self, model: keras.Model, history: History, keep_best: KeepBest | None = None) -> None:
        values = {f"v{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(self._variables(model))}
        best = keep_best.best if keep_best is not None and keep_best.best is not None else []
        values |= {f"b{i}": w for i, w in enumerate(best)}
        state = {"epochs": history.epochs, "seconds": history.seconds, "diagnostics": history.diagnostics}
        state["best_value"] = keep_best.best_value if keep_best is not None else None
        with atomic_file(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, history=np.array(json.dumps(state)), **values)

    def load(self, model: keras.Model, keep_best: KeepBest | None = None) -> History | None:
        remove_outputs(*temporaries(self.path))  # a save cut short by a kill; the last whole one stays
        if not self.path.is_file():
            return None
        variables = self._variables(model)
        with np.load(self.path) as saved:
            n_best = sum(f.startswith("b") for f in saved.files)
            if sum(f.startswith("v") for f in saved.files) != len(variables) or n_best not in (0, len(model.weights)):
                return None  # another architecture under the same key: start afresh
            for i, var in enumerate(variables):
                var.assign(saved[f"v{i}"])
            state = json.loads(str(saved["history"]))
            if keep_best is not None and n_best:
                keep_best.best_value, keep_best.best = state["best_value"], [saved[f"b{i}"] for i in range(n_best)]
        return History(epochs=state["epochs"], seconds=state["seconds"], diagnostics=state.get("diagnostics", []))

    def clear(self) -> None:
        remove_outputs(self.path)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


# --- the stage ------------------------------------------------------------------------------
def _callbacks(params: Params, loop: Loop, logs_dir: Path) -> tuple[list[keras.callbacks.Callback], KeepBest | None]:
    callbacks: list[keras.callbacks.Callback] = []
    t = params.train
    if t.early_stopping:
        # keep_best restores the best epoch's weights whether or not training stops early.
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor=t.monitor, mode=mode(t.monitor), patience=t.early_stopping)
        )
    keep_best = KeepBest(t.monitor, loop.all_evaluation_weights) if t.keep_best else None
    callbacks += [keep_best] if keep_best else []
    if t.tensorboard:
        # TensorBoard logs sit outside DVC's outputs; compare runs with `tensorboard --logdir logs`.
        name = os.environ.get("DVC_EXP_NAME") or f"{params.optimizer.name}-{params.schedule.name}-seed{params.seed}"
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(logs_dir / name)))
    return callbacks, keep_best


def best_epoch(history: History, params: Params) -> int:
    """1-based epoch with the best ``train.monitor`` (a diverged epoch's NaN never wins)."""
    monitor = params.train.monitor
    values = np.array(history.column(monitor), dtype=float)
    if np.isnan(values).all():
        return len(values)
    return int(np.nanargmin(values) if monitor.endswith("loss") else np.nanargmax(values)) + 1


def _finite(model: keras.Model) -> bool:
    return all(np.isfinite(keras.ops.convert_to_numpy(v.value)).all() for v in model.trainable_variables)


def _keep_last_finite_weights(loop: Loop, backup: Backup, meta: artifacts.PreparedMeta, n_train: int) -> str:
    """After a diverged epoch, the model's weights are its own if finite, else the last epoch's
    (from the resume backup), else the initial ones. Says which."""
    if _finite(loop.model):
        return "the diverged epoch's own weights (finite)"
    restored = backup.load(loop.model)
    if restored is not None:
        return f"the weights after epoch {len(restored.epochs)}, the last finite one"
    fresh = Loop.build(loop.params, meta.input_shape, len(meta.classes), n_train)  # same seed: same initial weights
    loop.model.set_weights(fresh.model.get_weights())
    loop.finished = True  # the optimizer's state is the diverged one: these weights are saved as they are
    return "the initial weights (the first epoch already diverged)"


def diagnostics_summary(history: History) -> dict[str, float]:
    """The two diagnostics `dvc exp show` gets as columns (the per-layer curves are plots): the
    largest update/weight ratio of the first epoch, and the largest dead ReLU fraction at the end."""
    if not history.diagnostics:
        return {}
    first, last = history.diagnostics[0], history.diagnostics[-1]
    dead = [d["dead_fraction"] for d in last.values() if d["dead_fraction"] is not None]
    summary = {"first_epoch_update_ratio": max(d["update_ratio"] for d in first.values())}
    if dead:
        summary["dead_unit_fraction"] = max(dead)
    return summary


def run(
    params: Params,
    data_dir: str | Path,
    model_path: str | Path,
    live_dir: str | Path,
    backup_dir: str | Path,
    logs_dir: str | Path,
    progress: bool = True,
) -> dict:
    """Train as ``params`` says; write the model and the dvclive directory. Returns the summary.

    ``backup_dir`` holds the per-epoch resume state, ``logs_dir`` the TensorBoard logs (both
    outside DVC's outputs); ``progress`` prints a line per epoch as it ends."""
    model_path, live_dir = Path(model_path), Path(live_dir)
    meta = artifacts.prepared_meta(data_dir)
    if meta.dataset != params.dataset:
        raise OptlabError(
            f"the prepared data is {meta.dataset!r} but params.yaml says dataset: {params.dataset}; "
            f"run `dvc repro` so download and prepare run again for {params.dataset}"
        )
    # Stale outputs go first: a failure below must not leave an old model beside new metrics.
    remove_outputs(model_path, live_dir)

    data = artifacts.load_prepared(data_dir, ("train", "val"))
    train_split, val_split = data.splits["train"], data.splits["val"]
    loop = Loop.build(params, meta.input_shape, len(meta.classes), len(train_split.y))
    model = loop.model
    fingerprint = artifacts.fingerprint(data_dir)
    backup = Backup(Path(backup_dir), backup_key(params, fingerprint))
    callbacks, keep_best = _callbacks(params, loop, Path(logs_dir))
    resumed = backup.load(model, keep_best)
    # Counted now: fit() appends this run's epochs to the very History object it resumes.
    epochs_before = len(resumed.epochs) if resumed is not None else 0
    if resumed is not None:
        print(f"resuming from the backup of epoch {epochs_before} in {backup.path}", flush=True)
    if params.train.diagnostics and loop.engine is None:
        print(
            f"note: no backprop diagnostics on train.loop {loop.choice.loop} (they are computed inside the compiled "
            "epoch); train with -S train.backend=jax -S train.loop=compiled to get them",
            flush=True,
        )
    info = run_info(params, loop.choice, fingerprint)
    log = artifacts.TrainLog(live_dir, info)
    try:
        # A resumed run's live directory starts again from the backup's epochs.
        for i, logs in enumerate(resumed.epochs if resumed is not None else []):
            log.log_epoch(logs, resumed.diagnostics[i] if i < len(resumed.diagnostics) else None)

        def on_epoch(epoch: int, logs: dict, history: History) -> None:
            if not history.diverged:  # a resume never starts from a diverged state
                backup.save(model, history, keep_best)
            log.log_epoch(logs, history.diagnostics[-1] if history.diagnostics else None)

        shown = Progress(params.train.epochs) if progress else None
        history = loop.fit(train_split, val_split, callbacks, history=resumed, on_epoch=on_epoch, progress=shown)
        kept = _keep_last_finite_weights(loop, backup, meta, len(train_split.y)) if history.diverged else ""
        # The weights to save: keep_best's best epoch, or the last one's evaluation weights.
        loop.finish(keep_best)

        # Report 003's warning: the running accuracy above averages over changing weights and
        # dropout. Measure the final weights in inference mode too.
        inference = {n: loop.measure(split)["accuracy"] for n, split in (("train", train_split), ("val", val_split))}
        # Let go of the data before writing the outputs, so the end of the run does not add to
        # the peak set while training.
        del data, train_split, val_split
        run_seconds = history.seconds[epochs_before:]
        summary = {
            "trainable_params": trainable_params(model),
            "epochs_run": len(history.epochs),
            "best_epoch": best_epoch(history, params),
            # Measured on the model saved, in inference mode (report 003's warning): the running
            # averages Keras logs per epoch are curves in the history, not these.
            "train_accuracy": inference["train"],
            "val_accuracy": inference["val"],
            "diverged": int(bool(history.diverged)),
            **({"diverged_epoch": len(history.epochs)} if history.diverged else {}),
            **diagnostics_summary(history),
        }
        # Timings differ on every run: kept with the run's provenance, not among its metrics, so
        # an identical rerun changes no metric and reruns nothing downstream.
        timings = {
            "train_seconds": round(float(sum(history.seconds)), 3),
            # Steady state: the first epoch of a process includes compiling the XLA program.
            # (A run resumed after its last epoch trained none here: fall back to the backup's times.)
            "seconds_per_epoch": round(float(np.median(run_seconds[1:] or run_seconds or history.seconds)), 4),
            "first_epoch_seconds": round(float(run_seconds[0]), 3) if run_seconds else 0.0,
        }
        log.finish(summary, {**info, "timings": timings, **({"diverged": history.diverged} if kept else {})})
        artifacts.save_model(model, model_path)  # last: its presence means the run completed
    except BaseException:
        log.abandon()  # nothing half-written: a failed run records nothing
        raise
    backup.clear()
    if history.diverged:
        print(
            f"warning: {history.diverged}\nRecorded as a result (train.on_divergence: record): the curves up to "
            f"epoch {len(history.epochs)} are in {live_dir}, the model holds {kept}; set "
            "train.on_divergence: fail to stop the pipeline instead.",
            file=sys.stderr,
            flush=True,
        )
    return {**summary, **timings}
