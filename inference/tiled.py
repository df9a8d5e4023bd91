"""Exact inference of a TransformerNet on images of any size, with bounded memory (layer-wise streaming).

Why not naive tiling: instance norm normalizes each channel with the mean and variance over the *whole* image
(Ulyanov et al. 2016). Stylizing tiles independently gives every tile its own statistics, which shows as tone jumps
and seams. Overlapping tiles with blending hide the seams but still do not reproduce the untiled result.

What this module does instead (exact up to floating-point summation order):

1. The network is walked layer by layer (``build_plan``). Each convolution's full output is kept in a *store*:
   a tensor in RAM, or a file on disk (``DiskStore``, read and written with ``os.pread``/``os.pwrite`` so the data
   lives in the OS page cache and never counts towards this process's resident memory) once the memory budget
   would be exceeded.
2. A convolution's output is computed in full-width horizontal strips. A strip reads only the input rows it needs
   plus that one convolution's halo: reflection padding at the true image border, real neighbouring rows inside.
   Horizontal padding, nearest upsampling and the convolution itself are the same torch calls the network makes.
3. While a strip is written, per-channel statistics of the raw convolution output are merged into running totals
   with the parallel variance formula of Chan, Golub & LeVeque (1979) in float64. The naive ``E[x^2] - E[x]^2``
   is avoided on purpose: it cancels catastrophically in float32 (docs/architecture.md, "Numerics").
4. The norm and ReLU that follow a convolution are pointwise once the statistics are known, so they are applied
   lazily, when the next convolution reads its input strip. Batch norm in eval mode uses its running statistics
   and is pointwise from the start.
5. A residual block keeps its input store for the skip connection and adds ``norm2(conv2(...))`` into it in place.
6. Neither the input nor the output image is ever held as float32: the first convolution reads its strips from
   the caller's image through ``read_rows`` (uint8 rows converted to float per strip, the canvas padding gathered
   exactly), and the last convolution's strips are mapped to RGB and handed to the caller's ``sink`` one by one
   (``TiledExecutor.stream``), without a store. stylize's sink (inference/runner.py) applies the color options
   and writes uint8.

Every layer is computed once (plus the small halo rows), so the cost is about one untiled forward pass. Memory:
the stores kept in RAM plus the strip being computed stay within the budget (strip heights come from an estimate
of their working tensors, see ``_strip_bytes`` and ``_strip_rows``); the caller's images are outside it.
``TiledExecutor`` checks once, on a small random image with tiny strips, that its decomposition reproduces
``net(x)``; a network it does not understand raises instead of silently producing a different image.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.device import release_freed_heap
from models.norm import InstanceNorm
from models.transformer import (
    SIZE_MULTIPLE,
    ConvLayer,
    ResidualBlock,
    TransformerNet,
    UpsampleConvLayer,
    pad_to_multiple,
)

logger = logging.getLogger(__name__)

_FLOAT_BYTES = 4
# Peak activation bytes per canvas pixel of an untiled forward pass at base_width 32 (float32, CPU, inference
# mode): the peak RSS growth of a 1920x1080 forward (``python -m scripts.bench stylize``) is 700-960 B/px depending
# on memory layout and allocator, and the margin above that makes an image that is estimated to fit really fit.
UNTILED_BYTES_PER_PIXEL_W32 = 1100
# Of those, the image's own float tensors (input, padded canvas, output, color finishing: ~15 copies of 12 B/px)
# do not shrink with a narrower network; only the rest is scaled by base_width / 32.
UNTILED_FIXED_BYTES_PER_PIXEL = 200
MIN_STRIP_MB = 64
"""A strip is at least one row: below this many MiB per strip an image is never refused for being too wide (the
budget may then be exceeded by up to this much); a one-row strip larger than max(budget, this) is refused."""
MIN_FAST_ROWS = 16
"""A store stays in RAM only if strips of this many rows still fit beside it (thinner strips are slower)."""
ALLOCATOR_SLACK = 2.0
"""Resident bytes per estimated live strip byte. With malloc_reuse (stylize's default) glibc keeps freed blocks for
reuse, but a 64-byte-aligned allocation (torch's) cannot reuse a freed block of exactly its own size, so a loop
over equal strips holds two or three blocks of each size; the peak RSS growth of a large tiled image stays below
twice the live estimate (layers trimmed: core.device.release_freed_heap)."""

RowReader = Callable[[int, int], Tensor]
"""``read_rows(lo, hi)``: rows [lo, hi) of an image as an (hi - lo, W, C >= 3) tensor, uint8 0..255 or float
[0, 1]; channels after the third (alpha) are ignored."""
StripSink = Callable[[int, Tensor], None]
"""``sink(row, strip)``: receives a (3, h, W) float32 CPU strip in [0, 1], the result's rows [row, row + h)."""


# ----------------------------------------------------------------------------------------------------------------
# Stores: one full activation (C, H, W) float32, in RAM or on disk.
# ----------------------------------------------------------------------------------------------------------------
class RamStore:
    """An activation of C channels, H x W, held as an (H, W, C) float32 CPU tensor (channels-last).

    Channels-last because oneDNN's CPU convolutions run fastest on NHWC (``python -m scripts.bench stylize``
    compares the layouts), and a strip of rows is then one contiguous block. Memory is allocated on the first
    write; a write of the whole activation adopts the tensor instead of copying it.
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.shape = (channels, height, width)
        self.data: Tensor | None = None
        self.nbytes = channels * height * width * _FLOAT_BYTES

    def read(self, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) as an (hi - lo, W, C) tensor: a view of the store (modifying it modifies the store)."""
        return self.data[lo:hi]

    def write(self, lo: int, tile: Tensor) -> None:
        """Store the (h, W, C) ``tile`` at rows [lo, lo + h)."""
        if self.data is None:
            if lo == 0 and tile.shape[0] == self.shape[1] and tile.is_contiguous():
                self.data = tile
                return
            self.data = torch.empty((self.shape[1], self.shape[2], self.shape[0]), dtype=torch.float32)
        if self.data[lo:].data_ptr() != tile.data_ptr():
            self.data[lo : lo + tile.shape[0]].copy_(tile)

    def close(self) -> None:
        self.data = None


class DiskStore:
    """An activation of C channels, H x W, in a temporary file laid out as (H, W, C) float32.

    A strip of rows is one contiguous byte range (one read, one write). Plain pread/pwrite rather than a memory
    map: mapped pages that are touched count as resident memory of the process, page-cache pages do not, so the
    process's peak RSS stays bounded by the budget.
    """

    def __init__(self, channels: int, height: int, width: int, directory: str) -> None:
        self.shape = (channels, height, width)
        self.nbytes = 0  # on disk: no RAM
        self._row_bytes = channels * width * _FLOAT_BYTES
        fd, self.path = tempfile.mkstemp(prefix="faststyle-tile-", suffix=".f32", dir=directory)
        self._fd: int | None = fd
        os.ftruncate(fd, height * self._row_bytes)

    def read(self, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) as a fresh (hi - lo, W, C) tensor."""
        channels, _, width = self.shape
        buf = torch.empty((hi - lo, width, channels), dtype=torch.float32)
        view = memoryview(buf.numpy()).cast("B")
        offset, done = lo * self._row_bytes, 0
        while done < len(view):  # pread may return fewer bytes than asked (2 GiB per call on Linux)
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from {self.path}")
            done += got
        return buf

    def write(self, lo: int, tile: Tensor) -> None:
        """Store the (h, W, C) ``tile`` at rows [lo, lo + h)."""
        view = memoryview(tile.contiguous().numpy()).cast("B")
        offset, done = lo * self._row_bytes, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            os.unlink(self.path)


class SourceStore:
    """The network's input canvas, read in row strips from the caller's image (nothing image-sized is held).

    The canvas is the image padded at the bottom and right as models.transformer.pad_to_multiple pads it
    (reflection, or replication for images too small to reflect); padded rows and columns are gathered from the
    image rows they copy, so a strip equals the same rows of the padded float image exactly. uint8 rows are
    converted to float32 in [0, 1] as data.io.pil_to_tensor converts them (``x.float() / 255``).
    """

    def __init__(self, read_rows: RowReader, height: int, width: int) -> None:
        canvas_h, canvas_w = canvas_size(height, width)
        self.shape = (3, canvas_h, canvas_w)
        self.nbytes = 0  # the caller's image: not counted
        self._read_rows, self._height = read_rows, height
        reflect = canvas_h - height < height and canvas_w - width < width
        self._row_of = _padded_index(height, canvas_h, reflect)  # canvas row -> image row
        self._col_of = _padded_index(width, canvas_w, reflect) if canvas_w != width else None

    def read(self, lo: int, hi: int) -> Tensor:
        """Canvas rows [lo, hi) as a contiguous (hi - lo, W_canvas, 3) float32 tensor in [0, 1]."""
        if hi <= self._height:
            rows = self._read_rows(lo, hi)[..., :3]
        else:  # reaches the bottom padding
            index = self._row_of[lo:hi]
            first, last = int(index.min()), int(index.max())
            rows = self._read_rows(first, last + 1)[..., :3].index_select(0, index - first)
        if self._col_of is not None:
            rows = rows.index_select(1, self._col_of)
        if rows.dtype == torch.uint8:
            return rows.float().div_(255.0)
        return rows.to(torch.float32).contiguous()

    def close(self) -> None:
        pass


def _padded_index(size: int, padded: int, reflect: bool) -> Tensor:
    """For each of ``padded`` positions, the position of the ``size`` it copies (F.pad at the end, mode reflect
    or replicate)."""
    index = torch.arange(padded)
    beyond = index >= size
    index[beyond] = 2 * (size - 1) - index[beyond] if reflect else size - 1
    return index


class SinkStore:
    """Takes the place of the last convolution's store: each strip written to it is cropped to the image, passed
    through the pending pointwise functions and the output mapping, and handed to the sink. Nothing is kept."""

    def __init__(
        self,
        channels: int,
        canvas_h: int,
        canvas_w: int,
        height: int,
        width: int,
        pending: list[PointwiseFn],
        output: Callable[[Tensor], Tensor],
        sink: StripSink,
    ) -> None:
        self.shape = (channels, canvas_h, canvas_w)
        self.nbytes = 0
        self._height, self._width = height, width
        self._pending, self._output, self._sink = pending, output, sink

    def write(self, lo: int, tile: Tensor) -> None:
        """Hand rows [lo, lo + h) of the (h, W_canvas, C) ``tile`` (our own tensor) to the sink."""
        hi = min(lo + tile.shape[0], self._height)
        if hi <= lo:  # bottom padding rows of the canvas
            return
        strip = tile[: hi - lo, : self._width]
        for fn in self._pending:
            strip = fn(strip, True)
        self._sink(lo, self._output(strip.permute(2, 0, 1)))

    def close(self) -> None:
        pass


Store = RamStore | DiskStore | SourceStore | SinkStore


# ----------------------------------------------------------------------------------------------------------------
# Statistics and pointwise operations.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ChannelStats:
    """Per-channel count, mean and sum of squared deviations (M2), merged strip by strip in float64."""

    channels: int
    count: int = 0
    mean: Tensor = field(default=None)  # type: ignore[assignment]
    m2: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.mean = torch.zeros(self.channels, dtype=torch.float64)
        self.m2 = torch.zeros(self.channels, dtype=torch.float64)

    def add(self, tile: Tensor) -> None:
        """Merge the statistics of an (h, W, C) tile (Chan, Golub & LeVeque 1979, pairwise update).

        Within the tile: two passes in float32 (mean by torch's cascade sum, then the sum of squared deviations),
        which is stable and about twice as fast as torch.var_mean on CPU.
        """
        n_b = tile.shape[0] * tile.shape[1]
        mean_b32 = tile.sum(dim=(0, 1)) / n_b
        m2_b = (tile - mean_b32).square_().sum(dim=(0, 1)).double().cpu()
        mean_b = mean_b32.double().cpu()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (self.count * n_b / n)
        self.count = n

    @property
    def var(self) -> Tensor:
        """Biased (population) variance, as instance norm uses."""
        return self.m2 / max(self.count, 1)


PointwiseFn = Callable[[Tensor, bool], Tensor]
"""A pointwise function on (h, W, C) tiles; the bool says whether it may modify its argument in place."""


def _relu(t: Tensor, inplace: bool) -> Tensor:
    return t.relu_() if inplace else torch.relu(t)


def _norm_needs_stats(module: nn.Module) -> bool:
    """True when ``module`` normalizes with statistics of its input (instance norm, or a norm without buffers)."""
    if isinstance(module, nn.Identity):
        return False
    if isinstance(module, nn.BatchNorm2d):
        # Batch norm uses batch statistics when training or without running stats: with one image, those are the
        # per-channel statistics over the whole image, exactly like instance norm.
        return module.training or not module.track_running_stats
    if isinstance(module, InstanceNorm | nn.InstanceNorm2d):
        return module.training or not module.track_running_stats
    raise NotImplementedError(f"tiled inference does not support the norm layer {type(module).__name__}")


def _norm_fn(module: nn.Module, stats: ChannelStats | None) -> PointwiseFn:
    """The pointwise function computing ``module`` on (h, W, C) tiles, given whole-image ``stats`` if it needs them.

    Folded into one per-channel affine map ``x * scale + shift`` (scale = weight / sqrt(var + eps), shift = bias -
    mean * scale, both computed in float64), which is one fused pass over the tile.
    """
    if isinstance(module, nn.Identity):
        return lambda t, inplace: t
    if stats is not None:
        mean, var = stats.mean, stats.var
    else:
        mean, var = module.running_mean.double().cpu(), module.running_var.double().cpu()
    scale = torch.rsqrt(var + module.eps)
    shift = -mean * scale
    if getattr(module, "weight", None) is not None:
        weight, bias = module.weight.detach().double().cpu(), module.bias.detach().double().cpu()
        scale, shift = scale * weight, shift * weight + bias
    scale32, shift32 = scale.float(), shift.float()

    def apply(t: Tensor, inplace: bool) -> Tensor:
        if inplace:
            return t.mul_(scale32).add_(shift32)
        return torch.addcmul(shift32, t, scale32)

    return apply


# ----------------------------------------------------------------------------------------------------------------
# The plan: the network as a list of spatial operations, each followed by pointwise modules.
# ----------------------------------------------------------------------------------------------------------------
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
    if not decoder or any(not isinstance(m, nn.ReLU) and _norm_needs_stats(m) for m in decoder[-1].after):
        # The last convolution's strips go straight to the output, so nothing after it may need whole-image stats.
        raise NotImplementedError("tiled inference needs a last convolution without a statistics-based norm")
    return Plan(_walk_sequential(net.encoder), blocks, decoder, net.map_output)


# ----------------------------------------------------------------------------------------------------------------
# The executor.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Lazy:
    """An activation = ``pending`` pointwise functions applied to the raw values in ``store``."""

    store: Store
    pending: list[PointwiseFn] = field(default_factory=list)

    def read(self, lo: int, hi: int, inplace: bool = False) -> Tensor:
        """Rows [lo, hi) as (h, W, C) with the pending functions applied. ``inplace``: the caller will not read
        these rows of the raw store again, so they may be overwritten (no new allocation)."""
        tile = self.store.read(lo, hi)
        may_modify = inplace or isinstance(self.store, DiskStore)  # a disk read is a fresh buffer
        for fn in self.pending:
            tile = fn(tile, may_modify)
            may_modify = True  # after the first non-in-place function the tile is our own copy
        return tile


def _nchw_view(tile: Tensor) -> Tensor:
    """(h, W, C) -> (1, C, h, W) channels-last view without a copy.

    unsqueeze *before* permute: the batch stride must be h*W*C for torch to recognise the layout as channels-last
    (``permute(2, 0, 1).unsqueeze(0)`` gives batch stride C, and pad/interpolate then silently return NCHW
    copies, which cost about a third of the run time).
    """
    return tile.unsqueeze(0).permute(0, 3, 1, 2)


class TiledExecutor:
    """Runs a TransformerNet (eval mode) on one image at a time with working memory bounded by ``budget_mb``.

    Args:
        net: the network, in eval mode; its parameters' device and dtype are used for the convolutions.
        budget_mb: memory (MiB) for everything the executor allocates: activation stores kept in RAM and the
            strips being computed (their inputs, copies and outputs, and the sink's work on the output strips).
            Stores that do not fit go to temporary files in ``tmp_dir``. The caller's input and output images are
            not counted. Strips are at least one row: when one row of some layer does not fit in what the stores
            leave free, that strip goes over the budget by at most MIN_STRIP_MB; an image so wide that a one-row
            strip needs more than max(budget, MIN_STRIP_MB) is refused (ValueError).
        tmp_dir: folder for disk stores (default: the system temp folder).
        strip_rows: force this many output rows per strip (tests); default: sized from the budget.
        verify: check once that the decomposition reproduces ``net`` (cheap; keep it on).
    """

    def __init__(
        self,
        net: TransformerNet,
        budget_mb: float,
        tmp_dir: str | None = None,
        strip_rows: int | None = None,
        verify: bool = True,
    ) -> None:
        if net.training:
            raise ValueError("TiledExecutor needs the network in eval mode (net.eval())")
        self.net = net
        self.plan = build_plan(net)
        self.budget_bytes = int(budget_mb * 2**20)
        self.tmp_dir = tmp_dir
        self.strip_rows = strip_rows
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._ram_in_use = 0
        self._open: list[Store] = []
        self._tmp = ""
        self.disk_stores_used = 0
        self.peak_store_bytes = 0  # most bytes of activation stores held in RAM at once (last call)
        self.peak_work_bytes = 0  # largest estimated RAM stores + strip working set (last call)
        self._raw_output = False
        if verify:
            self._verify()

    # -- public ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, image: Tensor) -> Tensor:
        """Stylize one image: (1, 3, H, W) or (3, H, W) float in [0, 1] -> (1, 3, H, W) float32 on the CPU, in
        [0, 1]; equal to ``net(image)`` up to floating-point summation order."""
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"expected one (1, 3, H, W) image, got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        rows_hwc = image[0].detach().to("cpu", torch.float32).permute(1, 2, 0)  # (H, W, 3) view
        out = torch.empty((1, 3, height, width), dtype=torch.float32)

        def write(row: int, strip: Tensor) -> None:
            out[0, :, row : row + strip.shape[1]] = strip

        self.stream(lambda lo, hi: rows_hwc[lo:hi], height, width, write)
        return out

    @torch.inference_mode()
    def stream(
        self, read_rows: RowReader, height: int, width: int, sink: StripSink, sink_bytes_per_px: int = 0
    ) -> None:
        """Stylize one height x width image that is read and delivered in row strips; nothing image-sized is
        allocated here.

        Args:
            read_rows: ``read_rows(lo, hi)`` -> rows [lo, hi) of the image as (hi - lo, width, C >= 3), uint8 in
                0..255 or float in [0, 1] (channels after the third are ignored). Called while the first
                convolution runs, and not after it.
            sink: ``sink(row, strip)`` receives the result in consecutive strips covering rows 0..height - 1 in
                order: ``strip`` is (3, h, width) float32 CPU in [0, 1] for rows [row, row + h), equal to those
                rows of ``net(image)`` up to floating-point summation order. It may keep no reference to it.
            sink_bytes_per_px: temporary bytes the sink allocates per pixel of a strip (counted in the budget).

        Raises ValueError when the image is too wide for the budget (see the class docstring); OSError when a
        disk store cannot be written (disk full). Temporary files are removed in every case.
        """
        self._check_fits(height, width, sink_bytes_per_px)
        self._ram_in_use, self.disk_stores_used, self.peak_store_bytes, self.peak_work_bytes = 0, 0, 0, 0
        with tempfile.TemporaryDirectory(prefix="faststyle-tiled-", dir=self.tmp_dir) as tmp:
            self._tmp = tmp
            try:
                act = _Lazy(SourceStore(read_rows, height, width))
                for op in self.plan.encoder:
                    act = self._conv(act, op, free_input=True)
                for conv1, conv2 in self.plan.blocks:
                    skip = self._materialize(act)
                    hidden = self._conv(skip, conv1, free_input=False)
                    delta = self._conv(hidden, conv2, free_input=True)
                    self._add_into(skip.store, delta)
                    act = skip
                for op in self.plan.decoder[:-1]:
                    act = self._conv(act, op, free_input=True)
                # The last convolution's strips go straight to the sink: its output is never stored.
                last = self.plan.decoder[-1]
                fns = [_relu if isinstance(m, nn.ReLU) else _norm_fn(m, None) for m in last.after]
                out = SinkStore(
                    last.out_channels,
                    *last.out_size(*act.store.shape[1:]),
                    height,
                    width,
                    fns,
                    (lambda t: t) if self._raw_output else self.plan.output,
                    sink,
                )
                self._conv(act, last, free_input=True, out=out, sink_bytes_per_px=sink_bytes_per_px)
            finally:
                for store in self._open:  # after an error: close files and drop RAM stores
                    store.close()
                self._open = []
        logger.debug(
            "tiled %dx%d: %d activations on disk, RAM stores at most %.0f MiB, estimated working set at most %.0f MiB",
            width,
            height,
            self.disk_stores_used,
            self.peak_store_bytes / 2**20,
            self.peak_work_bytes / 2**20,
        )

    # -- memory accounting -------------------------------------------------------------------------------------
    @staticmethod
    def _strip_bytes(op: SpatialOp, rows: float, in_w: int, out_w: int, sink_bytes_per_px: int | None = None) -> float:
        """Estimated peak bytes of computing ``rows`` output rows of ``op`` (input width ``in_w``): the input rows
        the strip reads (halo included) in up to 3 live copies (read / upsampled / padded / made channels-last:
        at most two exist at once, one more is margin), and 3 copies of the output strip (the conv result, the
        statistics pass, a device transfer). For the last layer (``sink_bytes_per_px`` given) also the mapped
        output strip and what the sink allocates per pixel. Times ALLOCATOR_SLACK: resident, not live, bytes."""
        k, s = op.conv.kernel_size[0], op.conv.stride[0]
        if op.transpose:
            in_rows, in_row = (rows + k) / s + 1, op.in_channels * in_w
            out_rows = rows + k
        else:
            in_rows, in_row = rows * s + k - 1, op.in_channels * (in_w * op.upsample + 2 * op.pad)
            out_rows = rows
        strip = _FLOAT_BYTES * (3 * in_rows * in_row + 3 * out_rows * out_w * op.out_channels)
        if sink_bytes_per_px is not None:
            strip += rows * out_w * (op.out_channels * _FLOAT_BYTES + sink_bytes_per_px)
        return strip * ALLOCATOR_SLACK

    def _strip_rows(self, fixed: float, per_row: float, height: int) -> int:
        """Rows per strip (at least 1, at most ``height``) for a pass whose strip of r rows needs an estimated
        ``fixed + r * per_row`` bytes: the most that fit in what the RAM stores leave of the budget, and in a
        quarter of the budget (larger strips are not faster). Records that working set. Every strip height, of
        convolutions and of pointwise passes alike, is chosen here."""
        if self.strip_rows is not None:
            rows = max(1, min(self.strip_rows, height))
        else:
            available = min(self.budget_bytes / 4, self.budget_bytes - self._ram_in_use)
            rows = max(1, min(height, int((available - fixed) // max(per_row, 1.0))))
        self._note_work(fixed + per_row * rows)
        return rows

    def _check_fits(self, height: int, width: int, sink_bytes_per_px: int) -> None:
        """ValueError when a one-row strip of some layer needs more than max(budget, MIN_STRIP_MB). Not checked when
        ``strip_rows`` is forced (tests, the self-check): the budget then does not size the strips."""
        if self.strip_rows is not None:
            return
        h, w = canvas_size(height, width)
        ops = [*self.plan.encoder, *(op for block in self.plan.blocks for op in block), *self.plan.decoder]
        worst = 0.0
        for i, op in enumerate(ops):
            out_h, out_w = op.out_size(h, w)
            extra = sink_bytes_per_px if i == len(ops) - 1 else None
            worst = max(worst, self._strip_bytes(op, 1, w, out_w, extra))
            h, w = out_h, out_w
        limit = max(self.budget_bytes, MIN_STRIP_MB * 2**20)
        if worst > limit:
            raise ValueError(
                f"a {width}x{height} image is too wide for tiled inference in {self.budget_bytes / 2**20:g} MiB: a "
                f"one-row strip needs {worst / 2**20:.0f} MiB"
            )

    def _note_work(self, strip_bytes: float) -> None:
        self.peak_work_bytes = max(self.peak_work_bytes, int(self._ram_in_use + strip_bytes))

    # -- steps -----------------------------------------------------------------------------------------------
    def _alloc(self, channels: int, height: int, width: int, in_ram: bool) -> Store:
        size = channels * height * width * _FLOAT_BYTES
        if in_ram:
            self._ram_in_use += size
            self.peak_store_bytes = max(self.peak_store_bytes, self._ram_in_use)
            store: Store = RamStore(channels, height, width)
        else:
            self.disk_stores_used += 1
            logger.debug("activation %dx%dx%d (%.0f MiB) goes to disk", channels, height, width, size / 2**20)
            store = DiskStore(channels, height, width, self._tmp)
        self._open.append(store)
        return store

    def _free(self, store: Store) -> None:
        self._ram_in_use -= store.nbytes
        store.close()
        if store in self._open:
            self._open.remove(store)

    def _conv(
        self,
        act: _Lazy,
        op: SpatialOp,
        free_input: bool,
        out: SinkStore | None = None,
        sink_bytes_per_px: int | None = None,
    ) -> _Lazy:
        """Compute ``op`` over the whole activation, strip by strip; returns its output with the following
        pointwise modules pending (their statistics, where needed, taken over the whole output). With ``out``
        (the last layer) the strips go to that sink instead of a store.

        Memory: the output store stays in RAM when it and strips of at least MIN_FAST_ROWS rows fit in what the
        budget leaves; strips get at most a quarter of the budget (larger ones are not faster)."""
        _, in_h, in_w = act.store.shape
        out_h, out_w = op.out_size(in_h, in_w)
        fixed = self._strip_bytes(op, 0, in_w, out_w, sink_bytes_per_px)
        per_row = self._strip_bytes(op, 1, in_w, out_w, sink_bytes_per_px) - fixed
        if out is None:
            size = op.out_channels * out_h * out_w * _FLOAT_BYTES
            in_ram = size + fixed + per_row * min(MIN_FAST_ROWS, out_h) <= self.budget_bytes - self._ram_in_use
            out = self._alloc(op.out_channels, out_h, out_w, in_ram)
        rows = self._strip_rows(fixed, per_row, out_h)  # after the allocation: a RAM store leaves less room
        norm = next((m for m in op.after if not isinstance(m, nn.ReLU)), None)
        stats = ChannelStats(op.out_channels) if norm is not None and _norm_needs_stats(norm) else None
        # One strip covering everything reads each input row once: pending norms may then run in place.
        inplace = rows >= out_h and free_input
        strip = self._transpose_strip if op.transpose else self._conv_strip
        for r0 in range(0, out_h, rows):
            r1 = min(out_h, r0 + rows)
            tile = strip(act, op, r0, r1, inplace)
            if stats is not None:
                stats.add(tile)
            out.write(r0, tile)
            del tile
        if free_input:
            self._free(act.store)
        release_freed_heap()
        pending: list[PointwiseFn] = []
        for module in op.after:
            pending.append(_relu if isinstance(module, nn.ReLU) else _norm_fn(module, stats))
        return _Lazy(out, pending)

    def _run_conv(self, x: Tensor, op: SpatialOp, **kwargs) -> Tensor:
        """(1, C_in, h, w) channels-last CPU float32 -> (h', w', C_out) CPU float32, on the network's device."""
        conv = op.conv
        x = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        weight = op.weight_cl(self.dtype)
        fn = F.conv_transpose2d if op.transpose else F.conv2d
        y = fn(x, weight, conv.bias, stride=conv.stride, **kwargs)
        return y[0].permute(1, 2, 0).to("cpu", torch.float32).contiguous()

    def _conv_strip(self, act: _Lazy, op: SpatialOp, r0: int, r1: int, inplace: bool) -> Tensor:
        """Output rows [r0, r1): read the input rows they need (the conv's halo included), apply pending
        pointwise functions, upsample, reflection-pad (only at the true border), convolve."""
        k, s, p, u = op.conv.kernel_size[0], op.conv.stride[0], op.pad, op.upsample
        full_h = act.store.shape[1] * u
        top, bottom = r0 * s - p, (r1 - 1) * s + k - p  # rows of the upsampled, unpadded input needed
        first, stop = max(top, 0), min(bottom, full_h)
        src_lo, src_hi = first // u, -(-stop // u)
        x = _nchw_view(act.read(src_lo, src_hi, inplace))
        if u > 1:
            x = F.interpolate(x, scale_factor=u, mode="nearest")[:, :, first - src_lo * u : stop - src_lo * u]
        pads = (p, p, first - top, bottom - stop)  # vertical reflection only where the strip meets the border
        if any(pads):
            x = F.pad(x, pads, mode="reflect")
        return self._run_conv(x, op)

    def _transpose_strip(self, act: _Lazy, op: SpatialOp, r0: int, r1: int, inplace: bool) -> Tensor:
        conv = op.conv
        k, s, p, outpad = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.output_padding[0]
        in_h = act.store.shape[1]
        # Output row o receives input rows i with 0 <= o + p - i*s < k.
        i0 = max(0, math.ceil((r0 + p - k + 1) / s))
        i1 = min(in_h - 1, (r1 - 1 + p) // s)
        x = _nchw_view(act.read(i0, i1 + 1, inplace))
        y = self._run_conv(x, op, padding=(0, p), output_padding=(0, outpad))
        first = i0 * s - p  # global output row of local row 0 (no vertical padding/cropping in the local call)
        return y[r0 - first : r1 - first]

    def _pointwise_rows(self, channels: int, height: int, width: int, copies: int) -> int:
        """Rows per strip for a pointwise pass holding ``copies`` (h, W, C) float tiles."""
        return self._strip_rows(0.0, copies * channels * width * _FLOAT_BYTES * ALLOCATOR_SLACK, height)

    def _materialize(self, act: _Lazy) -> _Lazy:
        """Apply pending pointwise functions into the store, in place (the store must be ours)."""
        if not act.pending:
            return act
        channels, height, width = act.store.shape
        rows = self._pointwise_rows(channels, height, width, copies=2)
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            act.store.write(r0, act.read(r0, r1, inplace=True))
        release_freed_heap()
        return _Lazy(act.store)

    def _add_into(self, skip: Store, delta: _Lazy) -> None:
        """skip += delta (the residual connection), strip by strip; frees ``delta``'s store."""
        channels, height, width = skip.shape
        rows = self._pointwise_rows(channels, height, width, copies=3)
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            target = skip.read(r0, r1)  # a view for a RAM store: the addition lands in place
            target.add_(delta.read(r0, r1, inplace=True))
            skip.write(r0, target)  # no-op for RAM (same memory), a write for disk
        self._free(delta.store)
        release_freed_heap()

    # -- self-check --------------------------------------------------------------------------------------------
    def _verify(self) -> None:
        """Compare with the network on a small random image, with 3-row strips and every store on disk.

        Two checks: the documented structure (encoder -> residuals -> decoder -> map_output) reproduces
        ``net(x)``, and the streamed last-conv output matches the untiled one *relative to its magnitude*
        (a randomly perturbed network without instance norm reaches |z| ~ 1e5, where float32 summation-order
        differences alone are ~1e-2).
        """
        generator = torch.Generator().manual_seed(0)
        x = torch.rand((1, 3, 45, 38), generator=generator)
        saved = (self.budget_bytes, self.strip_rows)
        self.budget_bytes, self.strip_rows, self._raw_output = 0, 3, True
        try:
            got_raw = self(x)
        finally:
            (self.budget_bytes, self.strip_rows), self._raw_output = saved, False
        with torch.inference_mode():
            xd = x.to(self.device, self.dtype)
            want = self.net(xd).float().cpu()
            canvas = pad_to_multiple(xd, SIZE_MULTIPLE)
            want_raw = self.net.decoder(self.net.residuals(self.net.encoder(canvas)))[..., :45, :38]
            structure_err = (self.net.map_output(want_raw).float().cpu() - want).abs().max().item()
            want_raw = want_raw.float().cpu()
        if not (torch.isfinite(want).all() and torch.isfinite(want_raw).all()):
            # NaN never equals NaN: nothing to compare, and the output check names the real fault (the runner's
            # non-finite message) once the image itself has run.
            return
        rel = 1e-4 if self.dtype == torch.float32 else 1e-2
        stream_err = (got_raw - want_raw).abs().max().item() / (1.0 + want_raw.abs().max().item())
        if not (structure_err <= 1e-6 and stream_err <= rel):
            raise NotImplementedError(
                f"tiled inference does not reproduce this network (structure error {structure_err:.3g}, "
                f"relative streaming error {stream_err:.3g}): its structure differs from the documented one"
            )


def canvas_size(height: int, width: int) -> tuple[int, int]:
    """(H, W) of the canvas the network computes on for a height x width image (models.transformer.pad_to_multiple:
    sides rounded up to multiples of SIZE_MULTIPLE, at least 2 * SIZE_MULTIPLE)."""

    def side(n: int) -> int:
        return max(-(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE, 2 * SIZE_MULTIPLE)

    return side(height), side(width)


def untiled_bytes_estimate(net: TransformerNet, height: int, width: int) -> int:
    """Estimated peak bytes of a plain ``net(x)`` on one (height, width) image (float32, CPU), with the image's own
    float copies (input, canvas, output, color finishing) that do not shrink with a narrower network."""
    base_width = net.config().get("base_width", 32)
    canvas = math.prod(canvas_size(height, width))
    scaled = (UNTILED_BYTES_PER_PIXEL_W32 - UNTILED_FIXED_BYTES_PER_PIXEL) * max(base_width, 1) / 32
    return int(canvas * (UNTILED_FIXED_BYTES_PER_PIXEL + scaled))
