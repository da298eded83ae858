"""Write stage outputs atomically, so an error or a kill never leaves a half-written output
that DVC could cache as a result.

Everything is written beside its final path under a temporary name and renamed into place
only when complete: on one filesystem, ``os.replace`` is atomic. A write that fails for want of
room (a full disk or quota, a file past the size limit) removes its temporary and names the
output it was writing; :func:`all_or_none` removes a stage's outputs that were complete when a
later one failed, and says it in one line that names the file and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from optlab.core.errors import OptlabError

# The errors that mean "no room to write": the disk, a quota, or the largest file allowed is full.
NO_ROOM = {
    errno.ENOSPC: "free space on its filesystem",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file size limit (ulimit -f) or use a filesystem that takes larger files",
}


class NoRoomError(OptlabError):
    """A stage ran out of room writing an output; the message names the file, the cause and the fix."""


def no_room(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_ROOM


def written_file(exc: OSError) -> str | None:
    """The file ``exc`` failed to write: its ``filename`` (``open``, ``os.replace``), else the file
    object being written in the innermost frame that holds one (``write`` and ``close`` say no name)."""
    if exc.filename is not None:
        return os.fsdecode(exc.filename)
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name, mode = getattr(value, "name", None), getattr(value, "mode", "")
            if (
                isinstance(value, io.IOBase)
                and isinstance(name, str)
                and isinstance(mode, str)
                and set(mode) & set("wax+")
            ):
                return name
    return None


def describe_no_room(exc: OSError) -> str:
    """One line: what could not be written, why, and what to do."""
    path = written_file(exc)
    cause = (exc.strerror or os.strerror(exc.errno)).lower()
    return f"{cause} writing {path or 'an output'}: {NO_ROOM[exc.errno]} and run again"


def _naming(exc: OSError, tmp: Path, final: Path) -> OSError | None:
    """``exc``, if it is for want of room writing the temporary ``tmp`` (or a file under it), as the
    error of the output ``final`` (or the file under it); else None."""
    path = written_file(exc)
    try:
        inside = Path() if path is None else Path(path).resolve().relative_to(tmp.resolve())
    except ValueError:
        return None  # another file: the error names it already
    code = exc.errno
    if code is None and path is not None:
        code = _why_short(Path(path))
    if code not in NO_ROOM:
        return None
    return OSError(code, os.strerror(code), str(final / inside))


def _why_short(path: Path) -> int | None:
    """numpy's ``tofile`` (``np.save``) reports a short write as "N requested and M written", without
    the errno: append a block to the same temporary file to ask the system why."""
    try:
        with open(path, "ab") as f:
            f.write(bytes(1 << 16))
            f.flush()
    except OSError as probe:
        return probe.errno
    return None


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
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs get ordinary permissions
        yield tmp
        _remove(final)
        os.replace(tmp, final)
    except OSError as exc:
        named = _naming(exc, tmp, final)
        if named is None:
            raise
        raise named from exc
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
    try:
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; outputs get ordinary permissions
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        named = _naming(exc, tmp, final)
        if named is None:
            raise
        raise named from exc
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


@contextlib.contextmanager
def all_or_none(*paths: str | Path, kept: Mapping[str, str | Path] | None = None) -> Iterator[None]:
    """A stage's outputs ``paths``, published together: if the block fails, the ones already
    written are removed too (DVC must not take a part for the result), and a failure for want of
    room becomes one :class:`NoRoomError` line that names the file, the cause and the fix, and
    which of ``kept`` (what it is -> a path outside the outputs, such as the resume backup) is
    still there for the next run."""
    try:
        yield
    except BaseException as exc:
        remove_outputs(*paths)
        if not no_room(exc):
            raise
        still = [f"{what} in {path} is kept" for what, path in (kept or {}).items() if _holds_something(Path(path))]
        raise NoRoomError("; ".join([describe_no_room(exc), *still])) from exc


def _holds_something(path: Path) -> bool:
    if path.is_dir():
        return any(not p.name.startswith(".") for p in path.iterdir())
    return path.exists()
