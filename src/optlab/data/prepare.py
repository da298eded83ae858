"""Turn the download stage's raw uint8 arrays into what training reads: scaled float32 images
(flattened for the MLP), int32 labels, and a stratified validation split carved out of the
training set. The test set gets the same transform and is never split or used for statistics.

Pure NumPy (plus scikit-learn for the split): no Keras import, so the stage starts fast and its
tests need no backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from optlab.core.errors import OptlabError
from optlab.core.params import PrepareParams
from optlab.data.files import SPLITS, PreparedData, PreparedMeta, RawData, Split

# Images are scaled a block at a time, about 1 MiB of float32 per block: every in-place pass
# over a block then runs in the CPU cache instead of streaming the whole array from memory.
_BLOCK_VALUES = 1 << 18

Stats = dict[str, list[float]]  # {"mean": [per channel], "std": [per channel]}, in units of x/255


# --- scaling -------------------------------------------------------------------------------
# Each works in place on a float32 block of flattened images holding the raw 0-255 values;
# ``per_value`` holds the channel statistics repeated to one image's length (see scale()).
def _minus_one_one(block: np.ndarray, per_value: dict[str, np.ndarray] | None) -> None:
    block /= np.float32(127.5)  # divide, not multiply by 1/127.5: 255 maps to exactly 1
    block -= np.float32(1)


def _zero_one(block: np.ndarray, per_value: dict[str, np.ndarray] | None) -> None:
    block /= np.float32(255)


def _standardize(block: np.ndarray, per_value: dict[str, np.ndarray] | None) -> None:
    if per_value is None:
        raise ValueError("scale 'standardize' needs the training split's channel_stats()")
    block /= np.float32(255)
    block -= per_value["mean"]
    block /= per_value["std"]


SCALES: dict[str, Callable[[np.ndarray, dict[str, np.ndarray] | None], None]] = {
    "minus_one_one": _minus_one_one,
    "zero_one": _zero_one,
    "standardize": _standardize,
}


def _row_blocks(n_rows: int, row_values: int) -> Iterator[slice]:
    step = max(1, _BLOCK_VALUES // max(1, row_values))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _take(x: np.ndarray, rows: np.ndarray | None, block: slice) -> np.ndarray:
    # Gathering a block at a time reads a memory-mapped input without a full uint8 copy.
    return x[block] if rows is None else x[rows[block]]


def scale(x: np.ndarray, method: str, stats: Stats | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """``x[rows]`` (all of ``x`` if ``rows`` is None) as float32, scaled by ``method``.

    ``x`` holds uint8 images with channels last. Never makes a float64 copy: each block is
    cast straight into the float32 result and scaled there.
    """
    transform = SCALES[method]
    n_rows = len(x) if rows is None else len(rows)
    out = np.empty((n_rows, *x.shape[1:]), dtype=np.float32)
    flat = out.reshape(n_rows, -1)  # a view of out
    # Statistics repeated over whole images: broadcasting a 3-long channel axis instead runs
    # NumPy's inner loop 3 values at a time, several times slower.
    per_value = None if stats is None else {
        k: np.broadcast_to(np.asarray(v, dtype=np.float32), x.shape[1:]).reshape(-1) for k, v in stats.items()
    }  # fmt: skip
    for block in _row_blocks(n_rows, flat.shape[1]):
        out[block] = _take(x, rows, block)
        transform(flat[block], per_value)
    return out


def channel_stats(x: np.ndarray, rows: np.ndarray | None = None) -> Stats:
    """Per-channel mean and std of ``x[rows] / 255`` (channels last; all rows if None).

    Counted as a histogram of the 256 pixel values per channel: exact, and no float copy of the
    images. A constant channel gets std 1, so standardizing centres it instead of dividing by 0.
    """
    channels = x.shape[-1]
    hist = np.zeros((channels, 256), dtype=np.int64)
    n_rows = len(x) if rows is None else len(rows)
    for block in _row_blocks(n_rows, math.prod(x.shape[1:])):
        pixels = _take(x, rows, block).reshape(-1, channels)
        for c in range(channels):
            hist[c] += np.bincount(pixels[:, c], minlength=256)
    count = hist.sum(axis=1)
    if not count.all():
        raise ValueError("channel_stats() needs at least one image")
    values = np.arange(256) / 255.0
    mean = hist @ values / count
    std = np.sqrt((hist * (values - mean[:, None]) ** 2).sum(axis=1) / count)
    std[std == 0] = 1.0
    return {"mean": mean.tolist(), "std": std.tolist()}


# --- splitting -----------------------------------------------------------------------------
def _class_name(label: int, classes: Sequence[str] | None) -> str:
    return f"'{classes[label]}' (label {label})" if classes is not None else f"label {label}"


def _check_stratifiable(y: np.ndarray, val_fraction: float, classes: Sequence[str] | None) -> None:
    """Refuse, with what to change, the splits that scikit-learn would refuse with a bare ValueError."""
    labels, counts = np.unique(y, return_counts=True)
    lonely = [_class_name(int(k), classes) for k in labels[counts < 2]]
    if lonely:
        raise OptlabError(
            f"class {', '.join(lonely)} has fewer than 2 training images, too few to put one on each "
            "side of a stratified train/validation split; the raw data looks truncated: "
            "delete data/raw and run `dvc repro` to download it again"
        )
    n, k = len(y), len(labels)
    n_val = math.ceil(val_fraction * n)  # scikit-learn's rounding for a fractional test_size
    if n_val < k:
        raise OptlabError(
            f"prepare.val_fraction {val_fraction} puts {n_val} of {n} training images in validation, "
            f"fewer than the {k} classes a stratified split must cover; "
            f"raise prepare.val_fraction to at least {math.ceil(k / n * 1000) / 1000:g}"
        )
    if n - n_val < k:
        raise OptlabError(
            f"prepare.val_fraction {val_fraction} leaves {n - n_val} of {n} images for training, "
            f"fewer than the {k} classes; lower prepare.val_fraction"
        )


def stratified_split(
    y: np.ndarray, val_fraction: float, seed: int, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` into ``y``: disjoint, covering every row, class proportions kept.

    Splits indices rather than images, so the images are copied once, straight into their
    scaled split. Both index arrays come in a seeded shuffled order.
    """
    y = np.asarray(y)
    _check_stratifiable(y, val_fraction, classes)
    train, val = train_test_split(np.arange(len(y)), test_size=val_fraction, random_state=seed, stratify=y)
    return train, val


# --- the stage's work ----------------------------------------------------------------------
def prepare(raw: RawData, params: PrepareParams, flatten: bool = True) -> PreparedData:
    """Split the training set, scale every split with statistics of the training split alone,
    and flatten the images into pixel vectors if ``flatten`` (what the model takes:
    :attr:`optlab.params.Params.flat_input`)."""
    classes = list(raw.meta.classes)
    train_rows, val_rows = stratified_split(raw.y_train, params.val_fraction, params.seed, classes)
    # Statistics after the validation split is removed, so nothing about val or test leaks in.
    stats = channel_stats(raw.x_train, train_rows) if params.scale == "standardize" else None
    sources = {"train": (raw.x_train, raw.y_train, train_rows), "val": (raw.x_train, raw.y_train, val_rows),
               "test": (raw.x_test, raw.y_test, None)}  # fmt: skip
    splits = {}
    for split, (x, y, rows) in sources.items():
        images = scale(x, params.scale, stats, rows)
        splits[split] = Split(
            x=images.reshape(len(images), -1) if flatten else images,  # a view
            y=np.asarray(y if rows is None else y[rows], dtype=np.int32),
        )
    meta = PreparedMeta(
        dataset=raw.meta.dataset,
        classes=classes,
        image_shape=raw.meta.image_shape,
        scale=params.scale,
        flatten=flatten,
        val_fraction=params.val_fraction,
        split_seed=params.seed,
        **(stats or {}),
    )
    return PreparedData(splits, meta)


def count_images(prepared: PreparedData) -> dict[str, Any]:
    """Images per split and per class: the stage's DVC metrics, so a diff shows a changed split."""
    classes = prepared.meta.classes
    counts = {}
    for split in SPLITS:
        per_class = np.bincount(prepared.splits[split].y, minlength=len(classes))
        by_name = {c: int(k) for c, k in zip(classes, per_class, strict=True)}
        counts[split] = {"n": int(per_class.sum()), "per_class": by_name}
    return counts
