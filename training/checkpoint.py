"""Training checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint is whatever the training loop puts in (model config + weights, optimizer, step, RNG states, data
order, resolved config) plus ``format``/``format_version`` (models/modelfile.py), checked on load. Like
``model.pth`` it holds only tensors and primitives and is read with core.fileio's ``safe_torch_load``; the write
is atomic, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from core.errors import FaststyleError
from core.fileio import atomic_torch_save, safe_torch_load
from models.modelfile import CHECKPOINT_FORMAT, FORMAT_VERSION, check_format
from training.rundir import CHECKPOINT_DIR_NAME, LAST_CHECKPOINT_NAME, run_leftovers

log = logging.getLogger(__name__)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically write a training checkpoint; ``state`` must hold only tensors and plain containers/primitives."""
    atomic_torch_save({**state, "format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION}, path)


_STEP_NAME = re.compile(r"step_(\d+)\.pt")


def _candidates(run_dir: Path) -> tuple[list[Path], list[tuple[int, Path]]]:
    """A run dir's ``last.pt`` files (``checkpoints/last.pt``, then an older layout's ``last.pt``) and its periodic
    ``checkpoints/step_<n>.pt`` files as (n, path), highest n first (hidden temporary files are not candidates)."""
    lasts = [
        p for p in (run_dir / CHECKPOINT_DIR_NAME / LAST_CHECKPOINT_NAME, run_dir / LAST_CHECKPOINT_NAME) if p.is_file()
    ]
    steps = []
    folder = run_dir / CHECKPOINT_DIR_NAME
    for child in folder.iterdir() if folder.is_dir() else []:
        match = _STEP_NAME.fullmatch(child.name)
        if match and child.is_file():
            steps.append((int(match.group(1)), child))
    return lasts, sorted(steps, reverse=True)


def _read(path: Path) -> dict:
    obj = safe_torch_load(path, "checkpoint")
    check_format(obj, path, CHECKPOINT_FORMAT, "training checkpoint")
    return obj


def _read_complete(path: Path, skipped: list[str]) -> dict | None:
    """A run dir's checkpoint, or None (with a warning, and its name added to ``skipped``) when it cannot be read:
    a write cut short by a full disk or a crash of an older version, or a file that is not a checkpoint."""
    try:
        obj = _read(path)
        if not isinstance(obj.get("step"), int) or "model" not in obj:
            raise FaststyleError(f"{path} lacks the training state (step, weights)")
    except FaststyleError as err:
        log.warning("skipping checkpoint %s: %s", path, err)
        skipped.append(path.name)
        return None
    return obj


def open_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """Resolve and read ``train.resume`` onto the CPU: a checkpoint file, or a run dir -> its newest complete
    checkpoint. Returns (its path, its contents).

    In a run dir that is ``checkpoints/last.pt``, unless a periodic ``step_<n>.pt`` is newer (the disk filled after
    the step file was written, before ``last.pt``) or ``last.pt`` cannot be read; an unreadable checkpoint is
    skipped with a warning. A file named directly must be readable itself.
    """
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise FaststyleError(f"checkpoint not found: {path} (pass a checkpoint file or a run dir to train.resume)")
        return path, _read(path)
    lasts, steps = _candidates(path)
    skipped: list[str] = []
    best: tuple[Path, dict] | None = None
    for candidate in lasts:
        obj = _read_complete(candidate, skipped)
        if obj is not None:
            best = (candidate, obj)
            break
    for number, candidate in steps:
        if best is not None and number <= best[1]["step"]:
            break
        obj = _read_complete(candidate, skipped)
        if obj is not None:
            best = (candidate, obj)
            break
    if best is not None:
        if best[0].name != LAST_CHECKPOINT_NAME:
            log.info("resuming from %s, the newest complete checkpoint of %s", best[0].name, path)
        return best
    if skipped:
        raise FaststyleError(
            f"no complete checkpoint in {path}: {', '.join(skipped)} cannot be read (cut short?); start the run "
            "again without train.resume"
        )
    if set(run_leftovers(path)) - {CHECKPOINT_DIR_NAME}:
        raise FaststyleError(
            f"no checkpoint in {path}: its run stopped before its first checkpoint (written every "
            "train.checkpoint_interval_steps), so there is nothing to resume; start the run again without "
            "train.resume (the same hydra.run.dir may be used)"
        )
    raise FaststyleError(
        f"no checkpoint in {path}: expected {path / CHECKPOINT_DIR_NAME / LAST_CHECKPOINT_NAME} "
        "(pass a checkpoint file or a run dir to train.resume)"
    )


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (a file, or a run dir: its newest complete checkpoint) onto the CPU."""
    return open_checkpoint(path)[1]


def capture_rng_state() -> dict:
    """All RNG states as tensors/primitives (loadable with weights_only): torch CPU, CUDA, Python, NumPy."""
    version, mt_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch; without it there is no numpy state to keep
        return state
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state["numpy"] = {
        "name": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``; CUDA states are restored only when as many devices are present."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint has %d CUDA RNG states but %d devices are visible: CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )
    if "numpy" in state:
        import numpy as np

        nps = state["numpy"]
        np.random.set_state(
            (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
        )
