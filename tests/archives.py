"""Tiny datasets written in the exact file formats the real ones use, for tests.

Each builder writes its files under a directory with the canonical names and returns the arrays
a correct loader must produce: ``(x_train, y_train, x_test, y_test)``, images as uint8
(N, H, W, C), labels as uint8 (N,).
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def random_split(n_train: int, n_test: int, shape: tuple[int, int, int], n_classes: int, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % n_classes).astype(np.uint8)  # every class present
        return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), labels

    return *part(n_train), *part(n_test)


# --- IDX .gz (Fashion-MNIST, original MNIST) -------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    # Magic: two zero bytes, type 0x08 (unsigned byte), number of dimensions; then big-endian sizes.
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    path.write_bytes(gzip.compress(idx_bytes(array), mtime=0))


def fashion_mnist(directory: Path, n_train: int = 30, n_test: int = 10) -> Arrays:
    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = arrays = random_split(n_train, n_test, (28, 28, 1), 10, seed=1)
    for prefix, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        write_idx_gz(directory / f"{prefix}-images-idx3-ubyte.gz", x[..., 0])
        write_idx_gz(directory / f"{prefix}-labels-idx1-ubyte.gz", y)
    return arrays


# --- mnist.npz (keras.datasets.mnist) ------------------------------------------------------------
def mnist_npz(directory: Path, n_train: int = 30, n_test: int = 10) -> Arrays:
    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = arrays = random_split(n_train, n_test, (28, 28, 1), 10, seed=2)
    gray = {"x_train": x_train[..., 0], "y_train": y_train, "x_test": x_test[..., 0], "y_test": y_test}
    np.savez_compressed(directory / "mnist.npz", **gray)
    return arrays


# --- CIFAR python format ---------------------------------------------------------------------
class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did for the CIFAR files: protocol 2, every str and bytes as a
    Python 2 byte string (so ``encoding="bytes"`` gives b"data" keys, as with the real files)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("ascii") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The real files were written by numpy 1.x, which named the module numpy.core.multiarray.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def chw_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) rows, channel-first as CIFAR stores them."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def batch(x: np.ndarray, y: np.ndarray, label: str, label_key: str = "labels", extra: dict | None = None) -> bytes:
    return py2_pickle(
        {
            "batch_label": label,
            label_key: [int(v) for v in y],
            "data": chw_rows(x),
            "filenames": [f"image_{i:05d}.png" for i in range(len(x))],
            **(extra or {}),
        }
    )


def write_tar_gz(path: Path, folder: str, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def cifar10(directory: Path, per_batch: int = 4, n_test: int = 6, replace: dict[str, bytes] | None = None) -> Arrays:
    """cifar-10-python.tar.gz; ``replace`` swaps a member's bytes (e.g. for a malicious pickle)."""
    from optlab.data.datasets import CIFAR10_CLASSES

    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = arrays = random_split(5 * per_batch, n_test, (32, 32, 3), 10, seed=3)
    members = {
        "batches.meta": py2_pickle(
            {"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
        ),
        "readme.html": b"<meta HTTP-EQUIV='REFRESH' content='0; url=http://www.cs.toronto.edu/~kriz/cifar.html'>\n",
        "test_batch": batch(x_test, y_test, "testing batch 1 of 1"),
    }
    # Scrambled member order, as in the real archive: the loader must not rely on it.
    for i in (4, 3, 2, 5, 1):
        part = slice((i - 1) * per_batch, i * per_batch)
        members[f"data_batch_{i}"] = batch(x_train[part], y_train[part], f"training batch {i} of 5")
    members.update(replace or {})
    write_tar_gz(directory / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    return arrays


def cifar100(directory: Path, n_train: int = 20, n_test: int = 10) -> Arrays:
    from optlab.data.datasets import CIFAR100_CLASSES

    directory.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = arrays = random_split(n_train, n_test, (32, 32, 3), 100, seed=4)
    coarse_names = [f"superclass_{i}" for i in range(20)]

    def part(x: np.ndarray, y: np.ndarray, label: str) -> bytes:
        return batch(x, y, label, "fine_labels", {"coarse_labels": [int(v) % 20 for v in y]})

    members = {
        "file.txt~": b"",
        "train": part(x_train, y_train, "training batch 1 of 1"),
        "test": part(x_test, y_test, "testing batch 1 of 1"),
        "meta": py2_pickle({"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": coarse_names}),
    }
    write_tar_gz(directory / "cifar-100-python.tar.gz", "cifar-100-python", members)
    return arrays


class RunsCode:
    """Pickles into a call of os.system: what a tampered pickle would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def malicious_pickle(marker: Path) -> bytes:
    return py2_pickle({"data": RunsCode(f"touch {marker}"), "labels": []})


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
