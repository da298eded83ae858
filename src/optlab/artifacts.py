"""The artifacts that cross a stage boundary, and the one module that knows their files.

- raw data: download -> prepare, plot
- prepared data: prepare -> train, evaluate, plot
- a training run (the model file and the dvclive directory): train -> evaluate, plot, compare
- an evaluation (test metrics, confusion table, test predictions): evaluate -> plot, compare

Each artifact has its file names as constants here, a typed ``meta``, and a writer and a reader
that validates what it reads: a missing, damaged or stale input stops with the file and the
stage to rerun. Directories and files are named in ``dvc.yaml`` only and reach the stages on
their command line. No Keras import at module level: the plot stage reads artifacts too.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from optlab.errors import OptlabError
from optlab.outputs import atomic_file, remove_outputs, write_json

META = "meta.json"  # in the raw and the prepared data directories
SPLITS = ("train", "val", "test")  # the prepared splits; the test split is never used to choose


class Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _read_meta(path: Path, cls: type[Meta], stage: str) -> Any:
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro {stage}`")
    try:
        return cls.model_validate_json(path.read_text())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
        raise OptlabError(f"{path} is not a valid {stage} meta file ({problems}); run `dvc repro {stage}`") from None
    except OSError as exc:
        raise OptlabError(f"{path}: cannot read it ({exc}); run `dvc repro {stage}`") from None


def _load_npy(path: Path, stage: str, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro {stage}`")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise OptlabError(f"{path}: not a readable .npy file ({exc}); run `dvc repro {stage}`") from None


# --- raw data (the download stage's output) ---------------------------------------------------
RAW_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_REDOWNLOAD = "delete it and run `dvc repro` to download it again"


class RawMeta(Meta):
    dataset: str
    classes: list[str]
    image_shape: tuple[int, int, int]  # height, width, channels


@dataclass(frozen=True)
class RawData:
    """uint8 images (N, H, W, C) and integer labels (N,) as the dataset ships them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    meta: RawMeta


def save_raw(data: RawData, out: Path) -> None:
    """Nothing source-dependent goes in, so every source gives byte-identical files and DVC's
    cache sees one result."""
    for key in RAW_ARRAYS:
        np.save(out / f"{key}.npy", np.ascontiguousarray(getattr(data, key), dtype=np.uint8), allow_pickle=False)
    write_json(out / META, data.meta.model_dump(mode="json"))


def _checked_images(x: np.ndarray, image_shape: tuple[int, ...], where: Path) -> np.ndarray:
    if x.ndim == 3 and image_shape[-1] == 1:
        x = x[..., np.newaxis]  # a grey image saved without its channel axis; a view, no copy
    if x.dtype != np.uint8 or x.shape[1:] != tuple(image_shape):
        raise OptlabError(
            f"{where}: expected uint8 images of shape (N, {', '.join(map(str, image_shape))}) as {META} "
            f"says, got {x.dtype} {x.shape}; {_REDOWNLOAD}"
        )
    return x


def _checked_labels(y: np.ndarray, n_images: int, n_classes: int, where: Path, fix: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # Keras's CIFAR loaders give labels as (N, 1)
    if y.ndim != 1 or len(y) != n_images or not np.issubdtype(y.dtype, np.integer):
        raise OptlabError(f"{where}: expected {n_images} integer labels, got {y.dtype} {y.shape}; {fix}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise OptlabError(f"{where}: labels run from {y.min()} to {y.max()} but there are {n_classes} classes; {fix}")
    return y


def load_raw(raw_dir: str | Path, splits: Sequence[str] = ("train", "test")) -> RawData:
    """Open the download stage's directory (memory-mapped), checking that files, shapes and labels
    agree. Splits not asked for are left empty."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise OptlabError(f"{raw_dir}: no such directory; run `dvc repro` (its download stage writes it)")
    needed = [META, *(f"{xy}_{split}.npy" for split in splits for xy in "xy")]
    missing = [f for f in needed if not (raw_dir / f).is_file()]
    if missing:
        raise OptlabError(f"{raw_dir}: missing {', '.join(missing)}; {_REDOWNLOAD}")
    meta = _read_meta(raw_dir / META, RawMeta, "download")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        if split not in splits:
            arrays[f"x_{split}"] = arrays[f"y_{split}"] = np.empty(0, np.uint8)
            continue
        x_path, y_path = raw_dir / f"x_{split}.npy", raw_dir / f"y_{split}.npy"
        # Memory-mapped: prepare reads each image once, a block at a time, never all at once.
        x = _checked_images(_load_npy(x_path, "download", mmap=True), meta.image_shape, x_path)
        y = _checked_labels(_load_npy(y_path, "download", mmap=True), len(x), len(meta.classes), y_path, _REDOWNLOAD)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return RawData(**arrays, meta=meta)


def raw_test_images(raw_dir: str | Path, y_test: np.ndarray) -> np.ndarray:
    """The original test images, checked to be the prepared test set's samples in its order."""
    raw = load_raw(raw_dir, splits=("test",))
    if len(raw.x_test) != len(y_test) or not np.array_equal(raw.y_test, y_test):
        raise OptlabError(
            f"{Path(raw_dir) / 'x_test.npy'} is not the prepared test set (different samples or order); "
            "run `dvc repro prepare`"
        )
    return raw.x_test


# --- prepared data (the prepare stage's output) -----------------------------------------------
class PreparedMeta(Meta):
    dataset: str
    classes: list[str]
    image_shape: tuple[int, int, int]
    scale: str
    flatten: bool
    val_fraction: float
    split_seed: int
    # Per-channel statistics of the training split, in units of x/255 (scale: standardize only).
    mean: list[float] | None = None
    std: list[float] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (math.prod(self.image_shape),) if self.flatten else tuple(self.image_shape)


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 (N, *input_shape)
    y: np.ndarray  # int32 (N,)


@dataclass(frozen=True)
class PreparedData:
    splits: dict[str, Split]
    meta: PreparedMeta


def save_prepared(data: PreparedData, out: Path) -> None:
    for name, split in data.splits.items():
        np.save(out / f"x_{name}.npy", split.x, allow_pickle=False)
        np.save(out / f"y_{name}.npy", split.y, allow_pickle=False)
    write_json(out / META, data.meta.model_dump(mode="json", exclude_none=True))


def prepared_meta(data_dir: str | Path) -> PreparedMeta:
    return _read_meta(Path(data_dir) / META, PreparedMeta, "prepare")


def read_aligned(path: Path, align: int = 64) -> np.ndarray:
    """Read a ``.npy`` file into a buffer aligned to ``align`` bytes.

    XLA:CPU adopts an aligned, C-contiguous host buffer without copying it (through DLPack),
    so the training data exists once in memory; ``np.load`` gives no alignment guarantee, and
    a memory map would keep its pages resident beside the copy.
    """
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro prepare`")
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if fortran_order or dtype.hasobject:
            return np.load(path, allow_pickle=False)  # unusual layouts: plain load, one extra copy
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(nbytes + align, dtype=np.uint8)
        start = (-raw.ctypes.data) % align
        array = raw[start : start + nbytes].view(dtype).reshape(shape)
        if f.readinto(memoryview(raw[start : start + nbytes])) != nbytes:
            raise OptlabError(f"{path} is truncated; run `dvc repro prepare` to prepare the data again")
    return array


def load_prepared(data_dir: str | Path, splits: Iterable[str] = SPLITS, images: bool = True) -> PreparedData:
    """The prepared splits asked for, checked against ``meta.json``. ``images=False`` reads the
    labels only (an empty ``x``), for stages that need no pixels."""
    data_dir = Path(data_dir)
    meta = prepared_meta(data_dir)
    loaded = {}
    for name in splits:
        y_path = data_dir / f"y_{name}.npy"
        y = read_aligned(y_path)
        y = _checked_labels(y, len(y), len(meta.classes), y_path, "run `dvc repro prepare`")
        x = read_aligned(data_dir / f"x_{name}.npy") if images else np.empty((0, *meta.input_shape), np.float32)
        if images and (x.shape != (len(y), *meta.input_shape) or x.dtype != np.float32):
            raise OptlabError(
                f"{data_dir / f'x_{name}.npy'}: expected float32 {(len(y), *meta.input_shape)} as {META} says, "
                f"got {x.dtype} {x.shape}; run `dvc repro prepare`"
            )
        loaded[name] = Split(x, y)
    return PreparedData(loaded, meta)


def fingerprint(data_dir: str | Path) -> dict[str, str]:
    """SHA-256 of every prepared file: recorded with the model, and the key of the resume backup."""
    digests = {}
    for path in sorted(Path(data_dir).iterdir()):
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digests[path.name] = h.hexdigest()
    return digests


# --- a training run: the model file and the dvclive directory ---------------------------------
SUMMARY = "metrics.json"  # dvclive's summary: the last epoch's values and the run's figures
RUN_INFO = "run.json"  # what produced the model: params, versions, data hashes, timings
REPLICAS = "replicas.json"  # each replica's own figures (seed, epochs, accuracies, divergence)
REPLICA_HISTORY = "replicas"  # under HISTORY_DIR: replicas/r<k>/<metric>.tsv, with 2 replicas or more
HISTORY_DIR = "plots/metrics"  # dvclive's per-epoch TSVs, one per metric
# The per-epoch history: name in the logs -> dvclive metric name (its TSV under HISTORY_DIR).
HISTORY = {
    "loss": "train/loss",
    "accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "learning_rate": "learning_rate",
}


def history_file(live_dir: str | Path, name: str) -> Path:
    """The TSV dvclive writes for the history column ``name`` (a key of :data:`HISTORY`)."""
    return Path(live_dir) / HISTORY_DIR / f"{HISTORY[name]}.tsv"


# Per-layer curves, logged as f"{DIAGNOSTICS}/{kind}/{layer}" beside the history: plots only,
# never summary columns (dvc exp show stays readable).
DIAGNOSTICS = "diagnostics"
DIAGNOSTIC_KINDS = ("grad_norm", "weight_norm", "update_ratio", "dead_fraction")


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
        for key, name in HISTORY.items():
            self.live.log_metric(f"{prefix}{name}", logs[key])
        for layer, values in (diagnostics or {}).items():
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
            logs = {k: float(np.mean([h.epochs[e - 1][k] for h in ran])) for k in HISTORY}
            diagnosed = [h.diagnostics[e - 1] for h in ran if len(h.diagnostics) >= e]
            mean = None
            if diagnosed:
                mean = {
                    layer: {
                        kind: (None if any(d[layer][kind] is None for d in diagnosed)
                               else float(np.mean([d[layer][kind] for d in diagnosed])))
                        for kind in diagnosed[0][layer]
                    }
                    for layer in diagnosed[0]
                }  # fmt: skip
            self.log_epoch(logs, mean)

    def finish(self, summary: Mapping[str, Any], info: Mapping[str, Any], replicas: Sequence[Mapping]) -> None:
        self.live.end()
        # dvclive's Live.summary "can be modified manually", but make_summary always adds the
        # step: the final summary is written here, after dvclive's last write.
        write_json(self.dir / SUMMARY, dict(summary))
        write_json(self.dir / REPLICAS, list(replicas))
        self._info(info, "complete")

    def abandon(self) -> None:
        remove_outputs(self.dir)


def read_diagnostics(live_dir: str | Path) -> dict[str, Any]:
    """kind -> a pandas DataFrame (one row per epoch from 1, one column per layer), for the
    per-layer diagnostics a run logged; empty when it logged none (the keras loop)."""
    import pandas as pd

    root = Path(live_dir) / HISTORY_DIR / DIAGNOSTICS
    found = {}
    for kind in DIAGNOSTIC_KINDS:
        files = sorted((root / kind).glob("*.tsv")) if (root / kind).is_dir() else []
        if files:
            table = pd.DataFrame({f.stem: _read_series(f, f.stem) for f in files}).sort_index()
            table.index.name = "epoch"  # dvclive's step is the epoch, from 1
            found[kind] = table
    return found


def read_replicas(live_dir: str | Path) -> list[dict[str, Any]]:
    """Each replica's own figures, as the train stage wrote them (one entry for one replica)."""
    path = Path(live_dir) / REPLICAS
    if not path.is_file():
        raise OptlabError(f"{path} not found; run `dvc repro train`")
    return json.loads(path.read_text())


def read_replica_histories(live_dir: str | Path) -> list[Any]:
    """Each replica's per-epoch history (a DataFrame like :func:`read_history`'s); empty for one
    replica, whose history is the run's."""
    import pandas as pd

    root = Path(live_dir) / HISTORY_DIR / REPLICA_HISTORY
    found = []
    for r in range(len(list(root.glob("r*"))) if root.is_dir() else 0):
        base = root / f"r{r}"
        series = {key: _read_series(base / f"{name}.tsv", Path(name).name) for key, name in HISTORY.items()}
        table = pd.DataFrame(series).sort_index()
        table.index.name = "epoch"
        found.append(table)
    return found


def _read_series(path: Path, column: str) -> Any:
    import pandas as pd

    if not path.is_file():
        raise OptlabError(f"{path} not found (the train stage writes it); run `dvc repro train`")
    table = pd.read_csv(path, sep="\t")
    if not {"step", column} <= set(table.columns):
        raise OptlabError(f"{path} needs columns 'step' and '{column}', has {list(table.columns)}")
    # A resumed run can log a step twice; its last value is the one the model ended with.
    return table.drop_duplicates("step", keep="last").set_index("step")[column]


def read_history(live_dir: str | Path) -> Any:
    """The per-epoch history as a pandas DataFrame: one row per epoch, indexed by ``epoch``
    counted from 1, one column per key of :data:`HISTORY`."""
    import pandas as pd

    series = {key: _read_series(history_file(live_dir, key), Path(name).name) for key, name in HISTORY.items()}
    history = pd.DataFrame(series).sort_index()
    history.index.name = "epoch"  # dvclive's step is the epoch, from 1 (TrainLog sets it so)
    return history


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


# --- an evaluation (the evaluate stage's outputs) ---------------------------------------------
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")  # the per-class table, one row a class


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]  # the test metrics: DVC metrics (see optlab.metrics.test_metrics)
    per_class: dict[str, dict[str, float]]  # class name -> precision, recall, f1, support (a table)
    probabilities: np.ndarray  # float32 (N test images, classes)
    confusion_rows: dict[str, list[str]]  # one (actual, predicted) class-name pair per test image
    replicas: list[dict[str, Any]]  # each replica's test metrics, with its replica number and seed


def save_evaluation(
    ev: Evaluation,
    metrics_path: Path,
    replicas_path: Path,
    per_class_path: Path,
    confusion_path: Path,
    predictions_path: Path,
) -> None:
    import pandas as pd

    with atomic_file(replicas_path) as tmp:
        pd.DataFrame(ev.replicas).to_csv(tmp, index=False)
    with atomic_file(predictions_path) as tmp, open(tmp, "wb") as f:
        np.save(f, ev.probabilities.astype(np.float32), allow_pickle=False)
    with atomic_file(confusion_path) as tmp:
        pd.DataFrame(ev.confusion_rows).to_csv(tmp, index=False)
    table = pd.DataFrame([{"class": name, **row} for name, row in ev.per_class.items()], columns=PER_CLASS_COLUMNS)
    with atomic_file(per_class_path) as tmp:
        table.to_csv(tmp, index=False)
    write_json(metrics_path, ev.metrics)


def load_predictions(path: str | Path, n: int, n_classes: int) -> np.ndarray:
    probs = _load_npy(Path(path), "evaluate")
    if probs.shape != (n, n_classes):
        raise OptlabError(
            f"{path} has shape {probs.shape}, but the test set has {n} samples of {n_classes} classes; "
            "run `dvc repro evaluate`"
        )
    return probs
