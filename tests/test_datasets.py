"""The dataset registry and the download stage, on tiny archives in the real formats.

Downloads go through pooch from a local HTTP server, the same code path as a real download.
The one real dataset used is Fashion-MNIST, from whichever genuine source the machine has
(``fashion_mnist_files`` in conftest.py); Debian's layout is tested on a directory built here.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

import archives
from conftest import repo_params
from optlab.core.errors import OptlabError
from optlab.core.params import DATASET_NAMES
from optlab.data import datasets
from optlab.data.datasets import DATASETS, fetch, get_spec, load
from optlab.data.files import RAW_ARRAYS

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "download.py"
NOWHERE = "http://127.0.0.1:9"  # discard port: any download attempt from a local source fails loudly


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Never read the user's cache or OPTLAB_DATA_DIR; never send localhost through a proxy."""
    monkeypatch.delenv("OPTLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("OPTLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# --- a local HTTP server holding the test archives ------------------------------------------------
class Server:
    def __init__(self, root: Path):
        self.root, self.requests = root, []
        handler = functools.partial(self._Handler, server_log=self.requests, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    class _Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, server_log, **kwargs):
            self.server_log = server_log
            super().__init__(*args, **kwargs)

        def do_GET(self):
            self.server_log.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    srv = Server(root)
    srv.expected = {
        "fashion_mnist": archives.fashion_mnist(root / "fashion_mnist"),
        "mnist": archives.mnist_npz(root / "mnist"),
        "cifar10": archives.cifar10(root / "cifar10"),
        "cifar100": archives.cifar100(root / "cifar100"),
    }
    yield srv
    srv.httpd.shutdown()


def sha256(path: Path, gunzipped: bool = False) -> str:
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if gunzipped else data).hexdigest()


def pointed(name: str, directory: Path, base_url: str = NOWHERE) -> datasets.DatasetSpec:
    """The registry's spec, with its files' URLs and pinned hashes moved to the test copies."""
    spec = DATASETS[name]
    files = tuple(
        dataclasses.replace(
            f, url=f"{base_url}/{directory.name}/{f.name}", sha256=sha256(directory / f.name, f.gunzipped)
        )
        for f in spec.files
    )
    return dataclasses.replace(spec, files=files, system_dirs=())


def assert_arrays(data: datasets.Dataset, expected) -> None:
    for key, want in zip(RAW_ARRAYS, expected, strict=True):
        got = getattr(data.raw, key)
        assert got.dtype == np.uint8 and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)


# --- the registry --------------------------------------------------------------------------
def test_registry_matches_params_names_and_pins_every_file():
    assert tuple(DATASETS) == DATASET_NAMES
    n_classes = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10}
    for name, spec in DATASETS.items():
        assert spec.name == name and len(set(spec.classes)) == n_classes[name]
        for f in spec.files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0 and f.url.endswith("/" + f.name)
    keras = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
    assert [f.url for f in DATASETS["mnist"].files] == [keras + "mnist.npz"]
    assert {f.url for f in DATASETS["fashion_mnist"].files} == {
        keras + f"{split}-{kind}-idx{dims}-ubyte.gz"
        for split in ("train", "t10k")
        for kind, dims in (("images", 3), ("labels", 1))
    }
    assert all(f.gunzipped for f in DATASETS["fashion_mnist"].files)
    assert DATASETS["cifar10"].files[0].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert DATASETS["cifar100"].files[0].url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert DATASETS["fashion_mnist"].classes[0] == "T-shirt/top" and DATASETS["cifar10"].classes[-1] == "truck"


def test_unknown_dataset_name_lists_the_valid_ones():
    with pytest.raises(OptlabError) as err:
        get_spec("cifar11")
    assert all(name in str(err.value) for name in DATASET_NAMES)


# --- sources -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10", "cifar100"])
def test_download_through_pooch_then_cache_hit(server, name):
    spec = pointed(name, server.root / name, server.url)
    server.requests.clear()
    first = fetch(spec)
    assert first.source.startswith("download into") and len(server.requests) == len(spec.files)
    assert_arrays(first, server.expected[name])
    assert tuple(first.raw.meta.classes) == spec.classes and first.raw.meta.image_shape == spec.image_shape

    server.requests.clear()
    second = fetch(spec)
    assert server.requests == [] and second.source.startswith("download cache")
    assert_arrays(second, server.expected[name])


def test_parallel_workers_share_one_cache(server):
    spec = pointed("cifar10", server.root / "cifar10", server.url)
    results = [None, None]

    def work(i):
        results[i] = fetch(spec)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for data in results:
        assert_arrays(data, server.expected["cifar10"])
    cache = Path(os.environ["OPTLAB_CACHE_DIR"]) / "cifar10"
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-python.tar.gz"]  # no temp leftovers


def test_data_dir_is_used_without_any_network(server, tmp_path, monkeypatch):
    local = tmp_path / "mine"
    shutil.copytree(server.root / "mnist", local)
    monkeypatch.setenv("OPTLAB_DATA_DIR", str(local))
    data = fetch(pointed("mnist", server.root / "mnist"))  # URLs point NOWHERE
    assert data.source == f"OPTLAB_DATA_DIR {local}"
    assert_arrays(data, server.expected["mnist"])


def test_real_fashion_mnist(fashion_mnist_files, tmp_path, monkeypatch):
    # Whatever genuine source the machine has, the download stage's loader reads the real thing.
    source, paths = fashion_mnist_files
    copy = tmp_path / "real"
    copy.mkdir()
    for path in paths.values():
        shutil.copy(path, copy / path.name)
    monkeypatch.setenv("OPTLAB_DATA_DIR", str(copy))
    data = load("fashion_mnist")
    assert data.source == f"OPTLAB_DATA_DIR {copy}", source
    assert data.raw.x_train.shape == (60000, 28, 28, 1) and data.raw.x_test.shape == (10000, 28, 28, 1)
    assert data.raw.x_train.dtype == np.uint8 and data.raw.y_train.dtype == np.uint8
    assert np.bincount(data.raw.y_train).tolist() == [6000] * 10
    assert np.bincount(data.raw.y_test).tolist() == [1000] * 10


def recompress(src: Path, dst: Path) -> None:
    """Debian's layout: the same content, gzip-compressed again (other bytes, other sha256)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.gz")):
        (dst / path.name).write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=0))


def test_a_system_directory_in_debians_layout_is_read_offline(server, tmp_path):
    # Debian re-compressed the .gz files: only the decompressed content matches the pinned hashes.
    debian = tmp_path / "usr/share/datasets/fashion-mnist"
    recompress(server.root / "fashion_mnist", debian)
    upstream = server.root / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    assert (debian / upstream.name).read_bytes() != upstream.read_bytes()
    spec = dataclasses.replace(pointed("fashion_mnist", server.root / "fashion_mnist"), system_dirs=(debian,))
    server.requests.clear()
    data = fetch(spec)  # URLs point NOWHERE: any download attempt would fail
    assert data.source == str(debian) and server.requests == []
    assert_arrays(data, server.expected["fashion_mnist"])


def test_digits_are_scaled_and_split_deterministically():
    data = load("digits")
    assert data.raw.x_train.shape == (1437, 8, 8, 1) and data.raw.x_test.shape == (360, 8, 8, 1)
    assert data.raw.x_train.dtype == np.uint8 and data.raw.x_train.max() == 255 and data.raw.x_train.min() == 0
    train, test = np.bincount(data.raw.y_train), np.bincount(data.raw.y_test)
    assert np.all(np.abs(test / test.sum() - train / train.sum()) < 0.01)  # stratified
    assert_arrays(load("digits"), [data.raw.x_train, data.raw.y_train, data.raw.x_test, data.raw.y_test])


# --- bad inputs, in process ---------------------------------------------------------------------
def test_hash_mismatch_names_file_hashes_and_fix(server, tmp_path, monkeypatch):
    local = tmp_path / "mine"
    shutil.copytree(server.root / "mnist", local)
    monkeypatch.setenv("OPTLAB_DATA_DIR", str(local))
    spec = DATASETS["mnist"]  # the real pinned hash: the tiny file cannot match it
    with pytest.raises(OptlabError) as err:
        fetch(spec)
    msg = str(err.value)
    assert str(local / "mnist.npz") in msg and spec.files[0].sha256 in msg
    assert sha256(local / "mnist.npz") in msg and "Delete it" in msg


def test_download_failing_its_checksum_is_refused(server):
    spec = pointed("cifar10", server.root / "cifar10", server.url)
    spec = dataclasses.replace(spec, files=(dataclasses.replace(spec.files[0], sha256="0" * 64),))
    with pytest.raises(OptlabError, match="download of .*cifar-10-python.tar.gz failed: .*hash"):
        fetch(spec)
    cache = Path(os.environ["OPTLAB_CACHE_DIR"]) / "cifar10"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_unreachable_server_is_a_clear_error(server):
    with pytest.raises(OptlabError, match="cannot download .*OPTLAB_DATA_DIR"):
        fetch(pointed("mnist", server.root / "mnist"))  # no local copy, and the URL points NOWHERE


def test_truncated_gzip_is_a_clear_error(server, tmp_path, monkeypatch):
    local = tmp_path / "mine"
    shutil.copytree(server.root / "fashion_mnist", local)
    spec = pointed("fashion_mnist", local)
    archives.truncate(local / "train-images-idx3-ubyte.gz")
    monkeypatch.setenv("OPTLAB_DATA_DIR", str(local))
    with pytest.raises(OptlabError, match="truncated"):
        fetch(spec)


def test_truncated_archive_is_a_clear_error_even_if_its_hash_was_pinned(server, tmp_path, monkeypatch):
    local = tmp_path / "mine"
    shutil.copytree(server.root / "cifar10", local)
    archives.truncate(local / "cifar-10-python.tar.gz")
    monkeypatch.setenv("OPTLAB_DATA_DIR", str(local))
    with pytest.raises(OptlabError, match="damaged or truncated"):
        fetch(pointed("cifar10", local))


def test_idx_with_wrong_magic_is_refused(tmp_path, monkeypatch):
    archives.fashion_mnist(tmp_path / "mine")
    archives.write_idx_gz(tmp_path / "mine" / "t10k-labels-idx1-ubyte.gz", np.zeros((10, 1), np.uint8))  # 2-d
    monkeypatch.setenv("OPTLAB_DATA_DIR", str(tmp_path / "mine"))
    with pytest.raises(OptlabError, match="not an IDX file of 1-d"):
        fetch(pointed("fashion_mnist", tmp_path / "mine"))


def test_pickle_that_runs_code_is_refused_before_running(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    archives.cifar10(tmp_path / "evil", replace={"data_batch_1": archives.malicious_pickle(marker)})
    monkeypatch.setenv("OPTLAB_DATA_DIR", str(tmp_path / "evil"))
    with pytest.raises(OptlabError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        fetch(pointed("cifar10", tmp_path / "evil"))  # its hash is pinned: only the unpickler stands guard
    assert not marker.exists()


# --- the stage script ------------------------------------------------------------------------
# Runs the download stage as __main__, optionally with registry hashes pointed at test archives
# or a dataset's system directory moved to a test copy, and records which Keras/TensorFlow
# modules were imported by the end (there must be none).
RUNNER = """
import dataclasses, json, os, pathlib, runpy, sys
import optlab.data.datasets as ds
for name, hashes in json.loads(os.environ["TEST_HASHES"]).items():
    spec = ds.DATASETS[name]
    files = tuple(dataclasses.replace(f, sha256=hashes[f.name]) for f in spec.files)
    ds.DATASETS[name] = dataclasses.replace(spec, files=files, system_dirs=())
for name, directory in json.loads(os.environ.get("TEST_SYSTEM_DIRS", "{}")).items():
    ds.DATASETS[name] = dataclasses.replace(ds.DATASETS[name], system_dirs=(pathlib.Path(directory),))
sys.argv = [os.environ["TEST_STAGE"], *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tensorflow"))
    with open(os.environ["TEST_IMPORTS"], "w") as f:
        json.dump(heavy, f)
"""


def params_yaml(**overrides) -> str:
    """The repository's params.yaml with ``overrides`` (the stage validates the whole file)."""
    return yaml.safe_dump(repo_params(**overrides), sort_keys=False)


def run_stage(cwd: Path, params: str, hashes: dict | None = None, **env: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(params)
    if not (cwd / "conf").exists():  # the options of the params' groups, as in a checkout
        (cwd / "conf").symlink_to(ROOT / "conf", target_is_directory=True)
    imports = cwd.parent / f"{cwd.name}-imports.json"
    env = {**os.environ, **env, "TEST_HASHES": json.dumps(hashes or {}), "TEST_STAGE": str(STAGE)}
    env["TEST_IMPORTS"] = str(imports)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "--params", "params.yaml", "--out", "data/raw"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert json.loads(imports.read_text()) == [], "the download stage imported Keras/TensorFlow"
    return proc


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_stage_output_is_identical_from_debian_and_from_a_data_dir(fashion_mnist_files, tmp_path):
    # The same real files, once in Debian's re-compressed layout as the system directory and once
    # as they were found, through OPTLAB_DATA_DIR: the stage writes the same bytes either way.
    _, paths = fashion_mnist_files
    copy, debian_dir = tmp_path / "copy", tmp_path / "debian"
    copy.mkdir()
    for path in paths.values():
        shutil.copy(path, copy / path.name)
    recompress(copy, debian_dir)
    systems = json.dumps({"fashion_mnist": str(debian_dir)})
    debian = run_stage(tmp_path / "a", params_yaml(dataset="fashion_mnist"), TEST_SYSTEM_DIRS=systems)
    mine = run_stage(tmp_path / "b", params_yaml(dataset="fashion_mnist"), OPTLAB_DATA_DIR=str(copy))
    assert debian.returncode == 0 and mine.returncode == 0, debian.stderr + mine.stderr
    assert str(debian_dir) in debian.stdout and f"OPTLAB_DATA_DIR {copy}" in mine.stdout
    assert len(debian.stdout.strip().splitlines()) == 1
    out_a, out_b = tmp_path / "a/data/raw", tmp_path / "b/data/raw"
    assert digest(out_a) == digest(out_b)
    assert sorted(digest(out_a)) == ["meta.json", "x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    meta = json.loads((out_a / "meta.json").read_text())
    classes = list(DATASETS["fashion_mnist"].classes)
    assert meta == {"dataset": "fashion_mnist", "classes": classes, "image_shape": [28, 28, 1]}
    x_test, y_train = (np.load(out_a / f"{k}.npy", allow_pickle=False) for k in ("x_test", "y_train"))
    assert x_test.dtype == np.uint8 and x_test.shape == (10000, 28, 28, 1)
    assert y_train.dtype == np.uint8 and np.bincount(y_train).tolist() == [6000] * 10


def _bad_data_dir(kind: str, root: Path) -> tuple[str, dict, dict]:
    """(params, registry hashes to pin, extra env) for one kind of bad input."""
    if kind == "unknown dataset":
        return params_yaml(dataset="cifar11"), {}, {}
    if kind == "mistyped key":
        return params_yaml(datset="mnist"), {}, {}
    data = root / "data_dir"
    if kind == "hash mismatch":
        archives.mnist_npz(data)
        return params_yaml(dataset="mnist"), {}, {"OPTLAB_DATA_DIR": str(data)}
    if kind == "truncated archive":
        archives.cifar10(data)
        archives.truncate(data / "cifar-10-python.tar.gz")
        return params_yaml(dataset="cifar10"), {}, {"OPTLAB_DATA_DIR": str(data)}
    if kind == "pickle runs code":
        archives.cifar10(data, replace={"data_batch_1": archives.malicious_pickle(root / "pwned")})
        hashes = {"cifar10": {"cifar-10-python.tar.gz": sha256(data / "cifar-10-python.tar.gz")}}
        return params_yaml(dataset="cifar10"), hashes, {"OPTLAB_DATA_DIR": str(data)}
    raise ValueError(kind)


BAD = {
    "unknown dataset": "choose one of: fashion_mnist, mnist, cifar10, cifar100, digits",
    "mistyped key": "Did you mean 'dataset'?",
    "hash mismatch": "checksum mismatch",
    "truncated archive": "truncated, damaged",
    "pickle runs code": "refusing to unpickle",
}


# Every kind fails with no output; two of them also run over a previous output, which must survive.
@pytest.mark.parametrize(
    "kind, previous", [(kind, False) for kind in BAD] + [("hash mismatch", True), ("pickle runs code", True)]
)
def test_stage_fails_cleanly(tmp_path, kind, previous):
    params, hashes, env = _bad_data_dir(kind, tmp_path)
    work = tmp_path / "work"
    if previous:
        (work / "data/raw").mkdir(parents=True)
        (work / "data/raw/x_train.npy").write_bytes(b"previous")
    proc = run_stage(work, params, hashes, **env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and BAD[kind] in proc.stderr and "Traceback" not in proc.stderr
    leftovers = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.name != "conf")
    assert leftovers == (["data", "data/raw", "data/raw/x_train.npy", "params.yaml"] if previous else ["params.yaml"])
    if previous:
        assert (work / "data/raw/x_train.npy").read_bytes() == b"previous"
    assert not (tmp_path / "pwned").exists()
