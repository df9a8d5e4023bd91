"""Saving and loading: training checkpoints and inference model files, written atomically, read safely.

Two file kinds, both plain dicts of tensors and primitives so that ``torch.load(..., weights_only=True)`` can read
them (a checkpoint must never be able to run code, DESIGN.md):

- the inference model (``model.pth``), ``save_model``/``load_model``::

      {"format": "faststyle-model", "format_version": 1, "model_config": {...TransformerNet kwargs...},
       "state_dict": {...}, "meta": {...plain primitives: style name, steps, source...}}

- the training checkpoint, ``save_checkpoint``/``load_checkpoint``: whatever the training loop puts in
  (model config + weights, optimizer, step, RNG states, data order, resolved config); this module adds
  ``format``/``format_version`` and checks them on load.

Every write is atomic (``fileio``: temporary file in the destination folder, renamed over the target), so a crash
mid-write never leaves a truncated file and the previous checkpoint stays intact.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import FaststyleError
from core.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

MODEL_FORMAT = "faststyle-model"
CHECKPOINT_FORMAT = "faststyle-checkpoint"
FORMAT_VERSION = 1
LAST_CHECKPOINT_NAME = "last.pt"
CHECKPOINT_DIR_NAME = "checkpoints"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the plain module under DDP (``.module``) and/or torch.compile (``._orig_mod``) wrappers.

    Saving the wrapper would prefix every key with ``module.``/``_orig_mod.``, and such files do not load into a
    plain TransformerNet.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` onto ``path`` atomically (fileio.atomic_write_bytes).

    Serialised in memory first (checkpoints are a few MB to a few tens of MB), so a full disk is reported with
    the exact size the file needs.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save: a zip archive, or (legacy format) a pickle stream
_OTHER_KINDS = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"RIFF", "a WebP image or other RIFF file"), (b"BM", "a BMP image"),
    (b"\x08", "an ONNX model or other protobuf file"),
)


def _not_torch_file(path: Path) -> str | None:
    """What ``path`` is when its first bytes show it was not written by ``torch.save`` (None when it may be)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "an empty file"
    if head.startswith(_TORCH_MAGIC):
        return None
    for magic, kind in _OTHER_KINDS:
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a file written by torch.save"
    return "a text file"


def _safe_load(path: str | os.PathLike, what: str) -> dict:
    """``torch.load(weights_only=True)`` onto the CPU with each failure turned into a one-line FaststyleError."""
    path = Path(path)
    if path.is_dir():
        raise FaststyleError(f"{what} {path} is a folder: pass the file itself")
    if not path.is_file():
        raise FaststyleError(f"{what} not found: {path} (check the path)")
    try:
        kind = _not_torch_file(path)
    except OSError as err:
        raise FaststyleError(f"cannot read {what} {path}: {err.strerror or err}") from err
    if kind is not None:
        raise FaststyleError(f"{path} is not a faststyle {what}: it is {kind} (pass a model.pth or checkpoint "
                             "written by train.py)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any pickled object that is not a tensor or a primitive container.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FaststyleError(
            f"refusing to load {path}: it holds objects other than tensors and plain values ({first_line}); "
            f"only load files written by faststyle"
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError, AttributeError,
            IndexError) as err:
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise FaststyleError(f"cannot read {what} {path}: the file is corrupt or not a torch file ({message})") from err
    if not isinstance(obj, dict):
        raise FaststyleError(f"{path} is not a faststyle {what} (expected a dict, found {type(obj).__name__})")
    return obj


def check_state_dict(expected: dict[str, torch.Tensor], given: dict, path: Path) -> None:
    """Raise one FaststyleError line naming the keys (and both shapes) where ``given`` does not fit ``expected``,
    or saying how many of its values are not finite (a model whose weights are NaN writes black images)."""
    not_tensors = [key for key, value in given.items() if not isinstance(value, torch.Tensor)]
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    if not_tensors or missing or unexpected:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in (
            ("missing", missing), ("unexpected", unexpected), ("not tensors:", not_tensors)) if keys]
        raise FaststyleError(f"{path} does not fit its model config: {'; '.join(parts)}")
    wrong = [f"{key} is {tuple(given[key].shape)}, expected {tuple(value.shape)}" for key, value in expected.items()
             if tuple(given[key].shape) != tuple(value.shape)]
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise FaststyleError(f"{path} does not fit its model config: {'; '.join(wrong[:2])}{more}")
    check_finite(given, path)


def check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Raise one FaststyleError line when weights are NaN or infinite (such a model writes black images)."""
    bad = sum(int((~torch.isfinite(value)).sum()) for value in state_dict.values()
              if isinstance(value, torch.Tensor) and value.is_floating_point())
    if bad:
        raise FaststyleError(f"{path} holds {bad} NaN or infinite weights: the model is broken (its training "
                             "diverged?); use an earlier checkpoint")


def _check_format(obj: dict, path: Path, expected: str, what: str) -> None:
    fmt = obj.get("format")
    if fmt != expected:
        hint = {CHECKPOINT_FORMAT: " (this is a training checkpoint: pass the run's model.pth)",
                MODEL_FORMAT: " (this is an inference model: train.resume takes a run dir or its checkpoints/last.pt)",
                }.get(fmt, "") if fmt != expected else ""
        raise FaststyleError(f"{path} is not a faststyle {what}: format is {fmt!r}, expected {expected!r}{hint}")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FaststyleError(
            f"{path} has format version {version!r}; this faststyle reads up to {FORMAT_VERSION}: upgrade faststyle"
        )


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    """Write the inference file: the model's own config + weights + ``meta`` (plain primitives only).

    ``model`` is a TransformerNet, possibly wrapped by DDP or torch.compile (unwrapped here). Weights are saved
    as float32 CPU tensors so the file loads anywhere.
    """
    net = unwrap_model(model)
    state_dict = {key: value.detach().to("cpu", torch.float32) if value.is_floating_point() else value.cpu()
                  for key, value in net.state_dict().items()}
    atomic_torch_save(
        {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_config": dict(net.config()),
            "state_dict": state_dict,
            "meta": dict(meta),
        },
        path,
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Read a ``save_model`` file and return ``(TransformerNet in eval mode on device, meta)``.

    A missing, corrupt, unsafe (pickled code) or foreign file raises FaststyleError.
    """
    from models.transformer import TransformerNet  # imported here so checkpoint I/O does not need the net

    path = Path(path)
    obj = _safe_load(path, "model file")
    from interop.legacy import is_legacy_state_dict, legacy_meta, load_legacy_state_dict

    if is_legacy_state_dict(obj):  # a pytorch/examples fast_neural_style state dict (issue 7): import it
        check_finite(obj, path)
        return load_legacy_state_dict(obj).to(device).eval(), legacy_meta(path)
    _check_format(obj, path, MODEL_FORMAT, "model file")
    config, state_dict, meta = obj.get("model_config"), obj.get("state_dict"), obj.get("meta", {})
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise FaststyleError(f"{path} is incomplete: it lacks model_config or state_dict (re-export the model)")
    if not isinstance(meta, dict):
        raise FaststyleError(f"{path} is damaged: its meta is a {type(meta).__name__}, not a dict")
    try:
        # On the meta device first: checks the config against the stored shapes without allocating anything, so
        # a file whose config claims an absurd width fails in milliseconds instead of allocating gigabytes.
        with torch.device("meta"):
            skeleton = TransformerNet(**config)
    except (TypeError, ValueError) as err:
        message = str(err).strip().splitlines()[0]
        raise FaststyleError(f"{path} does not match this faststyle's TransformerNet: {message}") from err
    check_state_dict(skeleton.state_dict(), state_dict, path)
    model = TransformerNet(**config)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), dict(meta)


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
    obj = _safe_load(path, "checkpoint")
    _check_format(obj, path, CHECKPOINT_FORMAT, "training checkpoint")
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
    state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
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
            log.warning("checkpoint has %d CUDA RNG states but %d devices are visible: CUDA RNG not restored",
                        len(cuda_states), torch.cuda.device_count())
    if "numpy" in state:
        import numpy as np

        nps = state["numpy"]
        np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                             nps["cached_gaussian"]))
