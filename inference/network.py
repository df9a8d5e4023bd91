"""The one public inference call: a model file (and a style or mix of a multi-style one) becomes a network ready to
run under the precision policy (core/precision.py). stylize.py and every report and benchmark start from here, so
reading, style folding and the policy are applied the same way everywhere.

    ready = load_network("runs/x/model.pth", style="hokusai:0.3,van_gogh:0.7", device="cpu")
    out = ready(photos)  # (N, 3, H, W) float32 in [0, 1] -> the same, on the CPU
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.errors import FaststyleError
from core.precision import PrecisionPolicy, resolve_precision
from interop.read import read_model_file
from models.styles import StyleChoice, parse_style, style_names


def style_count(net: object) -> int:
    """How many styles a network read by :func:`read_model_file` holds (1 for ONNX files without a style input)."""
    return int(getattr(net, "num_styles", 1))


@dataclass
class StyleNetwork:
    """A network of one style (or mix), moved, cast and laid out as ``policy`` says, in eval mode.

    ``source`` is the network as read (on the CPU, every style) so that :meth:`with_style` folds another style
    without reading the file again; ``choice`` is None for a one-style model."""

    net: nn.Module
    meta: dict
    policy: PrecisionPolicy
    device: torch.device
    path: Path
    choice: StyleChoice | None = None
    source: nn.Module | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The style's name for file names and reports: the chosen style or mix, else the model's style."""
        if self.choice is not None:
            return self.choice.label
        return str(self.meta.get("style_stem") or self.meta.get("style") or self.path.stem)

    @property
    def style_names(self) -> list[str]:
        """The styles this model file holds (one name for a one-style model)."""
        count = style_count(self.source if self.source is not None else self.net)
        return style_names(self.meta, count) if count > 1 else [self.label]

    def with_style(self, style: str | int) -> StyleNetwork:
        """The same model file in another style or mix, under the same policy (the file is not read again)."""
        return _ready(self.source, self.meta, self.path, style, self.device, self.policy)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float photos in [0, 1], on any device -> the stylized batch, float32 on the CPU, not yet
        rounded to 8 bits (``data.io.to_uint8`` rounds as stylize.py writes)."""
        return self.net(self.policy.batch_to(x, self.device)).to("cpu", torch.float32)


def _ready(
    source: nn.Module,
    meta: dict,
    path: Path,
    style: str | int | None,
    device: torch.device,
    policy: PrecisionPolicy,
) -> StyleNetwork:
    count = style_count(source)
    choice = None
    if count > 1:
        names = style_names(meta, count)
        if style is None:
            raise FaststyleError(f"{path} holds {count} styles: pick one or a mix ({', '.join(names)})")
        choice = parse_style(style, names)
        net = source.for_style(choice.weights)
    elif style is not None:
        raise FaststyleError(f"style {style}: {path} holds one style; leave the style out")
    else:
        # The policy moves and casts in place: keep the source as read so with_style can fold it again.
        net = copy.deepcopy(source) if isinstance(source, nn.Module) else source
    if isinstance(net, nn.Module):
        net = policy.prepare_module(net, device).eval()
    return StyleNetwork(net, meta, policy, device, path, choice, source)


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
    from core.device import resolve_device

    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    path = Path(path)
    source, meta = read_model_file(
        path, device="cpu" if path.suffix.lower() != ".onnx" else device, pixel_range=pixel_range
    )
    if not isinstance(source, nn.Module) and str(precision) not in ("auto", "fp32"):
        raise FaststyleError(f"precision={precision}: .onnx models run in fp32 through onnxruntime: use auto or fp32")
    policy = resolve_precision(
        device,
        "fp32" if not isinstance(source, nn.Module) else str(precision),
        channels_last,
        False,
        training=False,
    )
    return _ready(source, meta, path, style, device, policy)
