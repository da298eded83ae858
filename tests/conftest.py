"""Shared test set-up: Keras on the JAX backend (optlab's default), quiet TensorFlow, helpers
that build small prepared data sets from real data (scikit-learn's digits), and real
Fashion-MNIST from whichever genuine source the machine has."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# gto (DVC's artifact registry: `Repo.artifacts` imports it) configures logging when first imported,
# and that closes every logging handler there is, absl's among them, whose stream is sys.stderr as
# it was then: inside a test, pytest's capture of it, which that worker's next tests then find
# closed ("I/O operation on closed file"). Imported here, before any handler, it closes nothing.
import gto  # noqa: E402, F401

# Ctrl-C as a terminal has it. A suite started in the background (`make test &` in a script, as
# some CI runners do) inherits an ignored SIGINT, Python keeps it ignored, and so does every
# process a test starts: the tests that Ctrl-C `optlab study run` or a pygit2 read then saw the
# command run on to its end (only when started that way).
signal.signal(signal.SIGINT, signal.default_int_handler)

from optlab.training import backend  # noqa: E402

# As every stage does: Keras on JAX, and XLA's compiled programs kept on disk, so a test that
# trains a program an earlier test (or stage) compiled loads it instead of compiling it again.
backend.configure("jax")

REPO = Path(__file__).resolve().parents[1]
# What the evaluate stage writes to its test metrics file.
TEST_METRIC_KEYS = {"accuracy", "loss", "top_k_accuracy", "f1_macro", "generalization_gap"}
# What the train stage's dvclive summary holds once the run completed.
TRAIN_SUMMARY_KEYS = {"trainable_params", "epochs_run", "best_epoch", "val_accuracy", "diverged",
                      "first_epoch_update_ratio", "dead_unit_fraction"}  # fmt: skip


def _groups() -> dict:
    from optlab.core.params import schema

    return schema(REPO / "conf").groups


GROUPS = _groups()  # group -> option name -> its schema, from the repository's conf/
OPTIMIZER_NAMES, SCHEDULE_NAMES = tuple(GROUPS["optimizer"]), tuple(GROUPS["schedule"])


def repo_params(**overrides) -> dict:
    """The repository's params.yaml as a dict, with overrides applied as `dvc exp run -S` would
    compose them: a group's name (``optimizer="sgd"``) brings that group's file of ``conf/``
    whole, then dotted keys set values (``**{"optimizer.learning_rate": 0.1}``)."""
    from optlab.core.params import GROUP_NAMES, read_raw, set_dotted

    raw = read_raw(REPO / "params.yaml")
    chosen = {group: overrides.pop(group) for group in GROUP_NAMES if group in overrides}
    for group in GROUP_NAMES:  # the optimizer first: its file may choose the schedule, as Hydra lets it
        if group in chosen:
            raw[group] = yaml.safe_load((REPO / "conf" / group / f"{chosen[group]}.yaml").read_text())
            for entry in raw[group].pop("defaults", []):  # {"override /schedule@...": "constant"}
                for target, name in entry.items():
                    chosen.setdefault(target.split()[-1].strip("/").split("@")[0], name)
    return set_dotted(raw, overrides)


def write_params(path: Path, raw: dict) -> Path:
    """``raw`` as ``path``, with the repository's ``conf/`` beside it (linked), where the stages
    find the options of the optimizer and schedule groups, as in a checkout."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (path.parent / "conf").exists():
        (path.parent / "conf").symlink_to(REPO / "conf", target_is_directory=True)
    return path


def write_experiment(root: Path, **overrides) -> None:
    """Change the experiment of the optlab checkout at ``root`` where its values live, in
    ``conf/`` (which `dvc exp run` composes), then compose ``params.yaml`` from it: a group's name
    (``optimizer="sgd"``) picks that file of ``conf/<group>/``; dotted keys set values
    (``conf/config.yaml`` comes after the groups, so its ``optimizer.learning_rate`` wins)."""
    from optlab.core.params import GROUP_NAMES, compose, set_dotted

    path = root / "conf" / "config.yaml"
    conf = yaml.safe_load(path.read_text())
    for group in GROUP_NAMES:
        if group in overrides:
            chosen = overrides.pop(group)
            conf["defaults"] = [
                {group: chosen} if isinstance(d, dict) and group in d else d for d in conf["defaults"]
            ]  # fmt: skip
    path.write_text(yaml.safe_dump(set_dotted(conf, overrides), sort_keys=False))
    compose(root)


def fit_members(params, train, val, members=None, after_epoch=None):
    """Train ``members`` (default: the ``train.replicas`` of ``params``) on the splits through the
    epoch driver, as the train stage does (callbacks included); return the members."""
    import math

    from optlab.training import callbacks
    from optlab.training.loop import Member, fit, replica_params, trainer_for

    if members is None:
        steps = math.ceil(len(train.y) / params.train.batch_size)
        members = []
        for r in range(params.train.replicas):
            m = Member.build(replica_params(params, r), train.x.shape[1:], 10, steps)
            m.callbacks, m.keep_best = callbacks.build(m.params, m.all_evaluation_weights)
            members.append(m)
    fit(members, trainer_for(members, train, val), after_epoch=after_epoch)
    return members


def prepared_digits(directory: Path, flatten: bool = True, n_train: int | None = None) -> Path:
    """A prepared-data directory (the prepare stage's artifact) from the real digits set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from optlab.data.files import PreparedData, PreparedMeta, Split, save_prepared

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # 0..16 -> [-1, 1], (N, 8, 8, 1)
    y = d.target.astype(np.int32)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.15, stratify=y_rest, random_state=0)
    if n_train:
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    splits = {
        name: Split(np.ascontiguousarray(xs.reshape(len(xs), -1) if flatten else xs), ys)
        for name, xs, ys in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    }
    meta = PreparedMeta(
        dataset="digits",
        classes=[str(i) for i in range(10)],
        image_shape=(8, 8, 1),
        scale="minus_one_one",
        flatten=flatten,
        val_fraction=0.15,
        split_seed=0,
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_prepared(PreparedData(splits, meta), directory)
    return directory


def stage_args(stage: str) -> list[str]:
    """The options dvc.yaml gives ``python stages/<stage>.py`` on its command line."""
    import shlex

    from optlab.study.pipeline import Pipeline

    words = shlex.split(Pipeline.load(REPO).stages[stage]["cmd"])
    assert words[:2] == ["python", f"stages/{stage}.py"], words
    return words[2:]


def run_stage(
    script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the stage script ``stages/<script>.py`` as DVC would, in ``cwd``."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / f"{script}.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- real Fashion-MNIST -------------------------------------------------------------------
REAL_DATA_HELP = """real Fashion-MNIST is needed by this test, and no genuine copy is reachable here:
  - OPTLAB_DATA_DIR: {data_dir}
  - {system}: {system_state}
  - download into {cache}: {download}
Provide it in one of these ways, then run the tests again:
  1. Debian or Ubuntu: sudo apt-get install {package}
     (it installs the four files in {system});
  2. anywhere: download {names}
     from {url} (or github.com/zalandoresearch/fashion-mnist) into one directory,
     and export OPTLAB_DATA_DIR=/that/directory;
  3. or give this machine network access once: the files are then kept in {cache}."""


@pytest.fixture(scope="session")
def fashion_mnist_files() -> tuple[str, dict[str, Path]]:
    """The four genuine Fashion-MNIST files, checksum-verified, from the first source the
    download stage itself would use: OPTLAB_DATA_DIR, Debian's package, the download cache or
    the canonical download. Fails (never skips) with how to provide them when none is reachable.

    Session-scoped, so it runs before any test's monkeypatching and sees the user's environment.
    """
    from optlab.core.errors import OptlabError
    from optlab.data import datasets

    spec = datasets.DATASETS["fashion_mnist"]
    try:
        source, paths = datasets.locate(spec)
        for file in spec.files:
            datasets.verify(paths[file.name], file)
        return source, paths
    except OptlabError as exc:
        failure = str(exc)
    data_dir = os.environ.get("OPTLAB_DATA_DIR")
    system = spec.system_dirs[0]
    pytest.fail(
        REAL_DATA_HELP.format(
            data_dir=f"{data_dir} (lacks the files)" if data_dir else "not set",
            system=system,
            system_state="present, but see below" if system.is_dir() else "absent",
            cache=datasets.cache_dir() / spec.name,
            download=failure if len(failure) < 300 else failure[:300] + "...",
            package=spec.system_package,
            names=", ".join(f.name for f in spec.files),
            url=spec.files[0].url.rsplit("/", 1)[0] + "/",
        ),
        pytrace=False,
    )


@pytest.fixture(scope="session")
def fashion_mnist_prepared(fashion_mnist_files, tmp_path_factory) -> Path:
    """Real Fashion-MNIST as the prepare stage leaves it with the repository's params (flat,
    [-1, 1], 54,000 + 6,000 + 10,000 images), through optlab's own download and prepare code."""
    from optlab.core.params import load_params
    from optlab.data import datasets, files, prepare

    _, paths = fashion_mnist_files
    directory = next(iter(paths.values())).parent
    spec = datasets.DATASETS["fashion_mnist"]
    raw_dir, out = tmp_path_factory.mktemp("fashion_raw"), tmp_path_factory.mktemp("fashion_prepared")
    previous = os.environ.get("OPTLAB_DATA_DIR")
    os.environ["OPTLAB_DATA_DIR"] = str(directory)  # the very files the fixture found and verified
    try:
        files.save_raw(datasets.fetch(spec).raw, raw_dir)
    finally:
        os.environ.pop("OPTLAB_DATA_DIR") if previous is None else os.environ.update(OPTLAB_DATA_DIR=previous)
    params = load_params(REPO / "params.yaml")
    files.save_prepared(prepare.prepare(files.load_raw(raw_dir), params.prepare, flatten=params.flat_input), out)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits training and validation splits, prepared once per test module."""
    from optlab.data import files

    prepared = files.load_prepared(prepared_digits(tmp_path_factory.mktemp("digits")), ("train", "val"))
    return prepared.splits["train"], prepared.splits["val"]


@pytest.fixture
def digits_dir(tmp_path: Path) -> Path:
    return prepared_digits(tmp_path / "prepared")


@pytest.fixture(scope="session")
def baseline_project(tmp_path_factory, dvc_bin, worker_id):
    """This repository on digits with `dvc repro` run and committed (tests/project.py), built once
    for the whole session: the first test worker to need it builds it, the others wait for it (a
    file lock in the directory pytest-xdist's workers share) and reuse it."""
    from filelock import FileLock

    from project import Project, make_baseline

    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if worker_id != "master" else shared
    root, done = shared / "baseline" / "optlab", shared / "baseline" / "done.json"
    with FileLock(str(shared / "baseline.lock")):
        if not done.is_file():
            root.parent.mkdir(parents=True, exist_ok=True)
            p = make_baseline(root, dvc_bin, REPO)
            done.write_text(json.dumps({"first_repro": p.first_repro, "baseline": p.baseline}))
    p = Project(root, dvc_bin)
    recorded = json.loads(done.read_text())
    p.first_repro, p.baseline = recorded["first_repro"], recorded["baseline"]
    return p


@pytest.fixture(scope="module")
def project(baseline_project, tmp_path_factory):
    """A private copy of the baseline project for one test module (tests reset it between them)."""
    from project import copy_project

    return copy_project(baseline_project, tmp_path_factory.mktemp("project") / "optlab")


@pytest.fixture(scope="session")
def dvc_bin() -> str:
    path = shutil.which("dvc", path=str(Path(sys.executable).parent))
    assert path, "dvc is not installed in the test environment; run `make test`"
    return path


# Tests that need one of these run DVC end to end or train on real Fashion-MNIST: slow, whatever
# their own marks say, so `make test-fast` (-m "not slow") stays the unit tests.
SLOW_FIXTURES = {"baseline_project", "project", "docs_project", "fashion_mnist_prepared"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
