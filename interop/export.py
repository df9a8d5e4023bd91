"""Export a TransformerNet to ONNX (for onnxruntime, mobile and web runtimes) and TorchScript (for C++/libtorch).

Both exports go through ``ExportableStyleNet``, an export-time equivalent of the network that

- swaps our ``models.norm.InstanceNorm`` (while a graph is captured it runs as plain mean/subtract/multiply/rsqrt
  ops, a dozen elementwise ONNX nodes) for its ``to_torch()`` equivalent, an ``nn.InstanceNorm2d`` with the same
  weight, bias and eps, which the ONNX exporter turns into one ``InstanceNormalization`` node (ONNX operator spec:
  per-instance, per-channel mean and biased variance over the spatial axes,
  ``y = scale * (x - mean) / sqrt(var + epsilon) + B``: the same formula as ours). Only layers that normalise with
  the input's statistics (``track_running_stats=False``) are swapped; others keep their running statistics and
  export as plain arithmetic;
- always pads bottom/right up to a multiple of 4 with reflection (``(-H) % 4`` rows, zero when already a multiple)
  instead of branching on the size in Python, so the traced graph stays valid for every size. This equals
  ``TransformerNet.forward`` for H, W >= 8 (``MIN_SIDE``); smaller inputs are outside the exported graph's domain.

Everything else (convs, reflection pads, nearest x2, ReLU, residual sums, crop, output mapping in eval mode) is the
network's own modules, so the exported graph computes what ``TransformerNet.eval()`` computes.

Multi-style networks (``num_styles`` S > 1, conditional instance norm) export with a second input,
``style_weights``: an (S,) float32 vector of style weights >= 0, not all 0, in table order (the names are
``meta["styles"]``, stored also as ``styles`` in the export's metadata). The graph divides it by its sum, so raw
slider values work, and applies that mix to every image of the batch: the output is
``TransformerNet.eval()(x, style_weights)``. Each conditional norm exports as one InstanceNormalization node (its
inner norm, swapped as above) followed by the mix's scale and shift (MatMuls of the mix with the (S, C) tables, a
Mul and an Add), so a web or mobile app can mix styles live with one file. One-style networks keep the
single-input graph.

ONNX opset: 18 (``DEFAULT_OPSET``): the torch.export-based exporter (``dynamo=True``, the default exporter since
torch 2.9 and the one torch 2.14 maintains) targets opset 18 natively; opset 18 is supported by onnxruntime >= 1.14
and by onnxruntime-web. InstanceNormalization is unchanged since opset 6 and Resize(nearest) since 13, so nothing in
this network needs a newer one. The exporter needs the ``onnxscript`` package.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import FaststyleError
from core.fileio import atomic_output
from models.modelfile import ONNX_FORMAT, ONNX_METADATA_KEY, ONNX_STYLE_INPUT_NAME
from models.norm import InstanceNorm
from models.styles import style_names
from models.transformer import SIZE_MULTIPLE, TransformerNet

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_SIDE = 2 * SIZE_MULTIPLE
"""Smallest height/width the exported graphs accept (TransformerNet pads smaller inputs differently)."""
MAX_SIDE = 16384
ONNX_INPUT_NAME = "image"
ONNX_OUTPUT_NAME = "stylized"


def _swap_instance_norms(module: nn.Module) -> int:
    """Replace, in place, every InstanceNorm that uses input statistics by its nn.InstanceNorm2d equivalent
    (``InstanceNorm.to_torch``); returns the count."""
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, InstanceNorm) and not child.track_running_stats:
            setattr(module, name, child.to_torch())
            swapped += 1
        else:
            swapped += _swap_instance_norms(child)
    return swapped


class ExportableStyleNet(nn.Module):
    """Export-time equivalent of a TransformerNet in eval mode (see the module docstring).

    ``forward(x)``: x (N, 3, H, W) float32 RGB in [0, 1], H, W >= MIN_SIDE -> (N, 3, H, W) in [0, 1].
    ``forward(x, style_weights)`` for a multi-style network: style_weights (num_styles,) float32 >= 0, not all 0,
    normalised to sum 1 in the graph and applied to every image of the batch.
    """

    def __init__(self, net: TransformerNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).to("cpu", torch.float32).eval()
        self.num_styles = int(net.num_styles)
        self.swapped_norms = _swap_instance_norms(self.net)
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
            # Normalised in the graph so apps can feed raw slider values; one mix for every image of the batch.
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


def _check_size(height: int | None, width: int | None) -> None:
    if (height is None) != (width is None):
        raise FaststyleError("give both --height and --width for a fixed-size export, or neither (dynamic size)")
    for side in (height, width):
        if side is not None and not MIN_SIDE <= side <= MAX_SIDE:
            raise FaststyleError(f"export sizes must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {side}")


def export_onnx(
    net: TransformerNet,
    path: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    opset: int = DEFAULT_OPSET,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``net`` as an ONNX model: input ``image`` (N, 3, H, W) float32 [0, 1] -> output ``stylized``; a
    multi-style network takes a second input ``style_weights`` (num_styles,) float32, normalised in the graph.

    With ``height``/``width`` None the batch, height and width are dynamic (H, W >= MIN_SIDE); otherwise they are
    fixed to the given size (batch stays dynamic). The model config and ``meta`` (plus, for several styles, their
    names as ``styles``) are stored as JSON in the ONNX metadata (key ``faststyle``) so ``inference.onnx_runner``
    can report them. Needs ``onnx`` and ``onnxscript``.
    """
    _check_size(height, width)
    try:
        import onnx
        import onnxscript  # noqa: F401  (the torch.export-based exporter imports it lazily; fail early and clearly)
    except ImportError as err:
        raise FaststyleError(
            f"ONNX export needs onnx and onnxscript ({err.name} missing): pip install onnx onnxscript"
        ) from err
    path = Path(path)
    module = ExportableStyleNet(net)
    example = module.example_inputs(height, width)
    # Dim.DYNAMIC rather than named Dims with ranges: torch.export cannot prove that the crop y[..., :H] stays
    # inside the padded canvas of 4 * ceil(H / 4) rows for symbolic H, and would reject explicit ranges; with
    # DYNAMIC the guard becomes a runtime check in the graph. H, W >= MIN_SIDE is checked by the runner.
    dynamic = torch.export.Dim.DYNAMIC
    dims: dict[int, Any] = {0: dynamic}
    if height is None:
        dims[2] = dynamic
        dims[3] = dynamic
    input_names, dynamic_shapes = [ONNX_INPUT_NAME], {"x": dims}
    if module.num_styles > 1:
        # The weights vector has the fixed length num_styles: nothing about it is dynamic.
        input_names.append(ONNX_STYLE_INPUT_NAME)
        dynamic_shapes["style_weights"] = None
    program = torch.onnx.export(
        module,
        example,
        input_names=input_names,
        output_names=[ONNX_OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    model_proto = program.model_proto
    info = {"format": ONNX_FORMAT, "model_config": net.config(), "meta": dict(meta or {}), "min_side": MIN_SIDE}
    info.update(module.style_info(meta))
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(info, sort_keys=True)
    model_proto.producer_name = "faststyle"
    onnx.checker.check_model(model_proto)
    with atomic_output(path) as tmp:
        onnx.save_model(model_proto, str(tmp))
    ops = {node.op_type for node in model_proto.graph.node}
    log.info(
        "wrote %s (opset %d, %d instance norms swapped, ops: %s)",
        path,
        opset,
        module.swapped_norms,
        ", ".join(sorted(ops)),
    )
    return path


def export_torchscript(
    net: TransformerNet,
    path: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``net`` as a TorchScript module (``torch.jit.load(path)(x)``, x (N, 3, H, W) [0, 1] -> same; a
    multi-style network is called ``(x, style_weights)``, style_weights (num_styles,) float32, normalised inside).

    Traced with torch.jit.trace; the pad-and-crop arithmetic on ``x.shape`` is recorded as graph ops, so any
    H, W >= MIN_SIDE works (checked by the tests at odd sizes); a given ``height``/``width`` only sets the example
    input. (torch.jit.script cannot compile TransformerNet: F.interpolate's scale_factor is an int there.) The model
    config and meta (plus, for several styles, their names as ``styles``) are stored as the extra file
    ``faststyle.json``.
    """
    _check_size(height, width)
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
