"""TorchScript out: a TransformerNet as a traced TorchScript module, for C++/libtorch and older mobile runtimes.

The trace is taken of ``ExportableStyleNet`` (interop/exportable.py), the same export-time form the ONNX export
captures. torch marks TorchScript deprecated; ONNX (interop/onnx_export.py) is the portable format.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from core.fileio import atomic_output
from interop.exportable import ExportableStyleNet, check_export_size
from models.modelfile import ONNX_METADATA_KEY
from models.transformer import TransformerNet

log = logging.getLogger(__name__)


def export_torchscript(
    net: TransformerNet,
    path: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``net`` as a TorchScript module (``torch.jit.load(path)(x)``, x (N, 3, H, W) [0, 1] -> same; a
    multi-style network is called ``(x, style_weights)``, style_weights (num_styles,) float32, normalized inside).

    Traced with torch.jit.trace; the pad-and-crop arithmetic on ``x.shape`` is recorded as graph ops, so any
    H, W >= MIN_SIDE works (checked by the tests at odd sizes); a given ``height``/``width`` only sets the example
    input. (torch.jit.script cannot compile TransformerNet: F.interpolate's scale_factor is an int there.) The model
    config and meta (plus, for several styles, their names as ``styles``) are stored as the extra file
    ``faststyle.json``.
    """
    check_export_size(height, width)
    path = Path(path)
    module = ExportableStyleNet(net)
    with warnings.catch_warnings():
        # torch 2.9+ marks torch.jit.* deprecated (FutureWarning on every call); TorchScript is still the format
        # libtorch/C++ and older mobile runtimes load, so we keep it and say so once in the log instead.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        with torch.no_grad():
            # Traced: the shape arithmetic of the pad/crop (x.shape[-2] % 4 ...) is recorded as graph ops, so the
            # trace is valid for every size; check_trace=False because re-running for the check doubles the cost.
            traced = torch.jit.trace(module, module.example_inputs(height, width), check_trace=False)
        info = {"format": "faststyle-torchscript", "model_config": net.config(), "meta": dict(meta or {})}
        info.update(module.style_info(meta))
        extra = {f"{ONNX_METADATA_KEY}.json": json.dumps(info, sort_keys=True)}
        with atomic_output(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files=extra)
    log.info(
        "wrote %s (TorchScript, traced; %d instance norms swapped; note: torch marks TorchScript deprecated, "
        "ONNX is the portable format)",
        path,
        module.swapped_norms,
    )
    return path
