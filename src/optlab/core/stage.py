"""What every stage script shares: argument parsing, and user errors turned into one clear
``error:`` line and exit code 2 (no traceback for a mistake the user can fix, or for a disk that
filled while the stage wrote)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from optlab.core.errors import OptlabError
from optlab.core.outputs import describe_no_room, no_room

EXIT_USER_ERROR = 2


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return p


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main``; print user errors as ``error: ...`` and return exit code 2. A write
    that failed for want of room (a full disk or quota, a file past the size limit) is one too:
    the line names the file and the cause."""
    try:
        main(argv)
    except OptlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if not no_room(exc):
            raise
        print(f"error: {describe_no_room(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
