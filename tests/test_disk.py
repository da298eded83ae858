"""A full disk: the train and evaluate stages, on a filesystem that fills while they write, fail
with one ``error:`` line that names the file and the cause, exit 2, and leave no output DVC could
cache (no model, no half dvclive directory, no temporaries); the train stage keeps its resume
backup, and once space is freed the next run resumes and ends exactly as an uninterrupted run.

The filesystem is a size-limited tmpfs (``mount -t tmpfs -o size=...``), resized between runs to
leave a chosen free space: the kernel itself refuses the writes (ENOSPC), as on a full disk.
Where mounting is not permitted (not root, a container without CAP_SYS_ADMIN), the file size
limit stands in (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG). The test says
which ran in a ``[record]`` line; ``OPTLAB_TEST_DISK_FULL=rlimit`` forces the second.
"""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TEST_METRIC_KEYS, prepared_digits, repo_params, stage_args, write_params
from optlab.core.outputs import atomic_dir, atomic_file, temporaries

PAGE = 4096  # tmpfs allocates whole pages
ROOMY = 256 * 2**20  # bytes: the size "after space is freed"
# SGD without momentum keeps no moments, so the resume backup (every variable, uncompressed) is
# about the size of a model file: the free space can then be set between the training's peak
# (the old backup and the new one, one epoch's save) and the end's (the backup and both models).
# Hidden width 1024 makes those files (~300 kB) dwarf the dvclive directory (~50 kB of pages).
# No diagnostics: they cost each run 9 s of compiling here and change nothing about the writes.
PARAMS = {"dataset": "digits", "optimizer": "sgd", "optimizer.momentum": 0.0, "schedule": "constant",
          "model.hidden": [1024], "model.dropout": 0.1, "train.epochs": 4, "train.batch_size": 64,
          "train.diagnostics": False}  # fmt: skip
TRAIN_OUTPUTS = ("models/model.keras", "models/replicas", "metrics/train")  # dvc.yaml's, as stage_args gives them
EVALUATE_OUTPUTS = ("metrics/test.json", "metrics/replicas.csv", "metrics/per_class.csv", "metrics/confusion.csv",
                    "data/predictions.npy")  # fmt: skip


class Tmpfs:
    """A tmpfs mounted at ``root`` whose size is changed to leave a given free space."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.mounted = _mount("-t", "tmpfs", "-o", f"size={ROOMY},mode=0755", "tmpfs", str(root))

    def used(self) -> int:
        s = os.statvfs(self.root)
        return (s.f_blocks - s.f_bfree) * s.f_frsize

    def leave_free(self, nbytes: int) -> None:
        """Shrink (or grow) it to its current use plus ``nbytes``, in whole pages."""
        size = self.used() + math.ceil(nbytes / PAGE) * PAGE
        assert _mount("-o", f"remount,size={size}", str(self.root)) is True

    def free_space(self) -> None:
        assert _mount("-o", f"remount,size={ROOMY}", str(self.root)) is True

    def unmount(self) -> None:
        if self.mounted is True and subprocess.run(["umount", str(self.root)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(self.root)], check=True)


def _mount(*args: str) -> bool | str:
    """True, or why not (the error ``mount`` gave)."""
    if os.environ.get("OPTLAB_TEST_DISK_FULL") == "rlimit":
        return "OPTLAB_TEST_DISK_FULL=rlimit"
    try:
        proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return True if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


@pytest.fixture
def tmpfs(tmp_path):
    fs = Tmpfs(tmp_path / "fs")
    yield fs
    fs.unmount()


def _limited(fsize: int | None):
    """A preexec_fn: writes past ``fsize`` bytes fail with EFBIG (not the default SIGXFSZ kill)."""

    def apply() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return apply


def stage(name: str, cwd: Path, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``python stages/<name>.py`` with the arguments dvc.yaml gives it, in ``cwd``."""
    # No bytecode: under a file-size limit Python would leave truncated .pyc files in the package.
    env = {**os.environ, "OPTLAB_THREADS": os.environ.get("OPTLAB_THREADS", "1"), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py"), *stage_args(name)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=_limited(fsize))  # fmt: skip


def checkout(root: Path) -> Path:
    """What the train stage sees in a checkout: params.yaml, conf/ and the prepared digits."""
    root.mkdir(parents=True, exist_ok=True)
    prepared_digits(root / "data/prepared")
    write_params(root / "params.yaml", repo_params(**PARAMS))
    return root


def assert_failed_cleanly(proc: subprocess.CompletedProcess, root: Path, outputs: tuple[str, ...], cause: str) -> str:
    """Exit 2, one ``error:`` line naming the cause and a file, no traceback; none of ``outputs``
    and no temporary anywhere. Returns the error line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: {cause} writing ") and "run again" in errors[0], errors[0]
    left = [o for o in outputs if (root / o).exists()]
    assert not left, f"outputs a failed run left for DVC to cache: {left}"
    strays = [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name]
    assert not strays, f"temporaries left behind: {strays}"
    return errors[0]


def backed_up_epochs(root: Path) -> int:
    """The epochs in the resume backup (0: none); a backup that does not load fails here."""
    done = list((root / ".optlab/backup").glob("[!.]*.npz"))
    assert len(done) <= 1, done
    if not done:
        return 0
    with np.load(done[0]) as saved:
        return len(json.loads(str(saved["history"]))[0]["epochs"])


def pages(directory: Path) -> int:
    """The tmpfs pages the files under ``directory`` take."""
    return sum(math.ceil(p.stat().st_size / PAGE) for p in directory.rglob("*") if p.is_file())


def assert_same_training(root: Path, ref: Path) -> None:
    """The per-epoch TSVs, the summaries and the model bytes equal the uninterrupted run's."""
    compared = ["models/model.keras", "models/replicas/0.keras", "metrics/train/metrics.json",
                "metrics/train/replicas.json"]  # fmt: skip
    compared += [str(p.relative_to(ref)) for p in sorted((ref / "metrics/train").rglob("*.tsv"))]
    assert len(compared) >= 9, compared  # and the history: loss, accuracy, validation, learning rate
    for rel in compared:
        assert (root / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert json.loads((root / "metrics/train/run.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_disk_that_fills_stops_train_and_evaluate_with_one_line_and_the_next_run_resumes(tmp_path, tmpfs):
    started = time.perf_counter()
    ref = checkout(tmp_path / "ref")  # the uninterrupted run, on the ordinary disk
    proc = stage("train", ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, live = (ref / "models/model.keras").stat().st_size, (pages(ref / "metrics/train") + 8) * PAGE

    if tmpfs.mounted is not True:
        _rlimit_instead(tmp_path, ref, tmpfs.mounted, started)
        return
    root = checkout(tmpfs.root)

    # 1. The disk fills during training: room for the first epoch's backup, not for the second's
    # (written beside the first until it replaces it). The backup of epoch 1 stays.
    tmpfs.leave_free(live + int(1.5 * model))
    proc = stage("train", root)
    line = assert_failed_cleanly(proc, root, TRAIN_OUTPUTS, "no space left on device")
    assert "writing .optlab/backup/" in line and "the resume backup in .optlab/backup is kept" in line, line
    assert backed_up_epochs(root) == 1, proc.stdout
    backup = next((root / ".optlab/backup").glob("*.npz")).stat().st_size

    # 2. Some space freed, not enough: it resumes, trains to the end, and the disk fills while it
    # saves the models (room for one beside the backup, not for two). The last epoch's backup stays.
    tmpfs.leave_free(live + backup + model // 2)
    proc = stage("train", root)
    line = assert_failed_cleanly(proc, root, TRAIN_OUTPUTS, "no space left on device")
    assert "resuming from the backup of epoch 1" in proc.stdout, proc.stdout
    assert "writing models/" in line and "the resume backup in .optlab/backup is kept" in line, line
    assert backed_up_epochs(root) == PARAMS["train.epochs"]

    # 3. Space freed: the next run resumes and ends as the uninterrupted run did, to the byte.
    tmpfs.free_space()
    proc = stage("train", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from the backup of epoch {PARAMS['train.epochs']}" in proc.stdout, proc.stdout
    assert_same_training(root, ref)
    assert not (root / ".optlab/backup").exists(), "the backup is removed once the run completes"

    # 4. Evaluate on a disk with two pages left: the first small table fits, the predictions do not.
    tmpfs.leave_free(2 * PAGE)
    proc = stage("evaluate", root)
    line = assert_failed_cleanly(proc, root, EVALUATE_OUTPUTS, "no space left on device")
    assert any(f"writing {o}:" in line for o in EVALUATE_OUTPUTS), line
    tmpfs.free_space()
    proc = stage("evaluate", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads((root / "metrics/test.json").read_text())) >= TEST_METRIC_KEYS
    assert all((root / rel).is_file() for rel in EVALUATE_OUTPUTS)
    print(f"[record] disk full by a size-limited tmpfs (ENOSPC): train failed at epoch 2's backup and at the "
          f"models, resumed to the uninterrupted result; evaluate failed and reran; 6 stage runs in "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip


def _rlimit_instead(tmp_path: Path, ref: Path, why: str, started: float) -> None:
    """No tmpfs here: the file size limit makes the writes fail (EFBIG). Every file the train
    stage writes before the first epoch's backup is smaller than the limit, that backup is not:
    no backup is kept, and the next run starts afresh and ends as the uninterrupted run did."""
    root = checkout(tmp_path / "limited")
    proc = stage("train", root, fsize=64 * 1024)
    line = assert_failed_cleanly(proc, root, TRAIN_OUTPUTS, "file too large")
    assert "writing .optlab/backup/" in line, line
    assert backed_up_epochs(root) == 0
    proc = stage("train", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(root, ref)
    proc = stage("evaluate", root, fsize=8 * 1024)  # the predictions (14 kB) are past it
    assert_failed_cleanly(proc, root, EVALUATE_OUTPUTS, "file too large")
    proc = stage("evaluate", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads((root / "metrics/test.json").read_text())) >= TEST_METRIC_KEYS
    print(f"[record] disk full by RLIMIT_FSIZE (EFBIG), as mounting a tmpfs failed ({why}): train failed at "
          f"its first backup and reran to the uninterrupted result; evaluate failed and reran; "
          f"5 stage runs in {time.perf_counter() - started:.0f} s")  # fmt: skip


# --- the writes themselves, in this process --------------------------------------------------
def test_a_write_that_finds_no_room_removes_its_temporary_and_names_the_output(tmpfs):
    if tmpfs.mounted is not True:
        pytest.skip(f"needs a tmpfs it can mount ({tmpfs.mounted}); the stage test covers EFBIG")
    out = tmpfs.root / "out"
    tmpfs.leave_free(2 * PAGE)
    # A Python write (errno from the system), numpy's short write (no errno: optlab asks again),
    # and a file inside an output directory.
    writes = {
        out / "table.csv": lambda tmp: tmp.write_bytes(bytes(16 * PAGE)),
        out / "array.npy": lambda tmp: np.save(tmp, np.zeros(4 * PAGE, "float32")),
    }
    for final, write in writes.items():
        with pytest.raises(OSError) as err, atomic_file(final) as tmp:
            write(tmp)
        assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(final)), err.value
        assert not final.exists() and not temporaries(final)
    with pytest.raises(OSError) as err, atomic_dir(out / "models") as tmp:
        (tmp / "0.keras").write_bytes(bytes(PAGE))
        (tmp / "1.keras").write_bytes(bytes(16 * PAGE))
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(out / "models/1.keras")), err.value
    assert not (out / "models").exists() and not temporaries(out / "models")
    assert tmpfs.used() == 0, "every temporary's pages were given back"
