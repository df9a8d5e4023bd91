"""The one project error type: a user mistake with a one-line message that says what to do.

`train.py`, `stylize.py` and the scripts print it as ``error: <message>`` without a traceback and exit with
status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


class FaststyleError(Exception):
    """A user mistake (missing file, empty dataset, bad image, bad option). ``str(err)`` is one line."""

    rank_specific = False
    """True for a mistake only some torchrun workers meet (a GPU index their node lacks): each of them reports it.
    Any other mistake is the same in every worker, and rank 0 alone reports it (:func:`speaks_for_run`)."""


def speaks_for_run() -> bool:
    """False in a torchrun worker other than rank 0: every worker checks the same command line, and one line of
    each mistake is enough (:func:`report_error`)."""
    return os.environ.get("RANK", "0") in ("", "0")


WORKER_GRACE_S = 20.0
"""How long a torchrun worker other than rank 0 waits, after a mistake, for rank 0 to report it (see
:func:`report_error`)."""


def report_error(line: str, every_rank: bool = False) -> NoReturn:
    """Print ``line`` (an ``error: ...`` line) to stderr and exit with status 2, once per run under torchrun.

    torchrun stops every other worker (SIGTERM) as soon as one exits with an error, so a worker that left at once
    could stop rank 0 before it prints. A worker other than rank 0 therefore waits up to :data:`WORKER_GRACE_S`
    for rank 0 to report the same mistake and be stopped by torchrun, silently (default SIGTERM action); if it is
    still running then, rank 0 did not meet the mistake, and it prints the line itself. ``every_rank``: print at
    once on every rank (a mistake only some workers meet).
    """
    if not speaks_for_run() and not every_rank:
        import signal
        import time

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        sys.stdout.flush()
        time.sleep(WORKER_GRACE_S)
    print(line, file=sys.stderr)
    raise SystemExit(2)


def exit_with_error(err: FaststyleError) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with status 2 (used by the entry points; :func:`report_error`
    under torchrun)."""
    report_error(f"error: {err}", every_rank=err.rank_specific)
