"""A training run's record, and the one module that knows its files: the model files and the
dvclive directory (train -> evaluate, plot, compare).

:class:`TrainLog` writes the dvclive directory epoch by epoch while the run goes; the readers
give its history, diagnostics and per-replica figures back as pandas tables. No Keras at module
level: the plot stage and the study tools read runs too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optlab.core.errors import OptlabError
from optlab.core.outputs import atomic_file, remove_outputs, write_json
from optlab.data.files import PreparedMeta

SUMMARY = "metrics.json"  # dvclive's summary: the last epoch's values and the run's figures
RUN_INFO = "run.json"  # what produced the model: params, versions, data hashes, timings
REPLICAS = "replicas.json"  # each replica's own figures (seed, epochs, accuracies, divergence)
REPLICA_HISTORY = "replicas"  # under HISTORY_DIR: replicas/r<k>/<metric>.tsv, with 2 replicas or more
# Left out of dvclive's import in a train process (see TrainLog): what dvclive imports only to
# accept pandas DataFrames, which optlab never logs.
DVCLIVE_EXTRAS = ("pandas",)
HISTORY_DIR = "plots/metrics"  # dvclive's per-epoch TSVs, one per metric
LEARNING_RATE = "learning_rate"
TRAJECTORY = "trajectory.npz"  # in the run's logs directory, outside DVC's outputs (train.trajectory)


def history_name(key: str) -> str:
    """The dvclive metric a history column is logged as: ``loss`` -> ``train/loss``, ``val_loss`` ->
    ``val/loss``, ``learning_rate`` as it is (its TSV under HISTORY_DIR)."""
    if key == LEARNING_RATE:
        return key
    return f"val/{key[len('val_') :]}" if key.startswith("val_") else f"train/{key}"


def history_file(live_dir: str | Path, key: str) -> Path:
    """The TSV dvclive writes for the history column ``key`` (``val_accuracy``, ``loss``, ...)."""
    return Path(live_dir) / HISTORY_DIR / f"{history_name(key)}.tsv"


# Per-layer curves, logged as f"{DIAGNOSTICS}/{kind}/{layer}" beside the history: plots only,
# never summary columns (dvc exp show stays readable).
DIAGNOSTICS = "diagnostics"
DIAGNOSTIC_KINDS = ("grad_norm", "weight_norm", "update_ratio", "dead_fraction")
# The whole model's curves, logged as f"{DIAGNOSTICS}/{name}" (optlab.training.hessian): the top
# Hessian eigenvalue and its stability threshold, the same preconditioned (adaptive optimizers), and
# the gradient noise scale B_simple with its two parts, tr(Σ) and |G|².
CURVATURE = ("sharpness", "stability_threshold", "preconditioned_sharpness", "preconditioned_threshold",
             "noise_scale", "gradient_noise", "gradient_signal")  # fmt: skip


def cpu_model() -> str:
    """The processor's name: XLA compiles its CPU programs for the CPU it runs on, so the last bits
    of a run's floats (and its metrics) can differ between CPU models, never between reruns on one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_info(params: Any, engine: Any, fingerprint: dict[str, str]) -> dict:
    """What produced this model (RUN_INFO): the params, the backend and loop and the rule that chose
    them (an ``optlab.training.backend.Engine``), versions, threads, the CPU, the prepared data's
    hashes; enough to re-create it or explain why it differs."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("keras", "jax", "jaxlib", "tensorflow", "numpy", "dvc", "dvclive", "optlab"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    return {
        "params": params.model_dump(), "backend": engine.backend, "loop": engine.loop, "engine_rule": engine.rule,
        "threads": os.environ.get("OPTLAB_THREADS", "0"), "versions": versions, "python": platform.python_version(),
        "machine": platform.machine(), "cpu": cpu_model(), "data_sha256": fingerprint,
    }  # fmt: skip


class TrainLog:
    """A training run's dvclive directory, written epoch by epoch while the run goes, so that
    `dvc exp show`, `dvc plots show` and DVC's VS Code extension can follow it.

    dvclive's step is the epoch, counted from 1 as ``best_epoch`` and the figures count it.
    While training, the directory holds the history so far, dvclive's running summary (the
    last epoch's values and its ``step``) and a RUN_INFO whose ``status`` is ``"running"``; a
    killed run leaves it so (recognisably incomplete, and DVC records nothing: it writes
    dvc.lock only when the stage succeeds), and the next run, or its resume, replaces the whole
    directory. :meth:`finish` replaces the summary by the run's own figures, the columns
    ``dvc exp show`` gets (the per-epoch values are curves, not columns), and writes the final
    RUN_INFO (``"complete"``); :meth:`abandon` removes everything when the run fails.
    """

    def __init__(self, live_dir: str | Path, info: Mapping[str, Any], replicas: int = 1) -> None:
        from optlab.training.backend import hidden

        # pandas is optional to dvclive (its DataFrame inputs; it guards the import), and optlab logs
        # only numbers: kept out of dvclive's import, a train process skips it (0.3 s).
        with hidden(DVCLIVE_EXTRAS):
            from dvclive import Live

        self.dir, self.replicas = Path(live_dir), replicas
        remove_outputs(self.dir)
        self.live = Live(dir=str(self.dir), save_dvc_exp=False, dvcyaml=None, report=None)
        self.live.step = 1  # the first epoch (dvclive's documented setter; it would start at 0)
        self.logged = 0  # epochs whose (mean) row is written
        self._info(info, "running")

    def _info(self, info: Mapping[str, Any], status: str) -> None:
        write_json(self.dir / RUN_INFO, {**info, "status": status})

    def log_epoch(self, logs: Mapping[str, float], diagnostics: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """The next epoch's row of the history (with replicas, their mean), and dvclive's summary."""
        self.logged += 1
        self.live.step = self.logged
        self._log(logs, diagnostics, "")
        for key in (DIAGNOSTICS, REPLICA_HISTORY):
            self.live.summary.pop(key, None)  # documented: Live.summary "can be modified manually"
        self.live.next_step()

    def _log(self, logs: Mapping[str, float], diagnostics: Mapping[str, Mapping[str, Any]] | None, prefix: str):
        for key, value in logs.items():
            self.live.log_metric(f"{prefix}{history_name(key)}", value)
        for layer, values in (diagnostics or {}).items():
            if not isinstance(values, Mapping):  # a whole-model series (CURVATURE)
                if values is not None:
                    self.live.log_metric(f"{prefix}{DIAGNOSTICS}/{layer}", values)
                continue
            for kind, value in values.items():
                if value is not None:
                    self.live.log_metric(f"{prefix}{DIAGNOSTICS}/{kind}/{layer}", value)

    def log_replica(self, r: int, epoch: int, logs: Mapping[str, float], diagnostics=None) -> None:
        """Replica ``r``'s row for ``epoch`` (from 1), under replicas/r<r>/ (nothing for one replica)."""
        if self.replicas < 2:
            return
        self.live.step = epoch
        self._log(logs, diagnostics, f"{REPLICA_HISTORY}/r{r}/")
        self.live.step = self.logged + 1

    def log_means(self, histories: Sequence[Any], final: bool = False) -> None:
        """The mean rows of every epoch that each replica has run or will never run (it stopped
        before); ``final``: every epoch any replica ran. One replica: its own rows."""
        while True:
            e = self.logged + 1
            ran = [h for h in histories if len(h.epochs) >= e]
            waiting = [h for h in histories if len(h.epochs) < e and not h.stopped]
            if not ran or (waiting and not final):
                return
            logs = {k: float(np.mean([h.epochs[e - 1][k] for h in ran])) for k in ran[0].epochs[e - 1]}
            diagnosed = [h.diagnostics[e - 1] for h in ran if len(h.diagnostics) >= e]
            self.log_epoch(logs, _mean_diagnostics(diagnosed) if diagnosed else None)

    def log_members(self, epoch: int, histories: Sequence[Any]) -> None:
        """After ``epoch`` (from 0): each member's row, for those that ran it, and the mean rows."""
        for r, h in enumerate(histories):
            if len(h.epochs) == epoch + 1:
                self.log_replica(r, epoch + 1, h.epochs[-1], h.diagnostics[-1] if h.diagnostics else None)
        self.log_means(histories)

    def replay(self, histories: Sequence[Any]) -> None:
        """The rows of epochs run before (a resumed run's, from its backup)."""
        for r, h in enumerate(histories):
            for i, logs in enumerate(h.epochs):
                self.log_replica(r, i + 1, logs, h.diagnostics[i] if i < len(h.diagnostics) else None)
        self.log_means(histories)

    def finish(self, summary: Mapping[str, Any], info: Mapping[str, Any], replicas: Sequence[Mapping]) -> None:
        self.live.end()
        # dvclive's Live.summary "can be modified manually", but make_summary always adds the
        # step: the final summary is written here, after dvclive's last write.
        write_json(self.dir / SUMMARY, dict(summary))
        write_json(self.dir / REPLICAS, list(replicas))
        self._info(info, "complete")

    def abandon(self) -> None:
        remove_outputs(self.dir)


def _mean(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _mean_diagnostics(diagnosed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The replicas' mean of each per-layer diagnostic, and of each whole-model series all of them
    measured (None where one of them has none: a ReLU-less layer, an undefined noise scale)."""
    first = diagnosed[0]
    layers = {layer: {kind: _mean([d[layer][kind] for d in diagnosed]) for kind in values}
              for layer, values in first.items() if isinstance(values, Mapping)}  # fmt: skip
    series = {k: _mean([d.get(k) for d in diagnosed]) for k, v in first.items() if not isinstance(v, Mapping)}
    return {**layers, **series}


def read_curvature(live_dir: str | Path) -> Any:
    """The whole-model series a run logged (CURVATURE: sharpness, thresholds, noise scale), as a
    pandas DataFrame with one row per epoch measured (from 1) and one column per series; empty
    when it logged none (the keras loop, or both measurements off)."""
    import pandas as pd

    root = Path(live_dir) / HISTORY_DIR / DIAGNOSTICS
    found = {name: read_series(root / f"{name}.tsv") for name in CURVATURE if (root / f"{name}.tsv").is_file()}
    table = pd.DataFrame(found).sort_index()
    table.index.name = "epoch"
    return table


def read_run_info(live_dir: str | Path, missing_ok: bool = False) -> dict[str, Any]:
    """What the run recorded about itself (RUN_INFO: its params, backend, versions, timings);
    ``missing_ok``: {} when there is none."""
    path = Path(live_dir) / RUN_INFO
    if not path.is_file():
        if missing_ok:
            return {}
        raise OptlabError(f"{path} not found; run `dvc repro train`")
    return json.loads(path.read_text())


def save_trajectory(logs_dir: str | Path, epochs: Sequence[int], weights: Sequence[np.ndarray], params: Any) -> Path:
    """Replica 0's trainable weights (flattened, in ``model.trainable_variables`` order) after each
    of ``epochs`` (0: before the first), with the params that trained them, as TRAJECTORY."""
    path = Path(logs_dir) / TRAJECTORY
    with atomic_file(path) as tmp:
        np.savez(tmp, epochs=np.asarray(epochs, dtype=np.int32), weights=np.stack(weights).astype(np.float32),
                 params=json.dumps(params.model_dump(), sort_keys=True))  # fmt: skip
    return path


def read_trajectory(logs_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(epochs, weights: one row per epoch, params) of TRAJECTORY, or None when there is none."""
    path = Path(logs_dir) / TRAJECTORY
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return saved["epochs"], saved["weights"], json.loads(str(saved["params"]))


def read_diagnostics(live_dir: str | Path) -> dict[str, Any]:
    """kind -> a pandas DataFrame (one row per epoch from 1, one column per layer), for the
    per-layer diagnostics a run logged; empty when it logged none (the keras loop)."""
    import pandas as pd

    root = Path(live_dir) / HISTORY_DIR / DIAGNOSTICS
    found = {}
    for kind in DIAGNOSTIC_KINDS:
        files = sorted((root / kind).glob("*.tsv")) if (root / kind).is_dir() else []
        if files:
            table = pd.DataFrame({f.stem: read_series(f) for f in files}).sort_index()
            table.index.name = "epoch"  # dvclive's step is the epoch, from 1
            found[kind] = table
    return found


def read_replicas(live_dir: str | Path) -> list[dict[str, Any]]:
    """Each replica's own figures, as the train stage wrote them (one entry for one replica)."""
    path = Path(live_dir) / REPLICAS
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro train`")
    return json.loads(path.read_text())


def _history_table(base: Path) -> Any:
    """The per-epoch history under ``base`` (a HISTORY_DIR, or a replica's): one row per epoch from
    1, one column per logged metric (loss, accuracy, ..., val_loss, val_accuracy, ..., learning_rate).
    Every metric is logged on both sides; a file missing on one is named."""
    import pandas as pd

    names = {p.stem for side in ("train", "val") for p in (base / side).glob("*.tsv")} | {"loss"}
    keys = [*sorted(names), *(f"val_{n}" for n in sorted(names)), LEARNING_RATE]
    table = pd.DataFrame({key: read_series(base / f"{history_name(key)}.tsv") for key in keys}).sort_index()
    table.index.name = "epoch"  # dvclive's step is the epoch, from 1 (TrainLog sets it so)
    return table


def read_replica_histories(live_dir: str | Path) -> list[Any]:
    """Each replica's per-epoch history (a DataFrame like :func:`read_history`'s); empty for one
    replica, whose history is the run's."""
    root = Path(live_dir) / HISTORY_DIR / REPLICA_HISTORY
    return [_history_table(root / f"r{r}") for r in range(len(list(root.glob("r*"))) if root.is_dir() else 0)]


def read_series(source: str | Path | io.StringIO) -> Any:
    """A dvclive series (columns step, timestamp and its value), indexed by step, as a pandas Series
    named after its file. A resumed run can log a step twice: its last value is the one kept."""
    import pandas as pd

    if isinstance(source, str | Path) and not Path(source).is_file():
        raise OptlabError(f"{source} not found (the train stage writes it); run `dvc repro train`")
    table = pd.read_csv(source, sep="\t")
    values = [c for c in table.columns if c not in ("step", "timestamp")]
    if "step" not in table.columns or len(values) != 1:
        raise OptlabError(
            f"{source}: a dvclive series needs a 'step' column and one value column, has {list(table.columns)}"
        )
    return table.drop_duplicates("step", keep="last").set_index("step")[values[0]].sort_index()


def read_history(live_dir: str | Path) -> Any:
    """The per-epoch history as a pandas DataFrame: one row per epoch, indexed by ``epoch`` counted
    from 1, one column per logged metric (with replicas, their mean)."""
    return _history_table(Path(live_dir) / HISTORY_DIR)


def read_summary(live_dir: str | Path) -> dict[str, Any]:
    path = Path(live_dir) / SUMMARY
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro train`")
    return json.loads(path.read_text())


def _renumber_shared_objects(config: Any, ids: dict | None = None) -> Any:
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


def save_model(model: Any, path: str | Path) -> None:
    """Save a ``.keras`` file whose bytes depend only on the model.

    Keras stamps the save time into ``metadata.json`` and the zip entries, and memory addresses
    into ``config.json``; identical runs would then produce different files and DVC would rerun
    every stage downstream. The weights file itself is already byte-stable.
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


def replica_models(models_dir: str | Path, n: int) -> list[Path]:
    """The train stage's replica models, 0.keras ... (n-1).keras, checked to be all there."""
    paths = [Path(models_dir) / f"{r}.keras" for r in range(n)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise OptlabError(f"{models_dir}: missing {', '.join(missing)} of {n} replicas; run `dvc repro train`")
    return paths


def load_model(path: str | Path, meta: PreparedMeta) -> Any:
    """The trained model, checked to fit the prepared data described by ``meta``.

    Call after ``optlab.backend.configure`` (the evaluate stage does), as for any Keras import.
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro train`")
    model = keras.saving.load_model(path, compile=False)
    expected = tuple(model.input_shape[1:])
    # None is a dimension the model accepts at any size.
    given = meta.input_shape
    fits = len(expected) == len(given) and all(e in (None, g) for e, g in zip(expected, given, strict=True))
    if not fits or model.output_shape[-1] != len(meta.classes):
        raise OptlabError(
            f"the prepared data no longer fits the model: {path} takes inputs of shape {expected} and predicts "
            f"{model.output_shape[-1]} classes, but the prepared data holds inputs of shape {meta.input_shape} "
            f"and {len(meta.classes)} classes; run `dvc repro` to retrain the model on the current data"
        )
    return model
