"""The prepare stage: scaling, the stratified split, the stage's outputs and its refusals.

Everything runs on small synthetic raw directories written here in the download stage's format,
except one CIFAR-10-sized run that shows the scaling finishes (its time is printed, never asserted).
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import stage_args
from optlab.core.errors import OptlabError
from optlab.core.params import load_params
from optlab.core.stage import EXIT_USER_ERROR, run
from optlab.data.files import RawData, RawMeta, load_raw, save_raw
from optlab.data.prepare import channel_stats, count_images, prepare, scale, stratified_split

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "stages" / "prepare.py"
STAGE_ARGS = stage_args("prepare")  # as dvc.yaml runs it
PREPARED_FILES = {f"{a}_{s}.npy" for a in "xy" for s in ("train", "val", "test")} | {"meta.json"}


# --- helpers -------------------------------------------------------------------------------
def prep(**knobs):
    """The repository's prepare params with ``knobs`` changed."""
    return load_params(REPO / "params.yaml", {f"prepare.{k}": v for k, v in knobs.items()}).prepare


def make_raw_arrays(
    counts=(40, 30, 20, 10), n_test=24, image_shape=(6, 6, 1), dataset="fashion_mnist", seed=0
) -> RawData:
    """Random images whose training labels come in the given per-class counts (shuffled)."""
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.uint8)
    y_test = (np.arange(n_test) % len(counts)).astype(np.uint8)
    x_train = rng.integers(0, 256, (len(y_train), *image_shape), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, *image_shape), dtype=np.uint8)
    classes = [f"class_{k}" for k in range(len(counts))]
    meta = RawMeta(dataset=dataset, classes=classes, image_shape=image_shape)
    return RawData(x_train, y_train, x_test, y_test, meta)


def write_raw(raw_dir: Path, raw: RawData) -> Path:
    raw_dir.mkdir(parents=True, exist_ok=True)
    save_raw(raw, raw_dir)
    return raw_dir


def write_params(root: Path, edits: dict | None = None, **dotted) -> Path:
    """The repository's params.yaml with ``{"prepare.scale": ...}``-style edits, in ``root``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**(edits or {}), **dotted}.items():
        *parents, leaf = key.split(".")
        section = params
        for part in parents:
            section = section[part]
        section[leaf] = value
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    if not (root / "conf").exists():  # the options of the params' groups, as in a checkout
        (root / "conf").symlink_to(REPO / "conf", target_is_directory=True)
    return path


def pipeline_dir(root: Path, raw: RawData | None = None, edits: dict | None = None) -> Path:
    """A temp repository root holding params.yaml and data/raw, laid out as dvc.yaml expects."""
    raw = raw or make_raw_arrays()
    write_raw(root / "data" / "raw", raw)
    write_params(root, {"dataset": raw.meta.dataset, **(edits or {})})
    return root


@pytest.fixture(scope="module")
def stage_main():
    return runpy.run_path(str(STAGE))["main"]


def run_in_process(stage_main, root: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The stage as `python stages/prepare.py` runs it, without a new interpreter."""
    monkeypatch.chdir(root)
    code = run(stage_main, STAGE_ARGS)
    return code, capsys.readouterr().err


def run_subprocess(root: Path, *python_args: str) -> subprocess.CompletedProcess:
    args = python_args or (str(STAGE), *STAGE_ARGS)
    return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=300)


def assert_no_outputs(root: Path) -> None:
    assert not (root / "data" / "prepared").exists()
    assert not (root / "metrics" / "data.json").exists()


# --- scaling -------------------------------------------------------------------------------
ALL_VALUES = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)


def test_minus_one_one_maps_0_to_minus_1_and_255_to_1():
    out = scale(ALL_VALUES, "minus_one_one").ravel()
    assert out.dtype == np.float32
    assert out[0] == -1.0 and out[255] == 1.0
    assert np.all(np.diff(out) > 0)
    np.testing.assert_allclose(out, np.arange(256) / 127.5 - 1, atol=1e-6)


def test_zero_one_maps_0_to_0_and_255_to_1():
    out = scale(ALL_VALUES, "zero_one").ravel()
    assert out.dtype == np.float32
    assert out[0] == 0.0 and out[255] == 1.0
    np.testing.assert_allclose(out, np.arange(256) / 255, atol=1e-7)


def test_standardize_is_per_channel():
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    stats = {"mean": [0.1, 0.5, 0.9], "std": [0.2, 0.3, 0.4]}
    out = scale(x, "standardize", stats)
    assert out.dtype == np.float32 and out.shape == x.shape
    expected = (x / 255 - np.array(stats["mean"])) / np.array(stats["std"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_scale_takes_rows_in_the_given_order():
    x = np.random.default_rng(1).integers(0, 256, (20, 3, 3, 1), dtype=np.uint8)
    rows = np.array([7, 2, 19, 0])
    np.testing.assert_array_equal(scale(x, "zero_one", rows=rows), scale(x[rows], "zero_one"))


def test_scale_refuses_standardize_without_stats():
    with pytest.raises(ValueError, match="channel_stats"):
        scale(ALL_VALUES, "standardize")


def test_channel_stats_match_numpy_and_guard_constant_channels():
    x = np.random.default_rng(2).integers(0, 256, (30, 5, 5, 3), dtype=np.uint8)
    x[..., 2] = 77  # a constant channel: std 0
    stats = channel_stats(x)
    scaled = x / 255.0
    np.testing.assert_allclose(stats["mean"], scaled.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"][:2], scaled.std(axis=(0, 1, 2))[:2], rtol=1e-12)
    assert stats["std"][2] == 1.0
    assert np.all(np.isfinite(scale(x, "standardize", stats)))


def test_standardize_uses_training_split_statistics_only():
    raw = make_raw_arrays(counts=(50, 50), image_shape=(4, 4, 2))
    params = prep(scale="standardize", val_fraction=0.2, seed=3)
    train_rows, val_rows = stratified_split(raw.y_train, params.val_fraction, params.seed)
    # Bright validation and test images: if either leaked into the statistics, the mean would rise.
    raw.x_train[train_rows] = raw.x_train[train_rows] // 4
    raw.x_train[val_rows] = 255
    raw.x_test[:] = 255
    prepared = prepare(raw, params)

    expected = channel_stats(raw.x_train[train_rows])
    np.testing.assert_allclose(prepared.meta.mean, expected["mean"], rtol=1e-12)
    np.testing.assert_allclose(prepared.meta.std, expected["std"], rtol=1e-12)
    assert max(prepared.meta.mean) < 64 / 255
    x_train = prepared.splits["train"].x.reshape(-1, 2)
    np.testing.assert_allclose(x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(axis=0), 1, atol=1e-5)
    assert prepared.splits["val"].x.min() > 3 and prepared.splits["test"].x.min() > 3


# --- the split -----------------------------------------------------------------------------
IMBALANCED = np.random.default_rng(4).permutation(np.repeat(np.arange(5), [53, 31, 20, 9, 7]))


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5])
def test_split_keeps_class_proportions(val_fraction):
    train, val = stratified_split(IMBALANCED, val_fraction, seed=0)
    counts = np.bincount(IMBALANCED)
    assert np.all(np.abs(np.bincount(IMBALANCED[val], minlength=5) - val_fraction * counts) <= 1)
    assert np.all(np.abs(np.bincount(IMBALANCED[train], minlength=5) - (1 - val_fraction) * counts) <= 1)


def test_split_is_disjoint_and_covers_the_training_set():
    train, val = stratified_split(IMBALANCED, 0.2, seed=0)
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(IMBALANCED)))
    assert len(val) == int(np.ceil(0.2 * len(IMBALANCED)))


def test_split_seed_decides_the_split():
    first = stratified_split(IMBALANCED, 0.2, seed=0)
    again = stratified_split(IMBALANCED, 0.2, seed=0)
    other = stratified_split(IMBALANCED, 0.2, seed=1)
    for a, b in zip(first, again, strict=False):
        np.testing.assert_array_equal(a, b)
    assert set(first[1]) != set(other[1])


def test_split_names_a_class_too_small_to_stratify():
    y = np.array([0] * 10 + [1] * 10 + [2])
    with pytest.raises(OptlabError, match=r"'cat' \(label 2\).*dvc repro"):
        stratified_split(y, 0.2, seed=0, classes=["ant", "bee", "cat"])


def test_split_says_how_large_val_fraction_must_be():
    y = np.repeat(np.arange(10), 10)
    with pytest.raises(OptlabError, match="raise prepare.val_fraction to at least 0.1"):
        stratified_split(y, 0.05, seed=0)


# --- prepare() -----------------------------------------------------------------------------
@pytest.mark.parametrize("flatten", [True, False])  # the mlp's layout, the cnn's
def test_prepare_shapes_dtypes_and_untouched_test_set(flatten):
    raw = make_raw_arrays(image_shape=(5, 4, 3))
    prepared = prepare(raw, prep(val_fraction=0.25), flatten=flatten)
    a = {f"{xy}_{name}": getattr(split, xy) for name, split in prepared.splits.items() for xy in "xy"}
    image = (60,) if flatten else (5, 4, 3)
    assert a["x_train"].shape == (75, *image) and a["x_val"].shape == (25, *image)
    assert a["x_test"].shape == (24, *image)
    assert all(a[f"x_{s}"].dtype == np.float32 and a[f"y_{s}"].dtype == np.int32 for s in ("train", "val", "test"))
    # The test set keeps its order and is only scaled.
    np.testing.assert_array_equal(a["x_test"].reshape(24, 5, 4, 3), scale(raw.x_test, "minus_one_one"))
    np.testing.assert_array_equal(a["y_test"], raw.y_test)
    assert prepared.meta.model_dump(exclude_none=True) == {
        "dataset": "fashion_mnist", "classes": raw.meta.classes, "image_shape": (5, 4, 3),
        "scale": "minus_one_one", "flatten": flatten, "val_fraction": 0.25, "split_seed": 0,
    }  # fmt: skip


def test_prepare_keeps_each_image_with_its_label():
    raw = make_raw_arrays(counts=(30, 30, 30), image_shape=(2, 2, 1))
    raw.x_train[:] = (raw.y_train * 100)[:, None, None, None]  # the label is readable from the pixels
    prepared = prepare(raw, prep(scale="zero_one"))
    for split in ("train", "val"):
        first_pixel = prepared.splits[split].x[:, 0] * 255
        np.testing.assert_allclose(first_pixel, prepared.splits[split].y * 100, atol=1e-3)


def test_summary_counts_per_split_and_class():
    raw = make_raw_arrays(counts=(40, 30, 20, 10))
    summary = count_images(prepare(raw, prep(val_fraction=0.1)))
    assert summary["train"]["n"] + summary["val"]["n"] == 100 and summary["test"]["n"] == 24
    for k, count in enumerate((40, 30, 20, 10)):
        name = f"class_{k}"
        assert summary["train"]["per_class"][name] + summary["val"]["per_class"][name] == count
        assert summary["test"]["per_class"][name] == 6


def test_gray_images_saved_without_a_channel_axis_are_accepted(tmp_path):
    raw = make_raw_arrays(image_shape=(6, 6, 1))
    write_raw(tmp_path / "raw", raw)
    for split in ("train", "test"):  # as some tools save grey images: (N, H, W)
        np.save(tmp_path / "raw" / f"x_{split}.npy", getattr(raw, f"x_{split}")[..., 0])
    loaded = load_raw(tmp_path / "raw")
    assert loaded.x_train.shape[1:] == (6, 6, 1)


def test_cifar10_sized_input_prepares(capsys):
    """Proves a full-size run completes; the time is printed for the record, never asserted
    (benchmarks/prepare_speed.py measures it properly)."""
    rng = np.random.default_rng(0)
    raw = RawData(
        rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 50_000).astype(np.uint8),
        rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 10_000).astype(np.uint8),
        RawMeta(dataset="cifar10", classes=[str(k) for k in range(10)], image_shape=(32, 32, 3)),
    )  # fmt: skip
    for method in ("minus_one_one", "standardize"):
        start = time.perf_counter()
        prepared = prepare(raw, prep(scale=method))
        seconds = time.perf_counter() - start
        with capsys.disabled():
            print(f"\n[record] CIFAR-10-sized prepare ({method}): {seconds:.2f} s")
        assert prepared.splits["train"].x.shape == (45_000, 3072)
        assert prepared.splits["test"].x.shape == (10_000, 3072)
        del prepared


# --- the stage -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """One real run of the stage script, in a fresh interpreter, on a small colour dataset."""
    raw = make_raw_arrays(counts=(40, 30, 20, 10), image_shape=(4, 4, 3), dataset="cifar10")
    root = pipeline_dir(tmp_path_factory.mktemp("stage"), raw, {"prepare.scale": "standardize"})
    result = run_subprocess(root)
    return root, raw, result


def test_stage_end_to_end(stage_run):
    root, raw, result = stage_run
    assert result.returncode == 0, result.stderr
    out = root / "data" / "prepared"
    assert {p.name for p in out.iterdir()} == PREPARED_FILES
    assert np.load(out / "x_train.npy").shape == (90, 48)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dataset"] == "cifar10" and meta["scale"] == "standardize" and len(meta["std"]) == 3

    summary = json.loads((root / "metrics" / "data.json").read_text())
    assert (summary["train"]["n"], summary["val"]["n"], summary["test"]["n"]) == (90, 10, 24)
    assert summary["val"]["per_class"] == {"class_0": 4, "class_1": 3, "class_2": 2, "class_3": 1}
    assert summary["test"]["per_class"] == {f"class_{k}": 6 for k in range(4)}
    y_val = np.load(out / "y_val.npy")
    assert y_val.dtype == np.int32 and np.bincount(y_val).tolist() == [4, 3, 2, 1]
    assert not [p for p in root.rglob(".*tmp*")], "temporary files left behind"


def test_stage_outputs_are_byte_identical_across_runs(stage_run, tmp_path):
    root, raw, first = stage_run
    again = pipeline_dir(tmp_path, raw, {"prepare.scale": "standardize"})
    assert run_subprocess(again).returncode == 0
    for name in sorted(PREPARED_FILES):
        assert (again / "data/prepared" / name).read_bytes() == (root / "data/prepared" / name).read_bytes(), name
    assert (again / "metrics/data.json").read_bytes() == (root / "metrics/data.json").read_bytes()


def test_stage_never_imports_keras(tmp_path):
    root = pipeline_dir(tmp_path)
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(STAGE)!r})['main']({STAGE_ARGS!r})\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules]\n"
        "assert not heavy, f'prepare imported {heavy}'\n"
    )
    result = run_subprocess(root, "-c", code)
    assert result.returncode == 0, result.stderr
    assert (root / "data" / "prepared" / "x_train.npy").is_file()


@pytest.mark.parametrize("val_fraction", [0, 1, -0.1, 1.5])
def test_stage_refuses_val_fraction_out_of_range(val_fraction, tmp_path, stage_main, monkeypatch, capsys):
    root = pipeline_dir(tmp_path, edits={"prepare.val_fraction": val_fraction})
    code, err = run_in_process(stage_main, root, monkeypatch, capsys)
    assert code == EXIT_USER_ERROR
    assert "prepare.val_fraction" in err
    assert_no_outputs(root)


def test_stage_suggests_the_key_meant_by_a_typo(tmp_path):
    root = pipeline_dir(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["val_fracton"] = 0.2  # as -S +prepare.val_fracton=0.2 would add it
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_subprocess(root)  # through the script's own exit path
    assert result.returncode == EXIT_USER_ERROR
    assert "Did you mean 'prepare.val_fraction'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert_no_outputs(root)


def test_stage_refuses_a_missing_raw_directory(tmp_path, stage_main, monkeypatch, capsys):
    write_params(tmp_path)
    code, err = run_in_process(stage_main, tmp_path, monkeypatch, capsys)
    assert code == EXIT_USER_ERROR
    assert "data/raw: no such directory" in err and "dvc repro" in err
    assert_no_outputs(tmp_path)


def test_stage_refuses_raw_data_of_another_dataset(tmp_path, stage_main, monkeypatch, capsys):
    root = pipeline_dir(tmp_path, make_raw_arrays(dataset="mnist"), {"dataset": "fashion_mnist"})
    code, err = run_in_process(stage_main, root, monkeypatch, capsys)
    assert code == EXIT_USER_ERROR
    assert "data/raw holds mnist but params.yaml asks for fashion_mnist" in err and "dvc repro" in err
    assert_no_outputs(root)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "y_test.npy").unlink(), "missing y_test.npy"),
        (lambda d: np.save(d / "y_train.npy", np.zeros(3, np.uint8)), "expected 100 integer labels"),
        (lambda d: np.save(d / "x_test.npy", np.zeros((24, 5, 5, 1), np.uint8)), "expected uint8 images of shape"),
        (lambda d: np.save(d / "y_test.npy", np.full(24, 9, np.uint8)), "labels run from 9 to 9"),
        (lambda d: (d / "x_train.npy").write_bytes(b"\x93NUMPY truncated"), "not a readable .npy"),
    ],
    ids=["missing-file", "short-labels", "wrong-image-shape", "label-out-of-range", "truncated-npy"],
)
def test_stage_refuses_damaged_raw_data(damage, message, tmp_path, stage_main, monkeypatch, capsys):
    root = pipeline_dir(tmp_path)
    damage(root / "data" / "raw")
    code, err = run_in_process(stage_main, root, monkeypatch, capsys)
    assert code == EXIT_USER_ERROR
    assert message in err
    assert_no_outputs(root)


def test_a_failure_while_writing_leaves_no_partial_output(tmp_path, stage_main, monkeypatch):
    root = pipeline_dir(tmp_path)
    saved, real_save = [], np.save

    def save_then_fail(path, array, **kw):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        real_save(path, array, **kw)

    monkeypatch.setattr(np, "save", save_then_fail)
    monkeypatch.chdir(root)
    with pytest.raises(OSError, match="disk full"):
        stage_main(STAGE_ARGS)
    assert saved
    assert_no_outputs(root)
    assert list((root / "data").iterdir()) == [root / "data" / "raw"]
