"""The one public inference call: a model file (and a style or mix of a multi-style one) becomes a network ready to
run under the precision policy (core/precision.py). stylize.py and every report and benchmark start from here, so
reading, style folding and the policy are applied the same way everywhere.

    ready = load_network("runs/x/model.pth", style="hokusai:0.3,van_gogh:0.7", device="cpu")
    out = ready(photos)  # (N, 3, H, W) float32 in [0, 1] -> the same, on the CPU

Two steps, for callers that need the file before they choose a style (stylize writes every style of a
multi-style model, or a video whose mix changes per frame):

    model = load_style_model("multi/model.pth", device="cpu")  # read once, policy resolved once
    for name in model.style_names:
        ready = model.network(name)

The policy is resolved here and only here for inference (``inference_policy``); the Runner takes it from the
:class:`StyleNetwork` it is given.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core import precision as precisions
from core.errors import FaststyleError
from core.precision import PrecisionPolicy
from interop.onnx_model import OnnxStyleModel
from interop.read import is_onnx_file, read_model_file
from models.styles import StyleChoice, parse_style, style_names

Network = nn.Module | OnnxStyleModel
"""What a model file gives: a TransformerNet, or an ONNX graph run by onnxruntime (same call contract)."""


def inference_policy(
    net: Network,
    device: torch.device,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    compile: bool | str = "auto",
) -> PrecisionPolicy:
    """The precision policy a network runs under on ``device`` (core.precision's inference column; ``compile`` auto
    is off: each image size compiles again, and ``true`` is for CUDA only). ONNX graphs run in fp32: onnxruntime
    computes in float32 whatever it is given, so a 16-bit input would only round the photo; a 16-bit request for one
    is refused, as is compiling one."""
    name = str(precision)
    if device.type != "cuda" and precisions.resolve_switch(compile, "compile", device, False, "fp32"):
        # On the CPU the fused path (models/fused.py) beat the compiled network, and inductor's CPU code gave wrong
        # images (NaN) for some widths and layouts under an AVX2 cap (README, "Precision and kernels").
        raise FaststyleError(
            f"compile=true is for CUDA devices (device is {device.type}): on the CPU the fused path is faster and "
            "torch.compile's code gave wrong images in some settings; use compile=auto"
        )
    if not isinstance(net, nn.Module):
        if name not in ("auto", "fp32"):
            raise FaststyleError(
                f"precision={name}: .onnx models run in fp32 through onnxruntime: use precision=auto or fp32, "
                "or the .pth model"
            )
        if precisions.resolve_switch(compile, "compile", device, False, "fp32"):
            raise FaststyleError(
                "compile=true: .onnx models run through onnxruntime: use compile=auto or the .pth model"
            )
        name, compile = "fp32", False
    return precisions.resolve_precision(device, name, channels_last, compile, training=False)


@dataclass
class StyleModel:
    """A model file read for inference, every style of it, with the precision policy for ``device`` resolved.

    ``source`` is the network as read (on the CPU for torch networks; an ONNX session on its device) and is never
    changed: :meth:`network` folds each style or mix from it and prepares that copy under ``policy``."""

    source: Network
    meta: dict
    path: Path
    device: torch.device
    policy: PrecisionPolicy

    @classmethod
    def from_network(
        cls,
        net: Network,
        device: str | torch.device = "cpu",
        *,
        precision: str = "auto",
        channels_last: bool | str = "auto",
        compile: bool | str = "auto",
        meta: dict | None = None,
        path: str | os.PathLike = "<network in memory>",
    ) -> StyleModel:
        """A network already in memory (tests, benchmarks, a network being trained) under the same policy."""
        device = _device(device)
        policy = inference_policy(net, device, precision, channels_last, compile)
        return cls(net, dict(meta or {}), Path(path), device, policy)

    @property
    def num_styles(self) -> int:
        """How many styles the file holds (1 for ONNX files without a style input)."""
        return int(getattr(self.source, "num_styles", 1))

    @property
    def style_names(self) -> list[str]:
        """The names of a multi-style model's styles, in table order (meta["styles"], else style_0, style_1, ...)."""
        return style_names(self.meta, self.num_styles)

    def choice(self, style: str | int | StyleChoice) -> StyleChoice:
        """``style`` (a name, an index, a mix as stylize's ``style=`` takes it, or a choice made already) as a
        StyleChoice of this multi-style model; FaststyleError names the valid styles."""
        if isinstance(style, StyleChoice):
            if len(style.weights) != self.num_styles:
                raise FaststyleError(f"{style.label}: {self.path} holds {self.num_styles} styles")
            return style
        return parse_style(style, self.style_names)

    def network(self, style: str | int | StyleChoice | None = None) -> StyleNetwork:
        """The network of ``style`` (required for a multi-style model, refused for a one-style one), moved, cast and
        laid out as the policy says, in eval mode."""
        choice = None
        if self.num_styles > 1:
            if style is None:
                names = ", ".join(self.style_names)
                raise FaststyleError(f"{self.path} holds {self.num_styles} styles: pick one or a mix ({names})")
            choice = self.choice(style)
            net = self.source.for_style(choice.weights)
        elif style is not None:
            raise FaststyleError(f"style {style}: {self.path} holds one style; leave the style out")
        else:
            # The policy moves and casts in place: the source stays as read for the next network.
            net = copy.deepcopy(self.source) if isinstance(self.source, nn.Module) else self.source
        if isinstance(net, nn.Module):
            net = self.policy.prepare_module(net, self.device).eval()
        return StyleNetwork(net, self, choice)


@dataclass
class StyleNetwork:
    """A network of one style (or mix) of a :class:`StyleModel`, ready under its policy; ``choice`` is None for a
    one-style model."""

    net: Network
    model: StyleModel
    choice: StyleChoice | None = None

    @property
    def meta(self) -> dict:
        return self.model.meta

    @property
    def policy(self) -> PrecisionPolicy:
        return self.model.policy

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def path(self) -> Path:
        return self.model.path

    @property
    def source(self) -> Network:
        return self.model.source

    @property
    def label(self) -> str:
        """The style's name for file names and reports: the chosen style or mix, else the model's style."""
        if self.choice is not None:
            return self.choice.label
        return str(self.meta.get("style_stem") or self.meta.get("style") or self.path.stem)

    @property
    def style_names(self) -> list[str]:
        """The styles this model file holds (one name for a one-style model)."""
        return self.model.style_names if self.model.num_styles > 1 else [self.label]

    def with_style(self, style: str | int | StyleChoice) -> StyleNetwork:
        """The same model file in another style or mix, under the same policy (the file is not read again)."""
        return self.model.network(style)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float photos in [0, 1], on any device -> the stylized batch, float32 on the CPU, not yet
        rounded to 8 bits (``data.io.to_uint8`` rounds as stylize.py writes)."""
        return self.net(self.policy.batch_to(x, self.device)).to("cpu", torch.float32)


def _device(device: str | torch.device) -> torch.device:
    from core.device import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(str(device))


def load_style_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    channels_last: bool | str = "auto",
    compile: bool | str = "auto",
    pixel_range: str | int = "auto",
) -> StyleModel:
    """Read ``path`` (interop.read.read_model_file: torch networks onto the CPU, to be prepared per style; ONNX
    graphs onto ``device``'s execution provider) and resolve the policy for ``device``; no style chosen yet."""
    device = _device(device)
    path = Path(path)
    source, meta = read_model_file(path, device=device if is_onnx_file(path) else "cpu", pixel_range=pixel_range)
    return StyleModel(source, meta, path, device, inference_policy(source, device, precision, channels_last, compile))


def load_network(
    path: str | os.PathLike,
    *,
    style: str | int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    channels_last: bool | str = "auto",
    pixel_range: str | int = "auto",
) -> StyleNetwork:
    """Read ``path`` (:func:`read_model_file`), fold a multi-style network to ``style`` (a name, an index or a mix
    as stylize's ``style=`` takes it; required for a multi-style model, refused for a one-style one) and prepare it
    under the inference precision policy for ``device``. ONNX files run by onnxruntime in fp32."""
    model = load_style_model(
        path, device=device, precision=precision, channels_last=channels_last, pixel_range=pixel_range
    )
    return model.network(style)
