"""The train stage's work: load prepared data, build, fit, log with dvclive, save.

Outputs appear only when training succeeded: dvclive writes into a temporary directory that
replaces the live directory at the end, and the model is renamed into place last. A run that
is killed leaves a per-epoch backup outside DVC's outputs (``.optlab/backup/``), and the next
run with the same params and data resumes from its last completed epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import zipfile
from pathlib import Path

import keras
import numpy as np

from optlab import loop
from optlab.errors import OptlabError
from optlab.models import trainable_params
from optlab.optim import mode
from optlab.outputs import atomic_dir, atomic_file, remove_outputs, temporaries
from optlab.params import Params

BACKUP_ROOT = Path(".optlab/backup")  # resumable state; git-ignored, not a DVC output
LIVE_METRICS = ("loss", "accuracy")


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise OptlabError(f"{path} not found: the prepared data is missing; run `dvc repro` to create it")
    return json.loads(path.read_text())


def check_data(meta: dict, params: Params) -> None:
    """Refuse data prepared for another experiment (e.g. a dataset switched by hand)."""
    if meta.get("dataset") != params.dataset:
        raise OptlabError(
            f"the prepared data is {meta.get('dataset')!r} but params.yaml says dataset: {params.dataset}; "
            f"run `dvc repro` so download and prepare run again for {params.dataset}"
        )


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(data_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every prepared file: recorded with the model, and the key of the backup."""
    d = Path(data_dir)
    return {p.name: _file_digest(p) for p in sorted(d.iterdir()) if p.is_file()}


def run_info(params: Params, fingerprint: dict[str, str]) -> dict:
    """What produced this model: enough to re-create it or explain why it differs."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("keras", "jax", "jaxlib", "tensorflow", "numpy", "dvc", "dvclive", "optlab"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {
        "params": params.model_dump(),
        "backend": keras.backend.backend(),
        "loop": params.train.loop,
        "threads": os.environ.get("OPTLAB_THREADS", "0"),
        "versions": versions,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "data_sha256": fingerprint,
    }


def _renumber_shared_objects(config, ids: dict | None = None):
    """Replace Keras's ``shared_object_id`` values (Python ``id()``s, i.e. memory addresses)
    by 1, 2, ... in order of appearance; equal ids stay equal, so sharing is preserved."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {
            k: ids.setdefault(v, len(ids) + 1) if k == "shared_object_id" else _renumber_shared_objects(v, ids)
            for k, v in config.items()
        }
    if isinstance(config, list):
        return [_renumber_shared_objects(v, ids) for v in config]
    return config


def save_model(model: keras.Model, path: str | Path) -> None:
    """Save a ``.keras`` file whose bytes depend only on the model.

    Keras stamps the save time into ``metadata.json`` and the zip entries; identical runs would
    then produce different files and DVC would rerun every stage downstream. The weights file
    itself is already byte-stable.
    """
    with tempfile.TemporaryDirectory() as scratch, atomic_file(path) as tmp:
        raw = Path(scratch) / "model.keras"
        model.save(raw)
        with zipfile.ZipFile(raw) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in sorted(src.namelist()):
                data = src.read(name)
                if name == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                elif name == "config.json":
                    data = json.dumps(_renumber_shared_objects(json.loads(data))).encode()
                dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)


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
    count and current rate, so a resumed run follows exactly the path of an uninterrupted one.
    One file, because replacing a file is atomic: a kill at any moment leaves either the
    previous epoch's backup or this one, never neither.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / f"{key}.npz"
        self.root = root

    @staticmethod
    def _variables(model: keras.Model) -> list:
        model.optimizer.build(model.trainable_variables)
        return [*model.trainable_variables, *model.non_trainable_variables, *model.optimizer.variables]

    def save(self, model: keras.Model, history: loop.History) -> None:
        values = {f"v{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(self._variables(model))}
        state = json.dumps({"epochs": history.epochs, "seconds": history.seconds})
        with atomic_file(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, history=np.array(state), **values)

    def load(self, model: keras.Model) -> loop.History | None:
        remove_outputs(*temporaries(self.path))  # a save cut short by a kill; the last whole one stays
        if not self.path.is_file():
            return None
        variables = self._variables(model)
        with np.load(self.path) as saved:
            if len(saved.files) != len(variables) + 1:
                return None  # another architecture under the same key: start afresh
            for i, var in enumerate(variables):
                var.assign(saved[f"v{i}"])
            state = json.loads(str(saved["history"]))
        return loop.History(epochs=state["epochs"], seconds=state["seconds"])

    def clear(self) -> None:
        remove_outputs(self.path)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


# --- the stage ------------------------------------------------------------------------------
def _callbacks(params: Params, scratch: Path) -> tuple[list[keras.callbacks.Callback], Path | None]:
    callbacks: list[keras.callbacks.Callback] = []
    es = params.train.early_stopping
    if es.enabled:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=es.monitor, mode=mode(es.monitor), patience=es.patience, restore_best_weights=es.restore_best_weights
            )
        )
    best_path = None
    kb = params.train.keep_best
    if kb.enabled:
        best_path = scratch / "best.weights.h5"
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                best_path, monitor=kb.monitor, mode=mode(kb.monitor), save_best_only=True, save_weights_only=True
            )
        )
    if params.train.tensorboard:
        # TensorBoard logs sit outside DVC's outputs; compare runs with `tensorboard --logdir logs`.
        run_name = os.environ.get("DVC_EXP_NAME") or f"{params.optimizer}-{params.schedule}-seed{params.seed}"
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(Path("logs") / run_name)))
    return callbacks, best_path


def best_epoch(history: loop.History, params: Params) -> int:
    """1-based epoch with the best monitored validation metric."""
    monitor = params.train.keep_best.monitor if params.train.keep_best.enabled else params.train.early_stopping.monitor
    values = history.column(monitor)
    pick = np.argmin if monitor.endswith("loss") else np.argmax
    return int(pick(values)) + 1


def _write_live(live_dir: Path, history: loop.History, summary: dict, info: dict) -> None:
    """Log the per-epoch history with dvclive, into a directory that appears whole or not at all."""
    from dvclive import Live

    with atomic_dir(live_dir) as tmp:
        with Live(dir=str(tmp), save_dvc_exp=False, dvcyaml=None, report=None) as live:
            for logs in history.epochs:
                for name in LIVE_METRICS:
                    live.log_metric(f"train/{name}", logs[name])
                    live.log_metric(f"val/{name}", logs[f"val_{name}"])
                live.log_metric("learning_rate", logs["learning_rate"])
                live.next_step()
            for key, value in summary.items():
                live.log_metric(key, value, plot=False)
        (tmp / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def run(params: Params, data_dir: str | Path, model_path: str | Path, live_dir: str | Path, backup_root: Path = BACKUP_ROOT) -> dict:
    """Train as ``params`` says; write the model and the dvclive directory. Returns the summary."""
    model_path, live_dir = Path(model_path), Path(live_dir)
    meta = read_meta(data_dir)
    check_data(meta, params)
    # Stale outputs go first: a failure below must not leave an old model beside new metrics.
    remove_outputs(model_path, live_dir)

    train_split, val_split = loop.load_split(data_dir, "train"), loop.load_split(data_dir, "val")
    n_classes = len(meta["classes"])
    model, steps = loop.build(params, train_split.x.shape[1:], n_classes, len(train_split.y))
    fingerprint = data_fingerprint(data_dir)
    backup = Backup(backup_root, backup_key(params, fingerprint))
    resumed = backup.load(model)
    # Counted now: fit() appends this run's epochs to the very History object it resumes.
    epochs_before = len(resumed.epochs) if resumed is not None else 0
    if resumed is not None:
        print(f"resuming from the backup of epoch {epochs_before} in {backup.path}")

    with tempfile.TemporaryDirectory() as scratch:
        callbacks, best_path = _callbacks(params, Path(scratch))
        history = loop.fit(
            model,
            train_split,
            val_split,
            params,
            steps,
            callbacks=callbacks,
            history=resumed,
            on_epoch=lambda epoch, logs, h: backup.save(model, h),
        )
        if best_path is not None and best_path.exists():
            model.load_weights(best_path)

    # Seed 003's warning: the running accuracy above averages over changing weights and
    # dropout. Measure the final weights in inference mode too.
    inference = {
        split: loop.evaluate(model, s, params)["accuracy"] for split, s in (("train", train_split), ("val", val_split))
    }
    # Let go of the data before writing the outputs (dvclive's import alone is about 40 MB),
    # so the end of the run does not add to the peak set while training.
    del train_split, val_split
    run_seconds = history.seconds[epochs_before:]
    summary = {
        "trainable_params": trainable_params(model),
        "epochs_run": len(history.epochs),
        "best_epoch": best_epoch(history, params),
        "train_seconds": round(float(sum(history.seconds)), 3),
        # Steady state: the first epoch of a process includes compiling the XLA program.
        # (A run resumed after its last epoch trained none here: fall back to the backup's times.)
        "seconds_per_epoch": round(float(np.median(run_seconds[1:] or run_seconds or history.seconds)), 4),
        "first_epoch_seconds": round(float(run_seconds[0]), 3) if run_seconds else 0.0,
        "inference_train_accuracy": inference["train"],
        "inference_val_accuracy": inference["val"],
    }
    _write_live(live_dir, history, summary, run_info(params, fingerprint))
    save_model(model, model_path)  # last: its presence means the run completed
    backup.clear()
    return summary
