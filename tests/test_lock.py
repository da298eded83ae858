"""The committed baseline comes from the committed code: every git-tracked dependency and output
that `dvc.lock` records (stage scripts, package modules, `params.yaml` values, the metrics
committed beside them) matches the working tree. When this fails, run `dvc repro` and commit
`dvc.lock` and `metrics/` together with the code that produced them."""

from __future__ import annotations

import subprocess

from conftest import REPO


def _git_tracked(path: str) -> bool:
    listed = subprocess.run(["git", "ls-files", "--", path], cwd=REPO, capture_output=True, text=True, check=True)
    return bool(listed.stdout.strip())


def stale_entries() -> list[str]:
    """``stage: path (state)`` for each git-tracked lock entry that differs from the working tree.

    Uses DVC's own comparison (the same one `dvc status` makes), restricted to what git holds:
    DVC-cached data and models are not in a fresh clone and are not the point here.
    """
    from dvc.repo import Repo

    stale = []
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            for entry in [*stage.deps, *stage.outs]:
                if type(entry).__name__ != "ParamsDependency" and not _git_tracked(entry.def_path):
                    continue
                for path, state in entry.status().items():
                    detail = f"{state}" if isinstance(state, str) else ", ".join(f"{k} {v}" for k, v in state.items())
                    stale.append(f"{stage.name}: {path} ({detail})")
    return stale


def test_committed_lock_matches_the_code_and_params_beside_it():
    stale = stale_entries()
    assert not stale, (
        "dvc.lock (and the metrics committed with it) came from other code or params than the working tree:\n  "
        + "\n  ".join(stale)
        + "\nRun `dvc repro` and commit dvc.lock and metrics/ last, after the code."
    )
