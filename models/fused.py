"""The TransformerNet body on the CPU with its memory-bound passes fused (docs/architecture.md, "The fused CPU
path").

The layer-by-layer body reads and writes every activation four more times after each convolution: instance norm,
ReLU (or the residual add), nearest upsample and reflection padding each make a full pass over memory, a large share
of a forward pass where convolutions are fast (README, "Speed and memory"). Here each convolution's output goes through
``models.norm.norm_store`` instead, which normalises it and writes it, already ReLU'd or added to the residual,
upsampled and padded, into the buffer the next convolution reads. A residual block's identity is the interior of
the padded buffer its first convolution reads, so it is never stored twice.

The last 9x9 convolution (w -> 3 channels) is computed in space-to-depth form: oneDNN pads 3 output channels to a
full vector, so the direct convolution does 16/3 of its arithmetic for nothing, and runs at a fraction of the rate
of the network's other convolutions. Rearranging its padded input into 4x4 cells (done by the same store, free)
turns it into a 3x3 convolution from 16 w to 48 channels whose output ``pixel_shuffle`` puts back in place: the
same sums, in a different order, at the rate of a wide convolution.

In float32 the result equals the layer-by-layer body up to float rounding: the norm statistics are the same code,
ReLU, upsampling and padding only move values, and only the last convolution adds its terms in another order. In
bfloat16 it rounds once where the layers round after the norm and again after the residual add.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F

from models.kernels import INSTANCE_NORM, load_kernel
from models.norm import InstanceNorm, can_store, is_channels_last, norm_store

FUSED_CPU_PATH = True
"""Whether TransformerNet takes this path where it applies (False: the layer-by-layer body, for the benchmarks'
side-by-side figures and for tests)."""

LAST_BLOCK = 4
"""Cell side of the last convolution's space-to-depth form: 4x4 cells make the 9x9 kernel a 3x3 one."""


@contextlib.contextmanager
def layer_by_layer() -> Iterator[None]:
    """Within the block, TransformerNet runs its layers one by one (the tiled executor checks its own decomposition of
    the layers against them)."""
    global FUSED_CPU_PATH
    saved, FUSED_CPU_PATH = FUSED_CPU_PATH, False
    try:
        yield
    finally:
        FUSED_CPU_PATH = saved


def serves(net: object) -> bool:
    """Whether this path runs ``net`` on CPU inputs it takes: the switch is on, the kernel is loaded, and ``net`` is a
    one-style TransformerNet with our InstanceNorm and nearest upsampling (an ONNX graph, for one, is not)."""
    if not isinstance(net, torch.nn.Module) or not hasattr(net, "encoder"):
        return False
    config = net.config()
    return (
        FUSED_CPU_PATH
        and config["norm"] == "instance"
        and config["upsample"] == "nearest"
        and net.num_styles == 1
        and isinstance(net.encoder[1], InstanceNorm)
        and load_kernel(INSTANCE_NORM)
    )


def applies(net: torch.nn.Module, canvas: torch.Tensor) -> bool:
    """Whether :func:`fused_body` runs ``net`` on ``canvas``: :func:`serves` and a CPU tensor the fused kernel takes
    (see ``models.norm.can_store``)."""
    return canvas.device.type == "cpu" and serves(net) and can_store(net.encoder[1], canvas)


def fused_body(net: torch.nn.Module, canvas: torch.Tensor) -> torch.Tensor:
    """``net.body(canvas)`` (unmapped output) by the fused path; ``canvas`` (N, 3, H, W) with H, W multiples of 4."""
    encoder, decoder = net.encoder, net.decoder
    first = encoder[0].conv
    stored = _conv(F.pad(canvas, (first.kernel_size[0] // 2,) * 4, mode="reflect"), first)
    stored = norm_store(encoder[1], stored, relu=True, pad=1)
    stored = norm_store(encoder[4], _conv(stored, encoder[3].conv), relu=True, pad=1)
    # After the encoder and each residual block, the next reader is a residual block (pad 1) or the decoder's first
    # upsampling (x2, then pad 1).
    blocks = list(net.residuals)
    after = {"pad": 1} if blocks else {"up": 2, "pad": 1}
    stored = norm_store(encoder[7], _conv(stored, encoder[6].conv), relu=True, **after)
    for index, block in enumerate(blocks):
        identity = stored[:, :, 1:-1, 1:-1]
        inner = norm_store(block.norm1, _conv(stored, block.conv1.conv), relu=True, pad=1)
        after = {"pad": 1} if index + 1 < len(blocks) else {"up": 2, "pad": 1}
        stored = norm_store(block.norm2, _conv(inner, block.conv2.conv), relu=False, residual=identity, **after)
    stored = norm_store(decoder[1], _conv(stored, decoder[0].conv), relu=True, up=2, pad=1)
    last = decoder[6].conv
    pad = last.kernel_size[0] // 2
    stored = _conv(stored, decoder[3].conv)
    if is_channels_last(stored):
        stored = norm_store(decoder[4], stored, relu=True, pad=pad, block=LAST_BLOCK)
    else:
        # the kernel writes cells in channels-last only; in NCHW one rearranging copy still leaves it much faster
        stored = _to_cells(norm_store(decoder[4], stored, relu=True, pad=pad), LAST_BLOCK)
    return last_conv(stored, last, LAST_BLOCK)


def _conv(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The convolution of a ConvLayer / UpsampleConvLayer on its already padded input."""
    return F.conv2d(x, conv.weight, conv.bias, conv.stride)


def _to_cells(x: torch.Tensor, cells: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, cells^2 C, H / cells, W / cells), pixel (Y cells + i, X cells + j) at channel
    (i cells + j) C + c of cell (Y, X): the order the kernel's store writes in channels-last."""
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // cells, cells, w // cells, cells).permute(0, 3, 5, 1, 2, 4)
    return blocks.reshape(n, cells * cells * c, h // cells, w // cells)


def last_conv(stored: torch.Tensor, conv: torch.nn.Conv2d, cells: int) -> torch.Tensor:
    """The network's last convolution, in space-to-depth form (see the module docstring), on its padded input stored
    in ``cells`` x ``cells`` cells."""
    out_channels, in_channels, k, _ = conv.weight.shape
    with torch.inference_mode(False):  # a cached index made in inference mode could not serve training later
        index = _cell_kernel_index(out_channels, in_channels, k, cells, str(conv.weight.device))
    # gather the 9x9 taps into the cells' 3x3 kernel; the index one past the taps picks the appended zero
    taps = torch.cat([conv.weight.reshape(-1), conv.weight.new_zeros(1)])
    weight = taps[index]
    bias = None if conv.bias is None else conv.bias.repeat_interleave(cells * cells)
    return F.pixel_shuffle(F.conv2d(stored, weight, bias), cells)


@lru_cache(maxsize=8)
def _cell_kernel_index(out_channels: int, in_channels: int, k: int, cells: int, device: str) -> torch.Tensor:
    """For each weight of the space-to-depth convolution, the flat index of the 9x9 tap it takes (the last index,
    one past the kernel, for a zero).

    Output channel ``o * cells^2 + i * cells + j`` computes pixel (i, j) of a cell (``pixel_shuffle``'s order); input
    channel ``(a * cells + b) * in_channels + c`` holds pixel (a, b) of a cell (the store's order); tap (ky, kx) of
    the small kernel reads the cell ky, kx steps down and right, so for output pixel (i, j) it is the big kernel's
    tap (cells * ky + a - i, cells * kx + b - j) when that lies inside the k x k kernel."""
    small = (k - 1 + cells - 1) // cells + 1
    o, i, j, a, b, c, ky, kx = torch.meshgrid(
        *(torch.arange(n) for n in (out_channels, cells, cells, cells, cells, in_channels, small, small)),
        indexing="ij",
    )
    dy, dx = cells * ky + a - i, cells * kx + b - j
    inside = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    flat = ((o * in_channels + c) * k + dy.clamp(0, k - 1)) * k + dx.clamp(0, k - 1)
    flat = torch.where(inside, flat, torch.full_like(flat, out_channels * in_channels * k * k))
    # (o, i, j, a, b, c, ky, kx) -> (o i j, a b c, ky, kx)
    return flat.reshape(out_channels * cells * cells, cells * cells * in_channels, small, small).to(device)


__all__ = ["FUSED_CPU_PATH", "LAST_BLOCK", "applies", "fused_body", "last_conv", "layer_by_layer", "serves"]
