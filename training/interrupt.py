"""Ctrl-C (SIGINT) and SIGTERM during training: stop at a step boundary, save, and let the entry point say how to
resume. Plain Python (no torch, no Hydra), so train.py's ``main`` can install the handlers before anything heavy.

How a stop goes:

- :func:`stop_signals` installs handlers for SIGINT and SIGTERM for the duration of a ``with`` block and restores
  the previous ones afterwards. Nested uses share the outermost one: train.py's ``main`` covers the whole run
  (loading data and the loss network included), ``training.loop.fit`` re-uses it, and installs its own for the
  loop when it is called directly (tests, scripts).
- While the loop runs (:meth:`StopSignals.deferred`), the first signal only records a stop request. The loop
  finishes the current step, agrees with the other torchrun ranks on the step to stop after, saves
  ``checkpoints/last.pt`` at that step and raises :class:`TrainingInterrupted`.
- Outside the loop there is no step to finish: the first signal raises :class:`TrainingInterrupted` at once,
  carrying the last checkpoint the loop saved (none before the first step).
- Only a repeated SIGINT means "exit now": the process exits with status 130 at once, without saving. Every file
  is written to a temporary file and renamed over the target, so an abandoned write leaves a stray temporary file,
  never a half-written checkpoint. Any other signal after the first is ignored: torchrun follows a Ctrl-C (which
  reaches every process of the terminal's process group) with a signal of its own to each worker (SIGINT in recent
  PyTorch, SIGTERM in older ones), and that copy must not abort the save. So under torchrun a second SIGINT counts
  as a repeat only once ``TORCHRUN_REPEAT_GRACE_S`` have passed since the first.
- DataLoader workers forked during the run inherit the handlers; in them the handlers do nothing, since the
  training process decides when to stop and shuts its workers down itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# torchrun forwards the signal within milliseconds of the Ctrl-C; a person pressing Ctrl-C again takes longer.
TORCHRUN_REPEAT_GRACE_S = 2.0


def signal_label(signum: int) -> str:
    """How a person knows the signal: "Ctrl-C" for SIGINT, else its name ("SIGTERM")."""
    if signum == signal.SIGINT:
        return "Ctrl-C"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(BaseException):
    """Training stopped on a signal. ``step`` is the step saved in ``checkpoint`` (``checkpoints/last.pt``), or
    None when nothing was trained yet; ``checkpoint`` is None on ranks > 0, which write no files.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way (the image decoder's
    skip-bad-files handler, for one) can swallow it.
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None) -> None:
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        where = "before the first training step" if step is None else f"at step {step}"
        super().__init__(f"interrupted {where} ({signal_label(self.signum)})")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + signal number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """The state behind the handlers: which signal asked to stop, whether the loop is running, what is saved.

    ``announce``: print a line before a repeated SIGINT's immediate exit (rank 0 only under torchrun).
    ``repeat_grace_s``: a second SIGINT sooner than this after the first is taken as a launcher's copy of it.
    """

    def __init__(self, announce: bool = True, repeat_grace_s: float = 0.0) -> None:
        self.signum: int | None = None  # the first stop signal received
        self.saved_step: int | None = None
        self.checkpoint: Path | None = None
        self.announce = announce
        self.repeat_grace_s = repeat_grace_s
        self._deferred = False
        self._first_sigint_s: float | None = None
        self._pid = os.getpid()

    def saved(self, step: int, checkpoint: Path | None) -> None:
        """Record the latest checkpoint, reported if a signal arrives after the loop (while model.pth is written)."""
        self.saved_step, self.checkpoint = step, checkpoint

    def interrupted(self, signum: int | None = None) -> TrainingInterrupted:
        """The exception for a stop on ``signum`` (default: the recorded one) with the latest saved checkpoint."""
        return TrainingInterrupted(signum or self.signum or signal.SIGINT, self.saved_step, self.checkpoint)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        """The training loop's region: a signal here waits for the loop to reach the end of its step.

        A request that arrived too late for the loop's last check (or with no step to run) is raised on leaving.
        """
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False
        if self.signum is not None:
            raise self.interrupted()

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler (also called directly by tests)."""
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the training process stops it
        if signum == signal.SIGINT:
            repeated = self._first_sigint_s is not None and (
                time.monotonic() - self._first_sigint_s >= self.repeat_grace_s
            )
            if repeated:
                self._exit_now(signum)
            if self._first_sigint_s is None:
                self._first_sigint_s = time.monotonic()
        if self.signum is not None:
            return  # already stopping: a launcher's follow-up signal must not abort the save
        self.signum = signum
        if not self._deferred:
            raise self.interrupted(signum)

    def _exit_now(self, signum: int) -> None:
        if self.announce:
            last = (
                f"last checkpoint: {self.checkpoint} (step {self.saved_step})"
                if self.checkpoint
                else ("no checkpoint saved")
            )
            # os.write, not print: a handler may run in the middle of a print to the same buffered stream.
            os.write(
                2, f"\ninterrupted again ({signal_label(signum)}): exited at once without saving; {last}\n".encode()
            )
        os._exit(128 + signum)


_active: StopSignals | None = None


def active_stop_signals() -> StopSignals | None:
    """The StopSignals whose handlers are installed in this process, if any."""
    return _active


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Install SIGINT/SIGTERM handlers for the ``with`` block (or share the ones already installed) and restore the
    previous handlers on leaving. Outside the main thread, where Python cannot install handlers, the returned
    StopSignals never fires."""
    global _active
    if _active is not None:
        yield _active
        return
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    stop = StopSignals(
        announce=int(os.environ.get("RANK", "0") or 0) == 0,
        repeat_grace_s=TORCHRUN_REPEAT_GRACE_S if under_torchrun else 0.0,
    )
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop.handle)
    _active = stop
    try:
        yield stop
    finally:
        _active = None
        for signum, handler in previous.items():
            # None: a handler installed from C, which Python cannot reinstall; the default is the closest.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
