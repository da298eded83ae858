"""What every stage script shares: argument parsing, and user errors turned into one clear
``error:`` line and exit code 2 (no traceback for a mistake the user can fix)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from optlab.core.errors import OptlabError

EXIT_USER_ERROR = 2


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    return p


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a stage's ``main``; print user errors as ``error: ...`` and return exit code 2."""
    try:
        main(argv)
    except OptlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
