"""Write stage outputs atomically, so an error or a kill never leaves a half-written output
that DVC could cache as a result.

Everything is written beside its final path under a temporary name and renamed into place
only when complete: on one filesystem, ``os.replace`` is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``final`` only if the block succeeds.

    On any exception the temporary directory is deleted and ``final`` is left as it was
    (absent, or the previous complete output).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs get ordinary permissions
    try:
        yield tmp
        _remove(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path that is renamed to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; outputs get ordinary permissions
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as stable, human-readable JSON (sorted keys, so diffs stay small)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def temporaries(final: str | Path) -> list[Path]:
    """The temporaries that ``atomic_dir``/``atomic_file`` left beside ``final`` when their
    process was killed (SIGKILL skips the clean-up in ``finally``)."""
    final = Path(final)
    return sorted(final.parent.glob(f".{final.name}.tmp-*")) if final.parent.is_dir() else []


def remove_outputs(*paths: str | Path) -> None:
    """Delete stale outputs, and the temporaries a killed run left beside them, before a stage
    starts, so a failure cannot leave an old result beside a new one (DVC would otherwise
    cache the mix)."""
    for path in paths:
        for leftover in [Path(path), *temporaries(path)]:
            _remove(leftover)
