"""The data artifacts and the one module that knows their files: raw data (download -> prepare,
plot) and prepared data (prepare -> train, evaluate, plot).

Each has its file names as constants here, a typed ``meta``, and a writer and a reader that
validates what it reads: a missing, damaged or stale input stops with the file and the stage to
rerun. Directories are named in ``dvc.yaml`` only and reach the stages on their command line.
NumPy only: no Keras, no pandas.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from optlab.core.errors import OptlabError
from optlab.core.outputs import write_json

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


def load_npy(path: Path, stage: str, mmap: bool = False) -> np.ndarray:
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
        x = _checked_images(load_npy(x_path, "download", mmap=True), meta.image_shape, x_path)
        y = _checked_labels(load_npy(y_path, "download", mmap=True), len(x), len(meta.classes), y_path, _REDOWNLOAD)
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
