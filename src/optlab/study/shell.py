"""git and DVC as commands, for the tools that drive them (sweeps, studies): one place that runs
them and turns a failure into an error a user can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from optlab.core.errors import OptlabError

LOG_TAIL = 2000  # characters of a failed command's (or task's) log in a message


def run(args: Sequence[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        list(args), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False
    )
    if check and done.returncode != 0:
        raise OptlabError(f"`{' '.join(args)}` failed in {cwd}: {(done.stderr or done.stdout).strip()[-LOG_TAIL:]}")
    return done


def dvc(*args: str) -> list[str]:
    """A DVC command line, with this interpreter's DVC."""
    return [sys.executable, "-m", "dvc", *args]


def head(repo: Path) -> str:
    """The commit checked out in ``repo``."""
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
