"""How each dataset format's verified files become uint8 arrays (x_train, y_train, x_test, y_test):
IDX (MNIST, Fashion-MNIST), Keras's mnist.npz, CIFAR's python pickles (by a restricted
unpickler that admits NumPy arrays only) and scikit-learn's digits. The registry
(:mod:`optlab.data.datasets`) names the parser of each dataset."""

from __future__ import annotations

import gzip
import pickle
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from optlab.core.errors import OptlabError

if TYPE_CHECKING:  # type hints only (the registry imports this module)
    from optlab.data.datasets import DatasetSpec

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test

IDX_UBYTE = 0x08  # IDX type code of unsigned bytes; the magic number is 0x00 0x00 type ndim


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != (IDX_UBYTE << 8 | ndim) or len(raw) < header:
        raise OptlabError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {magic!r})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise OptlabError(f"{path}: IDX header says shape {shape} but holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()  # writable, like np.load's


def parse_idx(spec: DatasetSpec, paths: Mapping[str, Path]) -> Arrays:
    def split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        x = _read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"], 3)[..., np.newaxis]
        y = _read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"], 1)
        return x, y

    return *split("train"), *split("t10k")


def parse_npz(spec: DatasetSpec, paths: Mapping[str, Path]) -> Arrays:
    with np.load(paths["mnist.npz"], allow_pickle=False) as z:
        x_train, y_train, x_test, y_test = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    return x_train[..., np.newaxis], y_train, x_test[..., np.newaxis], y_test


def _reconstruct() -> Callable[..., Any]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python-format batches and nothing else.

    The real files (pickled by Python 2 with numpy 1.x) reference exactly three globals, to
    rebuild the uint8 ``data`` array; anything else (``os.system``, ``builtins.eval``...) means
    the file is damaged or malicious, and is refused before it can run.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct(),  # as the real files spell it
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct(),  # as numpy >= 2 writes it
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file: IO[bytes], where: str):
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as in the keys b"data"
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise OptlabError(
                f"{self.where}: refusing to unpickle {module}.{name}: CIFAR batches hold only numpy "
                "arrays and lists, so this file is damaged or malicious. Delete it."
            ) from None


def _unpickle_members(archive: Path, wanted: set[str]) -> dict[str, dict]:
    found = {}
    # Stream mode reads the .tar.gz once, in member order; nothing is extracted to disk.
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                where = f"{archive}:{member.name}"
                found[member.name] = CifarUnpickler(tar.extractfile(member), where).load()
                if not isinstance(found[member.name], dict):
                    raise OptlabError(f"{where}: expected a pickled dict, got {type(found[member.name]).__name__}")
    if missing := sorted(wanted - found.keys()):
        raise OptlabError(f"{archive}: not a CIFAR python archive, it lacks {', '.join(missing)}")
    return found


def _cifar_batch(batch: dict, label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise OptlabError(f"{where}: b'data' is not a uint8 array of rows of 3072 pixels")
    if labels is None or len(labels) != len(data):
        raise OptlabError(f"{where}: {label_key!r} missing or not one label per image")
    # Rows are stored channel-first (1024 red, then green, then blue); we keep channels last.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def cifar(
    folder: str, train: tuple[str, ...], test: str, meta: str, label_key: bytes, names_key: bytes
) -> Callable[[DatasetSpec, Mapping[str, Path]], Arrays]:
    def parse(spec: DatasetSpec, paths: Mapping[str, Path]) -> Arrays:
        archive = paths[spec.files[0].name]
        members = _unpickle_members(archive, {f"{folder}/{m}" for m in (*train, test, meta)})
        names = tuple(n.decode() for n in members[f"{folder}/{meta}"].get(names_key, []))
        if names != spec.classes:
            raise OptlabError(f"{archive}: its class names {names} differ from the registry's {spec.classes}")
        parts = [_cifar_batch(members[f"{folder}/{m}"], label_key, f"{archive}:{m}") for m in train]
        x_test, y_test = _cifar_batch(members[f"{folder}/{test}"], label_key, f"{archive}:{test}")
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), x_test, y_test

    return parse


def parse_digits(spec: DatasetSpec, paths: Mapping[str, Path]) -> Arrays:
    # Imported here: scikit-learn takes a second to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., np.newaxis]  # 0..16 -> 0..255
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    return x_train, y_train, x_test, y_test
