"""How much memory stylizing takes: every estimate stylize makes, and every constant those estimates rest on.

The estimates decide how many images of a size run untiled at once and whether an image must be tiled
(``untiled_bytes_estimate``, Runner.max_batch), how tall the tiled executor's strips are (``strip_bytes``,
``pointwise_row_bytes``), and, before anything is decoded, whether an input can fit the memory available at all
(``memory_problem``). They are upper bounds on purpose: an image estimated to fit must really fit.

Three constants are calibrated on measurements rather than counted (``UNTILED_BYTES_PER_PIXEL_W32``, its fused
counterpart and ``ALLOCATOR_SLACK``); their docstrings name the command that re-measures them (README, "Speed and
memory", has the figures). Re-measure when the network, torch or the allocator changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from core.device import host_memory_available

if TYPE_CHECKING:
    from inference.tiled_plan import SpatialOp
    from models.transformer import TransformerNet

FLOAT_BYTES = 4
"""Bytes of a float32 value: activations, strips and stores are float32 whatever the network's precision."""

DECODED_BYTES_PER_PX = 4
"""Pillow holds a decoded RGB or RGBA image as 4 bytes per pixel."""

FRAME_FLOAT_BYTES_PER_PX = 16
"""Bytes per pixel of a video frame batch in hand beyond its 8-bit pixels and the network's estimate
(Runner.network_bytes): its float32 copy as it enters the network (12) and the finished 8-bit frame (3, and a
margin)."""

UNTILED_BYTES_PER_PIXEL_W32 = 1600
"""Calibrated: peak bytes per canvas pixel of a plain ``net(x)`` at base_width 32 (float32, CPU, inference mode) run
layer by layer, an upper bound of the peak RSS growth over memory layouts and allocators. Re-measure with
``python -m benchmarks stylize --only speed --variants eager_layers_malloc,cl_layers_malloc``: for each 1920x1080
variant, (peak RSS - RSS before the forward pass) / (1920 * 1088 canvas pixels) must stay below this value."""

FUSED_UNTILED_BYTES_PER_PIXEL_W32 = {True: 750, False: 1100}
"""The same bound for the fused CPU path (models/fused.py), channels-last (True) and NCHW (False); it keeps fewer
activations alive, since each convolution's output becomes the next one's padded input in one buffer. Re-measure
with ``python -m benchmarks stylize --only speed --variants cl_malloc,eager_malloc``."""

UNTILED_FIXED_BYTES_PER_PIXEL = 200
"""Of ``UNTILED_BYTES_PER_PIXEL_W32``, the bytes that do not shrink with a narrower network: the image's own float
tensors (input, padded canvas, output, color finishing; about 15 float32 copies of 12 bytes per pixel). Only the
rest is scaled by base_width / 32."""

ALLOCATOR_SLACK = 2.0
"""Calibrated: resident bytes per estimated live byte of a tiled strip. With malloc_reuse (stylize's default) glibc
keeps freed blocks for reuse, but a 64-byte-aligned allocation (torch's) cannot reuse a freed block of exactly its
own size, so a loop over equal strips holds more than one block of each size. Re-measure with
``python -m benchmarks huge``: the peak RSS it prints must stay under the bound it prints."""

FINISH_BYTES_PER_PX = 96
"""Temporary bytes per pixel of the tiled path's color finishing of one output strip (Runner._tiled_image),
counted: the content rows (uint8 and float32), finish_colors' float32 copies (YCbCr of both images, the merged
image, the blend), the 8-bit conversion and the strip pasted back, 8 float32 copies of 12 bytes at most. Passed to
the executor so that its strip sizes include it; ``python -m benchmarks huge`` checks the whole path's bound."""


def canvas_bytes_per_pixel(base_width: int, fused: bool = False, channels_last: bool = False) -> float:
    """``UNTILED_BYTES_PER_PIXEL_W32`` (``fused``: ``FUSED_UNTILED_BYTES_PER_PIXEL_W32`` of the layout) for a
    network of ``base_width``: the fixed part plus the scaled rest."""
    per_pixel = FUSED_UNTILED_BYTES_PER_PIXEL_W32[channels_last] if fused else UNTILED_BYTES_PER_PIXEL_W32
    scaled = (per_pixel - UNTILED_FIXED_BYTES_PER_PIXEL) * max(base_width, 1) / 32
    return UNTILED_FIXED_BYTES_PER_PIXEL + scaled


def untiled_bytes_estimate(net: TransformerNet, height: int, width: int, channels_last: bool = False) -> int:
    """Estimated peak bytes of a plain ``net(x)`` on one (height, width) image (float32, CPU, ``channels_last`` the
    network's memory layout), with the image's own float copies (input, canvas, output, color finishing) that do not
    shrink with a narrower network; by the fused CPU path's bound where that path serves the network."""
    from inference.tiled_plan import canvas_size
    from models import fused

    base_width = net.config().get("base_width", 32)
    per_pixel = canvas_bytes_per_pixel(base_width, fused.serves(net), channels_last)
    return int(math.prod(canvas_size(height, width)) * per_pixel)


def strip_bytes(op: SpatialOp, rows: float, in_w: int, out_w: int, sink_bytes_per_px: int | None = None) -> float:
    """Estimated peak resident bytes of computing ``rows`` output rows of ``op`` (input width ``in_w``) in the
    tiled executor: the input rows the strip reads (halo included) in up to 3 live copies (read / upsampled /
    padded / made channels-last: at most two exist at once, one more is margin), and 3 copies of the output strip
    (the conv result, the statistics pass, a device transfer). For the last layer (``sink_bytes_per_px`` given)
    also the mapped output strip and what the sink allocates per pixel. Times ALLOCATOR_SLACK: resident, not live,
    bytes."""
    k, s = op.conv.kernel_size[0], op.conv.stride[0]
    if op.transpose:
        in_rows, in_row = (rows + k) / s + 1, op.in_channels * in_w
        out_rows = rows + k
    else:
        in_rows, in_row = rows * s + k - 1, op.in_channels * (in_w * op.upsample + 2 * op.pad)
        out_rows = rows
    strip = FLOAT_BYTES * (3 * in_rows * in_row + 3 * out_rows * out_w * op.out_channels)
    if sink_bytes_per_px is not None:
        strip += rows * out_w * (op.out_channels * FLOAT_BYTES + sink_bytes_per_px)
    return strip * ALLOCATOR_SLACK


def pointwise_row_bytes(channels: int, width: int, copies: int) -> float:
    """Estimated resident bytes per row of a pointwise pass over an activation that holds ``copies`` (h, W, C)
    float32 tiles at once."""
    return copies * channels * width * FLOAT_BYTES * ALLOCATOR_SLACK


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def memory_problem(
    what: str, size: tuple[int, int], pixel_bytes: float, network_bytes: float, scale: float | None
) -> str | None:
    """One line saying that stylizing ``what`` at ``size`` (width, height) needs more memory than is available and
    what to change; None when it fits, or when the available memory is unknown (core.device)."""
    available = host_memory_available()
    need = pixel_bytes + network_bytes
    if available is None or need <= available:
        return None
    # Memory grows with the pixel count: the longer side that would fit shrinks with the square root (10% margin).
    side = max(16, int(max(size) * math.sqrt(0.9 * available / need)))
    fixes = [f"max_side_px={side} or less"]
    if scale is not None and scale > 1:
        fixes.insert(0, "a smaller scale")
    if network_bytes > pixel_bytes:
        fixes.append("a smaller max_memory_mb")
    return (
        f"{what} at {size[0]}x{size[1]} needs about {_gib(need)} of memory ({_gib(pixel_bytes)} for its pixels, "
        f"{_gib(network_bytes)} for the network) but {_gib(available)} is available: set {' or '.join(fixes)}"
    )
