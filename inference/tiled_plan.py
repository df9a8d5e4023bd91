"""The plan of tiled inference: a TransformerNet decomposed into spatial operations (convolutions with their padding
and upsampling), each followed by the pointwise modules the executor applies lazily, and the canvas the network
computes on. A network whose structure the plan does not understand raises NotImplementedError here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from inference.tiled_stats import PointwiseFn, norm_needs_stats
from models.norm import InstanceNorm
from models.transformer import SIZE_MULTIPLE, ConvLayer, ResidualBlock, TransformerNet, UpsampleConvLayer


@dataclass
class SpatialOp:
    """One convolution stage: [nearest upsampling x ``upsample``] -> reflection pad ``pad`` -> conv (no padding),
    or a transposed convolution (``transpose=True``). ``after`` lists the pointwise modules that follow it."""

    conv: nn.Conv2d | nn.ConvTranspose2d
    pad: int = 0
    upsample: int = 1
    transpose: bool = False
    after: list[nn.Module] = field(default_factory=list)
    _weight_cache: Tensor | None = field(default=None, repr=False)

    def weight_cl(self, dtype: torch.dtype) -> Tensor:
        """The conv weight in channels-last layout and ``dtype`` (cached; oneDNN's fast NHWC path wants both
        operands channels-last)."""
        cached = self._weight_cache
        if cached is None or cached.dtype != dtype or cached.device != self.conv.weight.device:
            cached = self.conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
            self._weight_cache = cached
        return cached

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """(H_out, W_out) for an input of (height, width)."""
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        if self.transpose:
            p, op = self.conv.padding[0], self.conv.output_padding[0]
            return ((height - 1) * s - 2 * p + k + op, (width - 1) * s - 2 * p + k + op)
        h, w = height * self.upsample + 2 * self.pad, width * self.upsample + 2 * self.pad
        return ((h - k) // s + 1, (w - k) // s + 1)


def _pointwise_module(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU | nn.Identity | nn.BatchNorm2d | InstanceNorm | nn.InstanceNorm2d)


def _spatial_from(module: nn.Module) -> SpatialOp | None:
    """A SpatialOp for a conv-like module, None for a pointwise one; raises for anything else."""
    if isinstance(module, ConvLayer | UpsampleConvLayer):
        pad = module.pad
        if not isinstance(pad, nn.ReflectionPad2d) or len(set(pad.padding)) != 1:
            raise NotImplementedError(f"tiled inference needs a symmetric reflection pad, got {pad}")
        op = SpatialOp(module.conv, pad=pad.padding[0], upsample=int(getattr(module, "scale_factor", 1)))
    elif isinstance(module, nn.ConvTranspose2d):
        op = SpatialOp(module, transpose=True)
        if module.output_padding[0] > module.padding[0]:
            raise NotImplementedError("tiled inference needs output_padding <= padding for transposed convs")
    elif _pointwise_module(module):
        return None
    else:
        raise NotImplementedError(f"tiled inference does not support the layer {type(module).__name__}")
    conv = op.conv
    if (
        conv.groups != 1
        or set(conv.dilation) != {1}
        or len(set(conv.kernel_size)) != 1
        or len(set(conv.stride)) != 1
        or (not op.transpose and set(conv.padding) != {0})
    ):
        raise NotImplementedError(f"tiled inference needs square, undilated, ungrouped convs, got {conv}")
    return op


def _walk_sequential(seq: nn.Sequential) -> list[SpatialOp]:
    ops: list[SpatialOp] = []
    for module in seq:
        op = _spatial_from(module)
        if op is not None:
            ops.append(op)
        elif not ops:
            raise NotImplementedError(f"{type(module).__name__} before the first convolution is not supported")
        else:
            ops[-1].after.append(module)
    for op in ops:
        if sum(1 for m in op.after if not isinstance(m, nn.ReLU | nn.Identity)) > 1:
            raise NotImplementedError("two norms after one convolution are not supported by tiled inference")
    return ops


@dataclass
class Plan:
    """TransformerNet as: encoder ops, residual blocks (conv1 op, conv2 op), decoder ops, output mapping."""

    encoder: list[SpatialOp]
    blocks: list[tuple[SpatialOp, SpatialOp]]
    decoder: list[SpatialOp]
    output: PointwiseFn

    def ops(self) -> list[SpatialOp]:
        """Every spatial op, in the order the network runs them."""
        return [*self.encoder, *(op for block in self.blocks for op in block), *self.decoder]


def build_plan(net: TransformerNet) -> Plan:
    """Decompose ``net`` (structure documented in models/transformer.py) into streaming operations."""
    blocks = []
    for block in net.residuals:
        if not isinstance(block, ResidualBlock):
            raise NotImplementedError(f"unexpected residual block {type(block).__name__}")
        conv1, conv2 = _spatial_from(block.conv1), _spatial_from(block.conv2)
        if conv1 is None or conv2 is None:
            raise NotImplementedError("residual block convolutions must be ConvLayers")
        # ResidualBlock.forward: x + norm2(conv2(relu(norm1(conv1(x))))); no ReLU after the addition.
        conv1.after = [block.norm1, nn.ReLU()]
        conv2.after = [block.norm2]
        blocks.append((conv1, conv2))
    decoder = _walk_sequential(net.decoder)
    if not decoder or any(not isinstance(m, nn.ReLU) and norm_needs_stats(m) for m in decoder[-1].after):
        # The last convolution's strips go straight to the output, so nothing after it may need whole-image stats.
        raise NotImplementedError("tiled inference needs a last convolution without a statistics-based norm")
    return Plan(_walk_sequential(net.encoder), blocks, decoder, net.map_output)


def canvas_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of the canvas the network computes on for a height x width image (models.transformer.pad_to_multiple:
    sides rounded up to multiples of SIZE_MULTIPLE, at least 2 * SIZE_MULTIPLE)."""

    def side(n: int) -> int:
        return max(-(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE, 2 * SIZE_MULTIPLE)

    return side(height), side(width)
