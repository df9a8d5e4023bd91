"""The export-time form of a TransformerNet that both graph exporters capture (interop/onnx_export.py,
interop/torchscript_export.py).

``ExportableStyleNet`` computes what ``TransformerNet.eval()`` computes, written so that a captured graph is valid
for every size and maps to the runtimes' own operators:

- it swaps our ``models.norm.InstanceNorm`` (while a graph is captured it runs as plain mean/subtract/multiply/rsqrt
  ops, a dozen elementwise ONNX nodes) for its ``to_torch()`` equivalent, an ``nn.InstanceNorm2d`` with the same
  weight, bias and eps, which the ONNX exporter turns into one ``InstanceNormalization`` node (ONNX operator spec:
  per-instance, per-channel mean and biased variance over the spatial axes,
  ``y = scale * (x - mean) / sqrt(var + epsilon) + B``: the same formula as ours). Only layers that normalize with
  the input's statistics (``track_running_stats=False``) are swapped; others keep their running statistics and
  export as plain arithmetic (:func:`swap_instance_norms`);
- it always pads bottom/right up to a multiple of 4 with reflection (``(-H) % 4`` rows, zero when already a
  multiple) instead of branching on the size in Python, so the traced graph stays valid for every size. This equals
  ``TransformerNet.forward`` for H, W >= 8 (``MIN_SIDE``); smaller inputs are outside the exported graph's domain.

Everything else (convs, reflection pads, nearest x2, ReLU, residual sums, crop, output mapping in eval mode) is the
network's own modules.

Multi-style networks (``num_styles`` S > 1, conditional instance norm) take a second input, ``style_weights``: an
(S,) float32 vector of style weights >= 0, not all 0, in table order (the names are ``meta["styles"]``). The graph
divides it by its sum, so raw slider values work, and applies that mix to every image of the batch: the output is
``TransformerNet.eval()(x, style_weights)``. Each conditional norm exports as its inner norm (swapped as above)
followed by the mix's scale and shift (MatMuls of the mix with the (S, C) tables, a Mul and an Add), so a web or
mobile app can mix styles live with one file. One-style networks keep the single-input graph.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import FaststyleError
from models.modelfile import ONNX_STYLE_INPUT_NAME
from models.norm import InstanceNorm
from models.styles import style_names
from models.transformer import SIZE_MULTIPLE, TransformerNet

MIN_SIDE = 2 * SIZE_MULTIPLE
"""Smallest height/width the exported graphs accept (TransformerNet pads smaller inputs differently)."""
MAX_SIDE = 16384


def swap_instance_norms(module: nn.Module) -> int:
    """Replace, in place, every InstanceNorm that uses input statistics by its nn.InstanceNorm2d equivalent
    (``InstanceNorm.to_torch``); returns the count. The exporters use it, and the benchmarks to run the plain
    configuration pytorch/examples runs."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, InstanceNorm) and not child.track_running_stats:
            setattr(module, name, child.to_torch())
            swapped += 1
        else:
            swapped += swap_instance_norms(child)
    return swapped


class ExportableStyleNet(nn.Module):
    """Export-time equivalent of a TransformerNet in eval mode (see the module docstring).

    ``forward(x)``: x (N, 3, H, W) float32 RGB in [0, 1], H, W >= MIN_SIDE -> (N, 3, H, W) in [0, 1].
    ``forward(x, style_weights)`` for a multi-style network: style_weights (num_styles,) float32 >= 0, not all 0,
    normalized to sum 1 in the graph and applied to every image of the batch.
    """

    def __init__(self, net: TransformerNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).to("cpu", torch.float32).eval()
        self.num_styles = int(net.num_styles)
        self.swapped_norms = swap_instance_norms(self.net)
        self.multiple = SIZE_MULTIPLE
        self.eval()

    def forward(self, x: torch.Tensor, style_weights: torch.Tensor | None = None) -> torch.Tensor:
        # Python checks, run once while tracing: which inputs the graph has is fixed at export time.
        if style_weights is None and self.num_styles > 1:
            raise ValueError(f"this network holds {self.num_styles} styles: pass style_weights ({self.num_styles},)")
        if style_weights is not None and self.num_styles == 1:
            raise ValueError("this network holds one style: call it without style_weights")
        height, width = x.shape[-2], x.shape[-1]
        # Rows/columns to the next multiple of 4; zero-width reflection padding is a no-op, so no branch is needed.
        pad_h = (self.multiple - height % self.multiple) % self.multiple
        pad_w = (self.multiple - width % self.multiple) % self.multiple
        canvas = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        if style_weights is None:
            y = self.net.decoder(self.net.residuals(self.net.encoder(canvas)))
        else:
            # Normalized in the graph so apps can feed raw slider values; one mix for every image of the batch.
            weights = style_weights.to(torch.float32).reshape(1, self.num_styles)
            mix = (weights / weights.sum()).expand(x.shape[0], self.num_styles)
            y = self.net.body(canvas, mix)
        return self.net.map_output(y[:, :, :height, :width])

    def example_inputs(self, height: int | None, width: int | None) -> tuple[torch.Tensor, ...]:
        """The inputs to trace with: the example batch, plus (1, 2, ..., S) weights for a multi-style network."""
        x = _example_input(height, width)
        if self.num_styles == 1:
            return (x,)
        return x, torch.arange(1, self.num_styles + 1, dtype=torch.float32)

    def style_info(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        """Metadata entries of a multi-style export (the style names in input order, the style input's name);
        {} for one style, so one-style exports carry what they always did."""
        if self.num_styles == 1:
            return {}
        return {"styles": style_names(dict(meta or {}), self.num_styles), "style_input": ONNX_STYLE_INPUT_NAME}


def _example_input(height: int | None, width: int | None) -> torch.Tensor:
    """A (2, 3, H, W) example batch; batch 2 so torch.export does not specialise the batch dimension to 1."""
    h = height if height is not None else 64
    w = width if width is not None else 96
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def check_export_size(height: int | None, width: int | None) -> None:
    """FaststyleError unless both sides are given (a fixed-size export) or neither (dynamic), within the limits."""
    if (height is None) != (width is None):
        raise FaststyleError("give both --height and --width for a fixed-size export, or neither (dynamic size)")
    for side in (height, width):
        if side is not None and not MIN_SIDE <= side <= MAX_SIDE:
            raise FaststyleError(f"export sizes must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {side}")
