"""Our file formats: the inference model file (``model.pth``) and what every faststyle file kind shares.

``model.pth`` is a plain dict of tensors and primitives, so that ``torch.load(..., weights_only=True)`` reads it (a
model file must never be able to run code; docs/architecture.md, "Model files and checkpoints")::

    {"format": "faststyle-model", "format_version": 1, "model_config": {...TransformerNet kwargs...},
     "state_dict": {...}, "meta": {...plain primitives: style name, steps, source...}}

The network describes itself (``TransformerNet.config()``), so ``stylize.py`` needs nothing but the file. Training
checkpoints (training/checkpoint.py) and ONNX exports (interop/export.py) carry the format names defined here.
Writes go through core.fileio (atomic), reads through its ``safe_torch_load``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from core.device import host_memory_available
from core.errors import FaststyleError
from core.fileio import atomic_torch_save, safe_torch_load
from core.limits import MODEL_RANGES
from models.transformer import TransformerNet

MODEL_FORMAT = "faststyle-model"
CHECKPOINT_FORMAT = "faststyle-checkpoint"
FORMAT_VERSION = 1
"""The newest version of both torch file kinds this code writes and reads."""

MODEL_FIX = "pass the model.pth of a training run"
"""What to do instead of passing a file that is not a model file (the end of those messages)."""

ONNX_FORMAT = "faststyle-onnx"
ONNX_METADATA_KEY = "faststyle"
"""Key in an exported ONNX file's ``metadata_props`` holding {"format", "model_config", "meta", ...} as JSON."""
ONNX_STYLE_INPUT_NAME = "style_weights"
"""The second input of an exported multi-style network: (num_styles,) float32 weights >= 0, normalised to sum 1
inside the graph (interop/export.py)."""


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


def check_state_dict(expected: dict[str, torch.Tensor], given: dict, path: Path) -> None:
    """Raise one FaststyleError line naming the keys (and both shapes) where ``given`` does not fit ``expected``,
    or saying how many of its values are not finite (a model whose weights are NaN writes black images)."""
    not_tensors = [key for key, value in given.items() if not isinstance(value, torch.Tensor)]
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    if not_tensors or missing or unexpected:
        parts = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("not tensors:", not_tensors))
            if keys
        ]
        raise FaststyleError(f"{path} does not fit its model config: {'; '.join(parts)}")
    wrong = [
        f"{key} is {tuple(given[key].shape)}, expected {tuple(value.shape)}"
        for key, value in expected.items()
        if tuple(given[key].shape) != tuple(value.shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise FaststyleError(f"{path} does not fit its model config: {'; '.join(wrong[:2])}{more}")
    check_finite(given, path)


def check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Raise one FaststyleError line when weights are NaN or infinite (such a model writes black images)."""
    bad = sum(
        int((~torch.isfinite(value)).sum())
        for value in state_dict.values()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    )
    if bad:
        raise FaststyleError(
            f"{path} holds {bad} NaN or infinite weights: the model is broken (its training "
            "diverged?); use an earlier checkpoint"
        )


def check_format(obj: dict, path: Path, expected: str, what: str) -> None:
    fmt = obj.get("format")
    if fmt != expected:
        hint = (
            {
                CHECKPOINT_FORMAT: " (this is a training checkpoint: pass the run's model.pth)",
                MODEL_FORMAT: " (this is an inference model: train.resume takes a run dir or its checkpoints/last.pt)",
            }.get(fmt, "")
            if fmt != expected
            else ""
        )
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
    state_dict = {
        key: value.detach().to("cpu", torch.float32) if value.is_floating_point() else value.cpu()
        for key, value in net.state_dict().items()
    }
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

    A missing, corrupt, unsafe (pickled code) or foreign file raises FaststyleError. pytorch/examples files are
    read by ``interop.read.read_torch_model_file``, which accepts both.
    """
    path = Path(path)
    return model_from_dict(safe_torch_load(path, "model file", fix=MODEL_FIX), path, device)


def check_model_config(config: dict, path: Path) -> TransformerNet:
    """The network ``config`` describes, built on the meta device (no memory), once its shape is within
    ``core.limits.MODEL_RANGES`` (the ranges training allows) and its weights fit in the memory left.

    Every model file, ours or pytorch/examples', goes through here before anything is allocated: a config claiming
    ``base_width=1000000000`` or a million residual blocks is one line naming the value and the range, not an
    internal "Storage size calculation overflowed" or a process the kernel kills.
    """
    for key, (low, high) in MODEL_RANGES.items():
        value = config.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise FaststyleError(
                f"{path} describes a network with {key}={value!r}, outside the allowed range {low}..{high}: the file "
                f"is damaged or describes a network faststyle does not build ({MODEL_FIX})"
            )
    try:
        with torch.device("meta"):
            skeleton = TransformerNet(**config)
    except (TypeError, ValueError) as err:
        message = str(err).strip().splitlines()[0]
        raise FaststyleError(f"{path} does not match this faststyle's TransformerNet: {message}") from err
    weights = sum(t.numel() for t in skeleton.state_dict().values())
    need, available = 4 * weights, host_memory_available()  # float32 weights
    if available is not None and need > available:
        raise FaststyleError(
            f"{path} describes a network of {weights:,} weights ({need / 2**20:,.0f} MiB), more than the "
            f"{available / 2**20:,.0f} MiB of memory available: free memory or use a smaller model"
        )
    return skeleton


def model_from_dict(obj: dict, path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The network and meta of a loaded ``save_model`` dict (``path`` names the file in messages)."""
    check_format(obj, path, MODEL_FORMAT, "model file")
    config, state_dict, meta = obj.get("model_config"), obj.get("state_dict"), obj.get("meta", {})
    if not isinstance(config, dict) or not isinstance(state_dict, dict):
        raise FaststyleError(f"{path} is incomplete: it lacks model_config or state_dict (re-export the model)")
    if not isinstance(meta, dict):
        raise FaststyleError(f"{path} is damaged: its meta is a {type(meta).__name__}, not a dict")
    # The shapes are checked against the meta-device skeleton first, so a file whose config does not fit its
    # weights fails in milliseconds instead of allocating the network it claims.
    check_state_dict(check_model_config(config, path).state_dict(), state_dict, path)
    model = TransformerNet(**config)
    model.load_state_dict(state_dict)
    return model.to(device).eval(), dict(meta)
