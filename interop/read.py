"""The one reader of model files: which format a file holds is decided here, and only here.

- ``.onnx``: an ONNX graph, run by onnxruntime (interop/onnx_model.py; faststyle's exports and foreign files);
- anything else is read as a torch file, safely (tensors and plain values only: nothing in it can run), and is
  either faststyle's own ``model.pth`` (models/modelfile.py) or a pytorch/examples state dict
  (interop/pytorch_examples.py, imported on the fly), told apart by their keys.

Every reader returns ``(network, meta)``: the network in eval mode with TransformerNet's inference contract
((N, 3, H, W) float RGB in [0, 1] -> the same), ``meta`` what the file says about it (style names, its source).
inference.network.load_network puts the result under the precision policy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from core.fileio import safe_torch_load
from interop.onnx_model import OnnxStyleModel, read_onnx_file
from interop.pytorch_examples import EXAMPLES_FIX, SOURCE_NAME, import_examples_state, is_examples_state_dict
from models.modelfile import MODEL_FIX, model_from_dict
from models.transformer import TransformerNet


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether :func:`read_model_file` reads ``path`` as an ONNX graph (by its suffix, in any letter case)."""
    return Path(path).suffix.lower() == ".onnx"


def read_torch_model_file(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[TransformerNet, dict[str, Any]]:
    """A faststyle ``model.pth`` or a pytorch/examples state dict (imported, its source recorded in the meta), read
    safely; returns (TransformerNet in eval mode on ``device``, meta). FaststyleError names what is wrong."""
    path = Path(path)
    origin, fix = f"faststyle or {SOURCE_NAME}", f"{MODEL_FIX} or {EXAMPLES_FIX}"
    obj = safe_torch_load(path, "model file", origin=origin, fix=fix)
    if is_examples_state_dict(obj):
        return import_examples_state(obj, path, device)
    return model_from_dict(obj, path, device)


def read_model_file(
    path: str | os.PathLike, device: str | torch.device = "cpu", pixel_range: str | int = "auto"
) -> tuple[TransformerNet | OnnxStyleModel, dict[str, Any]]:
    """(network, meta) of any model file stylize runs: a faststyle ``model.pth``, a pytorch/examples state dict, or
    an ``.onnx`` graph (run by onnxruntime on ``device``; ``pixel_range`` applies to foreign ONNX files only, see
    interop.onnx_model). Torch networks come back in eval mode on ``device``."""
    if is_onnx_file(path):
        return read_onnx_file(path, device=device, pixel_range=pixel_range)
    return read_torch_model_file(path, device=device)
