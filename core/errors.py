"""The one project error type: a user mistake with a one-line message that says what to do.

`train.py`, `stylize.py` and the scripts print it as ``error: <message>`` without a traceback and exit with
status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys


class FaststyleError(Exception):
    """A user mistake (missing file, empty dataset, bad image, bad option). ``str(err)`` is one line."""


def exit_with_error(err: FaststyleError) -> None:
    """Print ``error: <message>`` to stderr and exit with status 2 (used by the entry points)."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)
