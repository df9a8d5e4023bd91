"""Run an exported ``.onnx`` style network through onnxruntime with the same call contract as TransformerNet.

``OnnxStyleModel(path)(x)`` takes x (N, 3, H, W) float32 RGB in [0, 1] and returns (N, 3, H, W) in [0, 1] (the
same range promise as the torch model it was exported from), so ``stylize.py`` can treat both alike for untiled
inference. Files written by ``scripts/export.py`` carry the model's config and meta as JSON in the ONNX
``metadata_props`` (key ``faststyle``); any other ONNX file with one (N, 3, H, W) input and output also runs, with
empty config/meta.

onnxruntime is an optional dependency: importing this module never fails, constructing a model without it raises
FaststyleError saying what to install.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from errors import FaststyleError

log = logging.getLogger(__name__)

ONNX_METADATA_KEY = "faststyle"
"""Key in the ONNX ``metadata_props`` under which export stores {"format", "model_config", "meta"} as JSON."""

ONNX_FORMAT = "faststyle-onnx"


def onnxruntime_available() -> bool:
    """True when the ``onnxruntime`` package can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _providers_for(device: str | torch.device) -> list[str]:
    """onnxruntime execution providers for a faststyle device name; unavailable ones raise FaststyleError."""
    import onnxruntime as ort

    kind = device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]
    available = ort.get_available_providers()
    if kind == "auto":
        # Same preference order as models.device.resolve_device, restricted to what onnxruntime was built with.
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise FaststyleError(
                "this onnxruntime has no CUDA provider: install onnxruntime-gpu, or use device=cpu for .onnx models"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise FaststyleError(f"onnxruntime cannot run on device {kind!r}: use device=cpu (or cuda) for .onnx models")


class OnnxStyleModel:
    """An onnxruntime session wrapped as a callable with TransformerNet's inference contract.

    ``model(x)``: x (N, 3, H, W) float32 RGB in [0, 1] on any torch device -> (N, 3, H, W) float32 on x's device.
    It is not an ``nn.Module``: it has no parameters, no gradients and cannot be tiled by code that walks the
    torch module's layers; ``eval()``/``to()`` exist only so inference code can call them unconditionally.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None):
        path = Path(path)
        if not onnxruntime_available():
            raise FaststyleError("running .onnx models needs onnxruntime: pip install onnxruntime")
        import onnxruntime as ort

        if not path.is_file():
            raise FaststyleError(f"ONNX model file not found: {path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        # onnxruntime logs a warning for every initializer that also appears as a graph input; those are noise.
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=_providers_for(device))
        except FaststyleError:
            raise
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FaststyleError(f"{path} is not a usable ONNX model ({first_line}): re-export it") from err
        self.path = path
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
            raise FaststyleError(
                f"{path} is not a style network: expected one (N, 3, H, W) input, got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        # Static sizes are ints, dynamic ones are strings (symbolic names) or None.
        shape = inputs[0].shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_hw = tuple(d if isinstance(d, int) else None for d in shape[2:])
        self.device = torch.device("cpu") if device == "auto" else torch.device(device)
        info = self._read_metadata()
        self._config: dict[str, Any] = dict(info.get("model_config") or {})
        self.meta: dict[str, Any] = dict(info.get("meta") or {})
        self.min_side = int(info.get("min_side") or 1)
        log.info("loaded ONNX model %s (providers %s, input %s)", path, self.session.get_providers(), list(shape))

    def _read_metadata(self) -> dict[str, Any]:
        """The JSON dict export stored under ``metadata_props[faststyle]``; {} for foreign ONNX files."""
        props = self.session.get_modelmeta().custom_metadata_map
        raw = props.get(ONNX_METADATA_KEY)
        if raw is None:
            return {}
        try:
            info = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("%s: unreadable faststyle metadata, ignoring it", self.path)
            return {}
        return info if isinstance(info, dict) else {}

    def config(self) -> dict[str, Any]:
        """The TransformerNet config recorded at export time ({} for foreign ONNX files)."""
        return dict(self._config)

    def eval(self) -> OnnxStyleModel:
        """No-op (an ONNX graph is always in inference mode); returns self like nn.Module.eval()."""
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxStyleModel:
        """No-op: the execution provider is fixed at load time; outputs follow the input's torch device."""
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """Stylize a batch: x (N, 3, H, W) float in [0, 1] -> (N, 3, H, W) float32 on x's device."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        h, w = int(x.shape[2]), int(x.shape[3])
        if min(h, w) < self.min_side:
            raise FaststyleError(
                f"{self.path.name} needs images of at least {self.min_side}x{self.min_side} pixels, got {h}x{w}: "
                "use a larger image or the .pth model"
            )
        fh, fw = self.fixed_hw
        if (fh is not None and fh != h) or (fw is not None and fw != w):
            raise FaststyleError(
                f"{self.path.name} was exported for fixed size {fh}x{fw} (HxW) but got {h}x{w}: "
                "resize to that size or re-export with scripts/export.py --dynamic"
            )
        if self.fixed_batch is not None and self.fixed_batch != x.shape[0]:
            # A fixed-batch export still runs any batch size one image at a time.
            if self.fixed_batch == 1:
                return torch.cat([self(x[i : i + 1]) for i in range(x.shape[0])], dim=0)
            raise FaststyleError(f"{self.path.name} needs batches of {self.fixed_batch}: re-export with --dynamic")
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out).to(x.device)

    forward = __call__

    def __repr__(self) -> str:
        return f"OnnxStyleModel({str(self.path)!r}, providers={self.session.get_providers()})"


def load_onnx_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[OnnxStyleModel, dict]:
    """Load an ``.onnx`` style network; returns (callable model, meta) like ``models.checkpoint.load_model``."""
    model = OnnxStyleModel(path, device=device)
    return model, model.meta
