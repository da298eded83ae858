"""The dataset registry: where each dataset's files come from, their pinned checksums, and how
to parse them into uint8 arrays.

Sources are tried in order, with no network call until the last one:

1. ``$OPTLAB_DATA_DIR``, a directory holding the files under their canonical names;
2. the spec's system directories (Debian's ``/usr/share/datasets/fashion-mnist``);
3. the download cache (``$OPTLAB_CACHE_DIR``, else pooch's per-user cache), filled by
   ``pooch.retrieve`` when a file is missing. pooch downloads to a temporary file and renames
   it, so parallel workers sharing the cache never see a half-written file.

Every file is hashed before it is parsed: whatever its source, a file is read only if it is
byte-for-byte the one that was pinned. The result is the raw-data artifact
(:class:`optlab.files.RawData`). No Keras import here (the download stage must stay light).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pooch
import requests

from optlab.core.errors import OptlabError
from optlab.data import parsers
from optlab.data.files import RawData, RawMeta
from optlab.data.parsers import Arrays


@dataclass(frozen=True)
class RemoteFile:
    name: str  # canonical file name, the same in every source directory
    url: str
    sha256: str
    # Debian re-compressed Fashion-MNIST's .gz files: only the decompressed bytes match upstream,
    # so for those the pinned hash is of the gunzipped content.
    gunzipped: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # height, width, channels
    files: tuple[RemoteFile, ...]
    parse: Callable[[DatasetSpec, Mapping[str, Path]], Arrays]  # called with verified files only
    system_dirs: tuple[Path, ...] = ()
    system_package: str = ""  # the Debian package that installs the files in system_dirs


@dataclass(frozen=True)
class Dataset:
    raw: RawData
    source: str  # where the files were found, for the log line only (never written to outputs)


# --- integrity -----------------------------------------------------------------------------
def sha256_of(path: Path, gunzipped: bool = False) -> str:
    digest = hashlib.sha256()
    try:
        with (gzip.open if gunzipped else open)(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise OptlabError(
            f"{path}: not a complete gzip file ({exc}). The file is truncated or damaged: "
            "delete it and run again to get a fresh copy."
        ) from None
    return digest.hexdigest()


def verify(path: Path, file: RemoteFile) -> None:
    actual = sha256_of(path, file.gunzipped)
    if actual != file.sha256:
        of = "gunzipped content" if file.gunzipped else "file"
        raise OptlabError(
            f"checksum mismatch for {path} (sha256 of the {of}):\n"
            f"  expected {file.sha256}\n  actual   {actual}\n"
            f"The file is truncated, damaged or not the official one. Delete it and run again "
            f"to download a fresh copy from {file.url}."
        )


# --- sources -------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("OPTLAB_CACHE_DIR") or pooch.os_cache("optlab"))


def _download(file: RemoteFile, into: Path, package: str = "") -> Path:
    # pooch can only check the hash of the bytes it downloads; gunzipped hashes are checked by verify().
    known = None if file.gunzipped else f"sha256:{file.sha256}"
    try:
        return Path(pooch.retrieve(file.url, known_hash=known, fname=file.name, path=into, progressbar=True))
    except requests.RequestException as exc:
        raise OptlabError(
            f"cannot download {file.url}: {exc}. Check the network, or put {file.name} in a "
            "directory and point OPTLAB_DATA_DIR at it"
            + (f", or install Debian's package: sudo apt-get install {package}." if package else ".")
        ) from None
    except ValueError as exc:  # pooch's checksum failure; it has already deleted the download
        raise OptlabError(f"download of {file.url} failed: {exc}") from None
    except OSError as exc:  # after RequestException, which is an OSError too
        raise OptlabError(
            f"cannot write the download cache {into}: {exc}. Set OPTLAB_CACHE_DIR to a writable directory."
        ) from None


def locate(spec: DatasetSpec) -> tuple[str, dict[str, Path]]:
    """Find (or download) the spec's files; return a description of the source and their paths."""
    if not spec.files:
        return "an installed package (nothing to fetch)", {}
    env = os.environ.get("OPTLAB_DATA_DIR")
    local = ([(f"OPTLAB_DATA_DIR {env}", Path(env))] if env else []) + [(str(d), d) for d in spec.system_dirs]
    for label, directory in local:
        paths = {f.name: directory / f.name for f in spec.files}
        if all(p.is_file() for p in paths.values()):
            return label, paths
    cache = cache_dir() / spec.name
    cached = all((cache / f.name).is_file() for f in spec.files)
    paths = {f.name: _download(f, cache, spec.system_package) for f in spec.files}
    return (f"download cache {cache}" if cached else f"download into {cache}"), paths


# --- the registry --------------------------------------------------------------------------
KERAS_MIRROR = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"  # keras.datasets' origin
TORONTO = "https://www.cs.toronto.edu/~kriz/"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# The archive's meta file order (alphabetical); the parser checks the archive agrees.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip


def _fashion_file(name: str, gunzipped_sha256: str) -> RemoteFile:
    return RemoteFile(name, KERAS_MIRROR + name, gunzipped_sha256, gunzipped=True)


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        classes=FASHION_MNIST_CLASSES,
        image_shape=(28, 28, 1),
        files=tuple(
            _fashion_file(name, sha256)
            for name, sha256 in (
                ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
                ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
                ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
                ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
            )
        ),
        parse=parsers.parse_idx,
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
        system_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        name="mnist",
        classes=tuple("0123456789"),
        image_shape=(28, 28, 1),
        files=(
            RemoteFile(
                "mnist.npz",
                KERAS_MIRROR + "mnist.npz",
                "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
            ),
        ),
        parse=parsers.parse_npz,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        classes=CIFAR10_CLASSES,
        image_shape=(32, 32, 3),
        files=(
            RemoteFile(
                "cifar-10-python.tar.gz",
                TORONTO + "cifar-10-python.tar.gz",
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            ),
        ),
        parse=parsers.cifar(
            "cifar-10-batches-py",
            train=tuple(f"data_batch_{i}" for i in range(1, 6)),
            test="test_batch",
            meta="batches.meta",
            label_key=b"labels",
            names_key=b"label_names",
        ),
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        classes=CIFAR100_CLASSES,
        image_shape=(32, 32, 3),
        files=(
            RemoteFile(
                "cifar-100-python.tar.gz",
                TORONTO + "cifar-100-python.tar.gz",
                "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            ),
        ),
        parse=parsers.cifar(
            "cifar-100-python",
            train=("train",),
            test="test",
            meta="meta",
            label_key=b"fine_labels",
            names_key=b"fine_label_names",
        ),
    ),
    "digits": DatasetSpec(
        name="digits", classes=tuple("0123456789"), image_shape=(8, 8, 1), files=(), parse=parsers.parse_digits
    ),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise OptlabError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}") from None


# --- loading -------------------------------------------------------------------------------
# What a file that passed its checksum can still raise when it does not hold what the spec
# says (a spec pointed at the wrong file, or an archive cut short before it was pinned).
_PARSE_ERRORS = (EOFError, zlib.error, OSError, tarfile.TarError, zipfile.BadZipFile, pickle.UnpicklingError,
                 KeyError, ValueError, TypeError)  # fmt: skip


def fetch(spec: DatasetSpec) -> Dataset:
    """Locate, verify and parse one dataset."""
    source, paths = locate(spec)
    for file in spec.files:
        verify(paths[file.name], file)
    try:
        arrays = spec.parse(spec, paths)
    except _PARSE_ERRORS as exc:
        raise OptlabError(
            f"{spec.name}: cannot parse the files from {source} ({type(exc).__name__}: {exc}). "
            "They are damaged or truncated: delete them and run again."
        ) from None
    _check(spec, *arrays)
    x_train, y_train, x_test, y_test = arrays
    meta = RawMeta(dataset=spec.name, classes=list(spec.classes), image_shape=spec.image_shape)
    return Dataset(RawData(x_train, y_train.astype(np.uint8), x_test, y_test.astype(np.uint8), meta), source)


def _check(spec: DatasetSpec, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> None:
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.shape[1:] != spec.image_shape or y.shape != (len(x),):
            raise OptlabError(
                f"{spec.name} {split}: expected uint8 images of shape (N, {', '.join(map(str, spec.image_shape))}) "
                f"and N labels, got {x.dtype} {x.shape} and labels {y.shape}"
            )
        if len(y) and not 0 <= y.min() <= y.max() < len(spec.classes):
            raise OptlabError(f"{spec.name} {split}: labels outside 0..{len(spec.classes) - 1}")


def load(name: str) -> Dataset:
    return fetch(get_spec(name))
