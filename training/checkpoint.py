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
from pathlib import Path
from typing import Any

import torch

from core.errors import FaststyleError
from core.fileio import atomic_torch_save, safe_torch_load
from models.modelfile import CHECKPOINT_FORMAT, FORMAT_VERSION, check_format

LAST_CHECKPOINT_NAME = "last.pt"
CHECKPOINT_DIR_NAME = "checkpoints"

log = logging.getLogger(__name__)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically write a training checkpoint; ``state`` must hold only tensors and plain containers/primitives."""
    atomic_torch_save({**state, "format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION}, path)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve ``train.resume``: a checkpoint file, or a run dir (-> ``<run>/checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / CHECKPOINT_DIR_NAME / LAST_CHECKPOINT_NAME, path / LAST_CHECKPOINT_NAME):
            if candidate.is_file():
                return candidate
        raise FaststyleError(
            f"no checkpoint in {path}: expected {path / CHECKPOINT_DIR_NAME / LAST_CHECKPOINT_NAME} "
            f"(pass a checkpoint file or a run dir to train.resume)"
        )
    if not path.is_file():
        raise FaststyleError(f"checkpoint not found: {path} (pass a checkpoint file or a run dir to train.resume)")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (a file, or a run dir holding ``checkpoints/last.pt``) onto the CPU."""
    path = find_checkpoint(path)
    obj = safe_torch_load(path, "checkpoint")
    check_format(obj, path, CHECKPOINT_FORMAT, "training checkpoint")
    return obj


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
