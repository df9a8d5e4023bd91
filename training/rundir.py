"""The run directory of a training run, in one place: its layout, its name, claiming it, refusing it, the command
that resumes it, and removing it again when a run stops before writing anything.

- **Layout**: ``model.pth``, ``checkpoints/`` (``step_<n>.pt``, ``last.pt``), ``tb/`` (TensorBoard), Hydra's
  ``.hydra/`` and ``train.log`` (docs/architecture.md, "Config").
- **Name**: ``outputs/train/<date>/<time>-<style>`` (configs/train.yaml, with the ``style_stem`` resolver that
  :func:`register_resolvers` declares). Two runs started in the same second get ``-2``, ``-3``, ... because the
  folder is claimed with ``mkdir`` (:func:`claim_fresh_dir`).
- **Claiming and refusing** (:func:`choose_run_dir`, before Hydra creates the folder): a folder the user names with
  ``hydra.run.dir`` is refused when it already holds a run (:func:`holds_run`), unless this run resumes that very
  run; every run folder is held with an advisory ``flock`` for the life of the process (:func:`hold_run_dir`), so
  a second run given the same folder at the same moment is refused.
- **After the run**: :func:`resume_command` / :func:`interrupted_message` (the line printed on Ctrl-C), and
  :func:`release_unused_run_dir` (a run that stops with an ``error:`` line before writing anything leaves no folder).

Plain Python without torch: train.py runs :func:`choose_run_dir` while it checks the command line, before the torch
import, so that a mistake is reported in a fraction of a second.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cli import hydra_value, real_user_path
from core.errors import FaststyleError

if TYPE_CHECKING:
    from omegaconf import DictConfig

MODEL_FILE_NAME = "model.pth"
CHECKPOINT_DIR_NAME = "checkpoints"
LAST_CHECKPOINT_NAME = "last.pt"
TB_DIR_NAME = "tb"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
"""What Hydra writes into a run's ``.hydra/`` folder."""
LOG_FILE_NAME = "train.log"
"""Hydra's log file of the run (named after the job, ``train``)."""

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------- the name
def style_stem(path: Any) -> str:
    """Run-dir suffix from the style image path: its file stem with characters other than [A-Za-z0-9_-] dropped;
    ``<n>styles`` for a list of several paths (a multi-style run). Also the style's name in a model file."""
    if not isinstance(path, str) and isinstance(path, Sequence):
        if len(path) != 1:
            return f"{len(path)}styles"
        path = path[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "", Path(str(path)).stem)[:40] or "style"


def register_resolvers() -> None:
    """Declare the ``style_stem`` resolver that configs/train.yaml's ``hydra.run.dir`` uses (cheap: no work)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("style_stem", style_stem, replace=True)


# ------------------------------------------------------------------------------------------------ what a run leaves
def holds_run(folder: Path) -> bool:
    """True when ``folder`` holds what a finished or resumable run leaves: ``model.pth`` or a checkpoint.

    TensorBoard events, a log or Hydra's ``.hydra/`` alone (a run stopped before its first checkpoint) are not a
    run: nothing there can be resumed, so a new run may use the folder (:func:`run_leftovers` says what was there).
    """
    if (folder / MODEL_FILE_NAME).exists() or (folder / LAST_CHECKPOINT_NAME).is_file():
        return True
    checkpoints = folder / CHECKPOINT_DIR_NAME
    try:
        return any(child.suffix == ".pt" and not child.name.startswith(".") for child in checkpoints.iterdir())
    except OSError:  # no checkpoints/ folder (or not a folder)
        return False


def run_leftovers(folder: Path) -> list[str]:
    """What a run that never reached its first checkpoint left in ``folder`` (names, for a message)."""
    return [name for name in (TB_DIR_NAME, CHECKPOINT_DIR_NAME, ".hydra", LOG_FILE_NAME) if (folder / name).exists()]


def remove_stale_temp_files(run_dir: Path, resume_path: Path | None) -> None:
    """Temporary files a killed run (kill -9, power loss) left behind, in this run and in the one it resumes."""
    from core.fileio import remove_stale_temp_files as remove_in

    folders = [run_dir, run_dir / CHECKPOINT_DIR_NAME]
    if resume_path is not None:
        folders += [resume_path, resume_path / CHECKPOINT_DIR_NAME] if resume_path.is_dir() else [resume_path.parent]
    for folder in folders:
        remove_in(folder)


# ------------------------------------------------------------------------------------------------------ claiming it
_HELD_RUN_DIRS: dict[Path, int] = {}
"""Run folders this process holds (path -> open descriptor carrying the lock), for the life of the process."""


def hold_run_dir(path: Path) -> bool:
    """Take an exclusive lock on the run folder ``path`` for the rest of this process; False when another live
    process holds it (a run training there right now).

    ``flock`` on the folder itself: atomic, nothing is written into the folder, and the kernel releases the lock
    when the process ends however it ends (a ``kill -9`` leaves no stale claim behind, so a killed run can be
    resumed in place). Where locks are unsupported (no ``fcntl``, some network file systems) the folder is used
    unlocked.
    """
    path = Path(path)
    if path in _HELD_RUN_DIRS:
        return True
    try:
        import fcntl
    except ImportError:  # Windows
        return True
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:
        os.close(fd)
        return True
    _HELD_RUN_DIRS[path] = fd
    return True


def claim_fresh_dir(path: Path) -> Path:
    """Create, lock (:func:`hold_run_dir`) and return ``path``, or ``path-2``, ``path-3``, ... whichever does not
    exist yet.

    ``mkdir`` either creates the folder or fails, atomically, so two runs started in the same second with the same
    name get two folders, never one shared folder.
    """
    for number in itertools.count(1):
        candidate = path if number == 1 else path.with_name(f"{path.name}-{number}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        hold_run_dir(candidate)
        return candidate
    raise AssertionError("unreachable")


def make_named_run_folder(key: str, folder: str, path: Path) -> bool:
    """Create the user's run folder ``path`` (named by ``key=folder``) if needed; True when this call created it.
    FaststyleError when it cannot be a run folder (a file, the repository itself, not creatable or not writable)."""
    if path == REPO_ROOT:
        raise FaststyleError(
            f"{key}={folder} is the faststyle repository itself: name a folder of its own for the run, or leave "
            f"{key} out for a fresh one under outputs/"
        )
    if path.exists() and not path.is_dir():
        raise FaststyleError(f"{key}={folder} is a file, not a folder: name a folder for the run (made if missing)")
    try:
        path.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as err:
        raise FaststyleError(
            f"{key}={folder}: cannot create the folder ({err.strerror or err}): choose a folder you can write to"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise FaststyleError(f"{key}={folder} is not writable: choose a folder you can write to")
    return created


@dataclass
class _Claim:
    """What :func:`choose_run_dir` decided, for the run in the same process: ``created``, the run folder this
    process made (removed again by :func:`release_unused_run_dir`); ``note``, what a reused folder already held
    (logged once the run's log is open: :func:`reuse_note`)."""

    created: Path | None = None
    note: str | None = None


_CLAIM = _Claim()


def choose_run_dir(cfg: DictConfig, parsed_overrides: list, multirun: bool) -> list[str]:
    """Pin and claim the run folder before Hydra creates it: a fresh one, or the user's own if it holds no other run.
    Returns the overrides that pin it for Hydra (core.cli.preflight's last step).

    The default name (``outputs/train/<date>/<time>-<style>``) gets ``-2``, ``-3``, ... when another run took it
    (two runs started in the same second); a folder the user names with ``hydra.run.dir`` / ``hydra.sweep.dir`` is
    refused when it already holds a run's model or checkpoint, unless this run resumes that very run. Either folder
    is then held by this process (:func:`hold_run_dir`), so a second run given the same folder at the same moment
    is refused instead of training into it too.
    """
    if os.environ.get("RANK", "0") != "0":
        return []  # torchrun workers use rank 0's run dir (training.distributed.worker_hydra_overrides)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = hydra_value(cfg, key)
    if not any(override.key_or_group == key for override in parsed_overrides):
        return _claim_default_dir(key, folder, multirun)
    if not folder.strip():  # Hydra would train into the current folder
        raise FaststyleError(
            f"{key} is empty: name a folder for the run, e.g. {key}=outputs/train/my-run, or leave {key} out "
            "for a fresh one"
        )
    path = real_user_path(folder)
    taken = _runs_in_sweep_dir(key, folder, path) if multirun else _claim_named_dir(cfg, key, folder, path)
    if taken:
        raise FaststyleError(
            f"{key}={folder}: {taken[0]} already holds a training run (model.pth or checkpoints): choose a new "
            f"folder, leave {key} out for a fresh one, or continue that run with train.resume={taken[0]}"
        )
    return []


def _claim_default_dir(key: str, folder: str, multirun: bool) -> list[str]:
    """The default run (or sweep) folder, made unique with ``-2``, ``-3``, ...; the override that pins it."""
    path = Path(os.path.abspath(folder))
    try:
        claimed = claim_fresh_dir(path)
    except OSError as err:
        raise FaststyleError(
            f"cannot create the run folder {path} ({err.strerror or err}): start train.py from a folder you can "
            "write to, or set hydra.run.dir=<folder>"
        ) from None
    if not multirun:
        _CLAIM.created = claimed
    return [f'{key}="{Path(folder).with_name(claimed.name)}"']


def _runs_in_sweep_dir(key: str, folder: str, path: Path) -> list[Path]:
    """The runs a user-named sweep folder already holds (its jobs would train beside or into them)."""
    if path.exists() and not path.is_dir():
        raise FaststyleError(f"{key}={folder} is a file, not a folder: name a folder for the sweep")
    if not path.is_dir():
        return []
    return sorted(child for child in path.iterdir() if child.is_dir() and holds_run(child))


def _claim_named_dir(cfg: DictConfig, key: str, folder: str, path: Path) -> list[Path]:
    """Make and hold the user's run folder; returns ``[path]`` when it holds a run this one does not resume."""
    created = make_named_run_folder(key, folder, path)
    if not hold_run_dir(path):
        raise FaststyleError(
            f"{key}={folder}: another training run is using {path} right now: choose another folder, or "
            f"leave {key} out for a fresh one"
        )
    resume = cfg.train.resume
    resumes_it = bool(resume) and (real_user_path(str(resume)) == path or path in real_user_path(str(resume)).parents)
    taken = [path] if holds_run(path) and not resumes_it else []
    leftovers = [] if taken or resumes_it else run_leftovers(path)
    if leftovers:
        _CLAIM.note = (
            f"{path} held {', '.join(leftovers)} but no checkpoint and no model.pth (a run stopped before "
            "its first checkpoint): training there; its TensorBoard events and log stay beside this run's"
        )
    _CLAIM.created = path if created else None
    return taken


def reuse_note() -> str | None:
    """What the folder :func:`choose_run_dir` reused already held (a run stopped before its first checkpoint), for
    the run's log; None otherwise."""
    return _CLAIM.note


# -------------------------------------------------------------------------------------------------- after the run
def resume_command(run_dir: str | Path) -> str:
    """The shell command that continues this run from ``run_dir``: the same program and overrides (Hydra's task
    overrides, as typed), with ``train.resume=<run_dir>`` in place of any earlier ``train.resume``. Hydra's own
    settings (``hydra.run.dir``, ...) are left out, so the resumed run gets a run dir of its own."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = [
        text for text in hydra_cfg.overrides.task if text.lstrip("~+").split("=", 1)[0].strip() != "train.resume"
    ]
    value = str(run_dir)
    if not re.fullmatch(r"[\w./~:@%+-]+", value):  # quoted for Hydra's override grammar too (spaces, commas, ...)
        value = f'"{value}"' if '"' not in value else f"'{value}'"
    words = [*overrides, f"train.resume={value}"]
    if hydra_cfg.job.config_name not in (None, "train"):
        words = ["--config-name", str(hydra_cfg.job.config_name), *words]
    command = " ".join(shlex.quote(word) for word in [sys.argv[0], *words])
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return f"python {command}"
    if os.environ.get("GROUP_WORLD_SIZE", "1") == "1":  # one node: torchrun needs only the process count
        return f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')} {command}"
    return f"torchrun <the same torchrun options> {command}"


def interrupted_message(err: BaseException, run_dir: str | Path) -> str:
    """The one line printed for a run stopped by a signal (``err``: training.interrupt.TrainingInterrupted)."""
    from training.interrupt import signal_label

    how = signal_label(err.signum)
    if err.step is None or err.checkpoint is None:
        return f"interrupted before the first training step ({how}); nothing to save"
    return (
        f"interrupted at step {err.step} ({how}): checkpoint saved to {err.checkpoint}; "
        f"resume with: {resume_command(run_dir)}"
    )


def release_unused_run_dir(run_dir: Path) -> None:
    """A run that stops before writing anything leaves no folder behind, if this process created it (the exit
    statuses promise "nothing written"); a folder the user made, or one holding anything else, stays."""
    from hydra.core.hydra_config import HydraConfig

    created = _CLAIM.created
    if created is not None and os.path.realpath(run_dir) == os.path.realpath(created):
        remove_unused_run_dir(created, f"{HydraConfig.get().job.name}.log")


def remove_unused_run_dir(path: Path, log_name: str) -> bool:
    """Remove the run folder ``path`` when it holds nothing but what Hydra put there before the run stopped
    (``.hydra/`` with its three files, the log ``log_name``); True when it is gone.

    Only those names are deleted, one by one, and the folders with ``rmdir``, which fails on a folder that holds
    anything else: a file the user (or the run) put there is never removed. For the run that created the folder.
    """
    path = Path(path)
    hydra_dir = path / ".hydra"
    known = {".hydra", log_name}
    try:
        if not set(os.listdir(path)) <= known:
            return False
        if hydra_dir.is_dir() and not set(os.listdir(hydra_dir)) <= set(HYDRA_FILES):
            return False
        for handler in logging.getLogger().handlers:  # Hydra's file handler still has the log open
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == path:
                handler.close()
                logging.getLogger().removeHandler(handler)
        for name in HYDRA_FILES:
            (hydra_dir / name).unlink(missing_ok=True)
        if hydra_dir.is_dir():
            hydra_dir.rmdir()
        (path / log_name).unlink(missing_ok=True)
        path.rmdir()
    except OSError:
        return False
    fd = _HELD_RUN_DIRS.pop(path, None)
    if fd is not None:
        os.close(fd)
    return True
