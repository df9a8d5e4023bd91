"""ONNX out: a TransformerNet as an ONNX graph, for onnxruntime, mobile and web runtimes.

The graph is captured from ``ExportableStyleNet`` (interop/exportable.py: what ``TransformerNet.eval()`` computes,
with each instance norm as one ``InstanceNormalization`` node and a padding valid for every size). Its input is
``image`` (N, 3, H, W) float32 RGB in [0, 1], its output ``stylized``; a multi-style network has a second input,
``style_weights`` (num_styles,) float32, whose names are stored as ``styles`` in the metadata. The model config and
meta go into ``metadata_props`` as JSON (key ``faststyle``), which interop/onnx_model.py reads back.

ONNX opset: 18 (``DEFAULT_OPSET``): the torch.export-based exporter (``dynamo=True``, the default exporter since
torch 2.9 and the one torch 2.14 maintains) targets opset 18 natively; opset 18 is supported by onnxruntime >= 1.14
and by onnxruntime-web. InstanceNormalization is unchanged since opset 6 and Resize(nearest) since 13, so nothing in
this network needs a newer one. The exporter needs the ``onnxscript`` package.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from core.errors import FaststyleError
from core.fileio import atomic_output
from interop.exportable import MIN_SIDE, ExportableStyleNet, check_export_size
from models.modelfile import ONNX_FORMAT, ONNX_METADATA_KEY, ONNX_STYLE_INPUT_NAME
from models.transformer import TransformerNet

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
ONNX_INPUT_NAME = "image"
ONNX_OUTPUT_NAME = "stylized"


def export_onnx(
    net: TransformerNet,
    path: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    opset: int = DEFAULT_OPSET,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``net`` as an ONNX model: input ``image`` (N, 3, H, W) float32 [0, 1] -> output ``stylized``; a
    multi-style network takes a second input ``style_weights`` (num_styles,) float32, normalized in the graph.

    With ``height``/``width`` None the batch, height and width are dynamic (H, W >= MIN_SIDE); otherwise they are
    fixed to the given size (batch stays dynamic). The model config and ``meta`` (plus, for several styles, their
    names as ``styles``) are stored as JSON in the ONNX metadata (key ``faststyle``) so ``interop.onnx_model``
    can report them. Needs ``onnx`` and ``onnxscript``.
    """
    check_export_size(height, width)
    try:
        import onnx  # noqa: F401  (_save writes with it)
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
    # DYNAMIC the guard becomes a runtime check in the graph. H, W >= MIN_SIDE is checked by OnnxStyleModel.
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
    _save(model_proto, info, path)
    ops = {node.op_type for node in model_proto.graph.node}
    log.info(
        "wrote %s (opset %d, %d instance norms swapped, ops: %s)",
        path,
        opset,
        module.swapped_norms,
        ", ".join(sorted(ops)),
    )
    return path


def _save(model_proto: Any, info: dict[str, Any], path: Path) -> None:
    """Store ``info`` as JSON in the graph's metadata (key ``faststyle``), check the graph and write it atomically."""
    import onnx

    entry = model_proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(info, sort_keys=True)
    model_proto.producer_name = "faststyle"
    onnx.checker.check_model(model_proto)
    with atomic_output(path) as tmp:
        onnx.save_model(model_proto, str(tmp))
