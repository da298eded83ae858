"""A git + DVC copy of this repository that runs the real pipeline on scikit-learn's real 8x8
digits with a shrunken config, and the commands the README gives users, for the tests that run
DVC end to end (tests/test_pipeline.py, test_experiments.py, test_queue.py, test_extending.py).

conftest.py builds one such project per test worker (``dvc repro`` once, committed: the
baseline) and gives each test module its own copy of it, so modules run on both workers at once
and no test repeats the baseline's training."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from conftest import write_experiment, write_params

STAGES = ("download", "prepare", "train", "evaluate", "plot")
# Small enough for 2 CPU cores, large enough that the MLP really learns digits (> 0.8 test accuracy).
SMALL = {
    "dataset": "digits",
    "seed": 0,
    "optimizer": "adam",
    "schedule": "constant",
    "model.hidden": [64],
    "train.epochs": 3,
    "train.batch_size": 32,
    "train.backend": "jax",
    "train.loop": "compiled",
    # The end-of-epoch sharpness and noise scale, off: each train process would spend about 1 s
    # tracing their program, in each of the suite's hundred DVC runs. tests/test_diagnostics.py
    # measures them through the train and plot stages.
    "train.sharpness_images": 0,
    "train.noise_scale_images": 0,
    # 4 of the most confidently wrong test images, not 16: the plot stage's slowest figure after
    # the gradients (tests/test_plotting.py draws 16 in process).
    "plot.confused_images": 4,
}
DIGITS_IMAGES = 1797  # scikit-learn's digits: every image lands in exactly one split
FIGURES = {
    "learning_curves.png",
    "learning_rate.png",
    "confusion_matrix.png",
    "per_class_f1.png",
    "confused_images.png",
    "gradients.png",
    "sharpness.png",
    "noise_scale.png",
}
UP_TO_DATE = "Data and pipelines are up to date."
QUEUE_TIMEOUT_S = 900


def ran(stage: str) -> str:
    return f"Running stage '{stage}'"


def restored(stage: str) -> str:
    """What DVC prints for a stage it restored from the (shared) run cache instead of running it."""
    return f"Stage '{stage}' is cached - skipping run, checking out outputs"


def ran_or_restored(stage: str, out: str) -> bool:
    return ran(stage) in out or restored(stage) in out


def skipped(stage: str) -> str:
    return f"Stage '{stage}' didn't change, skipping"


# --- the temporary project ---------------------------------------------------------------
def _dvc_outputs(dvc_yaml: Path) -> list[str]:
    """Every path a stage writes (outs, metrics, plots), as dvc.yaml names them."""
    paths = []
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        for key in ("outs", "metrics", "plots"):
            paths += [e if isinstance(e, str) else next(iter(e)) for e in stage.get(key, [])]
    return paths


def copy_checkout(src: Path, dst: Path) -> None:
    """Copy what a clone would hold: files tracked by git plus untracked, non-ignored ones, minus
    the results of runs made here (dvc.lock and the stages' outputs), so the copy starts fresh."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    outputs = _dvc_outputs(src / "dvc.yaml")
    for rel in filter(None, dict.fromkeys(listed)):
        if rel == "dvc.lock" or any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outputs):
            continue
        if not (src / rel).is_file():
            continue  # deleted in the working tree but not yet in the index
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)


class Project:
    """A git + DVC copy of optlab and the commands the README gives users."""

    first_repro: str  # the output of the fixture's `dvc repro`
    baseline: dict[str, dict]  # the committed baseline's test, train and data metrics

    def __init__(self, root: Path, dvc_bin: str) -> None:
        self.root, self.dvc_bin = root, dvc_bin
        bin_dir = str(Path(sys.executable).parent)  # stage commands call `python`: make it this venv's
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "OPTLAB_THREADS": "1",  # two processes on two cores share them instead of fighting
            # The copy's own package, so its stages run the code its dvc.yaml tracks.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")])),
        }

    def sh(
        self, *cmd: str, check: bool = True, env: dict | None = None, timeout: int = 600, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        # Output goes to a file, not a pipe: `dvc queue start` leaves worker daemons holding its
        # stdout, and reading a pipe to its end would wait for them to finish the whole queue.
        with tempfile.TemporaryFile("w+") as out:
            code = subprocess.run(
                cmd, cwd=cwd or self.root, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
            out.seek(0)
            done = subprocess.CompletedProcess(cmd, code, out.read())
        if check:
            assert done.returncode == 0, f"`{' '.join(cmd)}` exited with {done.returncode}:\n{done.stdout}"
        return done

    def dvc(self, *args: str, **kw) -> str:
        return self.sh(self.dvc_bin, *args, **kw).stdout

    def dvc_run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.sh(self.dvc_bin, *args, check=False, **kw)

    def git(self, *args: str) -> str:
        return self.sh("git", *args).stdout

    def json(self, rel: str) -> dict:
        return json.loads((self.root / rel).read_text())

    def git_json(self, rev: str, rel: str) -> dict:
        return json.loads(self.git("show", f"{rev}:{rel}"))

    def set_params(self, **dotted) -> None:
        raw = yaml.safe_load((self.root / "params.yaml").read_text())
        for key, value in dotted.items():
            *parents, leaf = key.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[leaf] = value
        write_params(self.root / "params.yaml", raw)

    def reset(self) -> None:
        """Back to the committed baseline: git files, then DVC outputs from the cache.
        (`dvc exp run` leaves params.yaml and the results in the workspace.)"""
        self.git("reset", "-q", "--hard", "HEAD")
        self.dvc("checkout", "-q", "--force")

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Project]:
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    def assert_clean(self) -> None:
        assert UP_TO_DATE in self.dvc("status")
        assert json.loads(self.dvc("status", "--json")) == {}

    # `dvc exp show --json`: a workspace row, then the baseline commit with its experiments.
    def exp_show(self) -> list[dict]:
        return json.loads(self.dvc("exp", "show", "--json"))

    def baseline_state(self) -> dict:
        head = self.git("rev-parse", "HEAD").strip()
        return next(row for row in self.exp_show() if row["rev"] == head)

    def experiments(self) -> dict[str, dict]:
        """name -> {state: the experiment's row, executor: its run record} under the baseline."""
        found = {}
        for exp_range in self.baseline_state().get("experiments") or []:
            for state in exp_range["revs"]:
                found[state["name"]] = {"state": state, "executor": exp_range.get("executor")}
        return found

    def exp_names(self) -> set[str]:
        return set(self.dvc("exp", "list", "--name-only").split())


def params_of(state: dict) -> dict:
    return state["data"]["params"]["params.yaml"]["data"]


def metrics_of(state: dict) -> dict:
    return state["data"]["metrics"]["metrics/test.json"]["data"]


def ran_experiment(output: str) -> str:
    match = re.search(r"Ran experiment\(s\): (\S+)", output)
    assert match, f"no experiment name in `dvc exp run` output:\n{output}"
    return match.group(1)


def make_baseline(root: Path, dvc_bin: str, src: Path) -> Project:
    """A copy of the checkout ``src`` at ``root`` on digits (SMALL), with `dvc repro` run and its
    results committed: the baseline every test starts from."""
    copy_checkout(src, root)
    p = Project(root, dvc_bin)
    p.git("init", "-q", "-b", "main")
    p.git("config", "user.name", "optlab test")
    p.git("config", "user.email", "test@optlab.invalid")
    if not (root / ".dvc/config").is_file():  # .dvc/ is tracked, so DVC comes initialised
        p.dvc("init", "-q")
    write_experiment(root, **SMALL)  # in conf/, which `dvc exp run` composes into params.yaml
    p.git("add", "-A")
    p.git("commit", "-q", "-m", "optlab on digits, shrunken")
    p.first_repro = p.dvc("repro")
    # What a user commits after a run: dvc.lock (staged by DVC's autostage) and the metrics
    # that DVC leaves to git (cache: false). This commit is every test's baseline.
    p.git("add", "-A")
    p.git("commit", "-q", "-m", "baseline: dvc repro")
    p.baseline = {
        name: p.json(f"metrics/{rel}")
        for name, rel in (("test", "test.json"), ("train", "train/metrics.json"), ("data", "data.json"))
    }
    return p


def copy_project(template: Project, root: Path) -> Project:
    """A private copy of a baseline project (its git history and workspace) that shares the
    template's DVC cache, run cache included: a stage that another copy already ran with the same
    code, data and params is restored from it instead of run again ("Stage '...' is cached"), as on
    a team sharing a cache. Tests that must train use params no other test uses, or `--force`."""
    shutil.copytree(template.root, root, symlinks=True, ignore=shutil.ignore_patterns("tmp", "cache"))
    (root / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {template.root / '.dvc' / 'cache'}\n")
    p = Project(root, template.dvc_bin)
    p.first_repro, p.baseline = template.first_repro, template.baseline
    return p
