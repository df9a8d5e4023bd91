"""Exact inference of a TransformerNet on images of any size, with bounded memory (layer-wise streaming).

Why not naive tiling: instance norm normalises each channel with the mean and variance over the *whole* image
(Ulyanov et al. 2016). Stylising tiles independently gives every tile its own statistics, which shows as tone jumps
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
   is avoided on purpose: it cancels catastrophically in float32 (DESIGN.md, reference figures).
4. The norm and ReLU that follow a convolution are pointwise once the statistics are known, so they are applied
   lazily, when the next convolution reads its input strip. Batch norm in eval mode uses its running statistics
   and is pointwise from the start.
5. A residual block keeps its input store for the skip connection and adds ``norm2(conv2(...))`` into it in place.

Every layer is computed once (plus the small halo rows), so the cost is about one untiled forward pass; the peak
memory is the stores kept in RAM plus a few strips. ``TiledExecutor`` checks once, on a small random image with
tiny strips, that its decomposition reproduces ``net(x)``; a network it does not understand raises instead of
silently producing a different image.
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

from models.norm import InstanceNorm
from models.transformer import SIZE_MULTIPLE, ConvLayer, ResidualBlock, TransformerNet, pad_to_multiple

logger = logging.getLogger(__name__)

_FLOAT_BYTES = 4
# Peak activation bytes per canvas pixel of an untiled forward pass at base_width 32 (float32, CPU, inference
# mode), from peak RSS minus the RSS before the forward at 1920x1080 (scripts/bench_stylize.py): NCHW eager
# 1895 MiB (~960 B/px), channels-last 1388 MiB (~700 B/px), channels-last with malloc reuse ~1650 MiB (~830 B/px).
# 1100 leaves a margin, so an image that is estimated to fit really does.
UNTILED_BYTES_PER_PIXEL_W32 = 1100


# ----------------------------------------------------------------------------------------------------------------
# Stores: one full activation (C, H, W) float32, in RAM or on disk.
# ----------------------------------------------------------------------------------------------------------------
class RamStore:
    """An activation of C channels, H x W, held as an (H, W, C) float32 CPU tensor (channels-last).

    Channels-last because oneDNN convolutions run fastest on NHWC on this CPU (scripts/bench_stylize.py), and a
    strip of rows is then one contiguous block. Memory is allocated on the first write; a write of the whole
    activation adopts the tensor instead of copying it.
    """

    def __init__(self, channels: int, height: int, width: int, data: Tensor | None = None) -> None:
        self.shape = (channels, height, width)
        self.data = data
        self.nbytes = channels * height * width * _FLOAT_BYTES if data is None else 0  # input: not counted

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


Store = RamStore | DiskStore


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
        which is stable and ~2x faster than torch.var_mean on CPU (measured 160 vs 349 ms at 1080p x 32 ch).
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
    """True when ``module`` normalises with statistics of its input (instance norm, or a norm without buffers)."""
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

    def in_rows_per_out_row(self) -> float:
        """Input rows read per output row (for sizing strips)."""
        s = self.conv.stride[0]
        return 1.0 / s if self.transpose else s / self.upsample


def _pointwise_module(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU | nn.Identity | nn.BatchNorm2d | InstanceNorm | nn.InstanceNorm2d)


def _spatial_from(module: nn.Module) -> SpatialOp | None:
    """A SpatialOp for a conv-like module, None for a pointwise one; raises for anything else."""
    if type(module).__name__ == "UpsampleConvLayer" or isinstance(module, ConvLayer):
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
    return Plan(_walk_sequential(net.encoder), blocks, _walk_sequential(net.decoder), net.map_output)


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
    copies, which cost a third of the run time when measured).
    """
    return tile.unsqueeze(0).permute(0, 3, 1, 2)


class TiledExecutor:
    """Runs a TransformerNet (eval mode) on one image at a time with activation memory bounded by ``budget_mb``.

    Args:
        net: the network, in eval mode; its parameters' device and dtype are used for the convolutions.
        budget_mb: memory (MiB) for everything the executor allocates: activation stores kept in RAM, strips and
            the output. Stores that do not fit go to temporary files in ``tmp_dir``. The caller's input image is
            not counted.
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
        self.disk_stores_used = 0
        self.peak_store_bytes = 0  # most bytes of activation stores held in RAM at once (last call)
        self._raw_output = False
        if verify:
            self._verify()

    # -- public ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, image: Tensor) -> Tensor:
        """Stylise one image: (1, 3, H, W) or (3, H, W) float in [0, 1] -> (1, 3, H, W) float32 on the CPU, in
        [0, 1]; equal to ``net(image)`` up to floating-point summation order."""
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"expected one (1, 3, H, W) image, got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        canvas = pad_to_multiple(image.detach().float().cpu(), SIZE_MULTIPLE)[0]
        canvas_hwc = canvas.permute(1, 2, 0).contiguous()  # (H, W, 3), our own copy
        self._ram_in_use, self.disk_stores_used, self.peak_store_bytes = 0, 0, 0
        with tempfile.TemporaryDirectory(prefix="faststyle-tiled-", dir=self.tmp_dir) as tmp:
            self._tmp = tmp
            act = _Lazy(RamStore(*canvas.shape, data=canvas_hwc))
            del canvas
            for op in self.plan.encoder:
                act = self._conv(act, op, free_input=True)
            for conv1, conv2 in self.plan.blocks:
                skip = self._materialize(act)
                hidden = self._conv(skip, conv1, free_input=False)
                delta = self._conv(hidden, conv2, free_input=True)
                self._add_into(skip.store, delta)
                act = skip
            for op in self.plan.decoder:
                act = self._conv(act, op, free_input=True)
            out = self._finish(act, height, width)
        return out

    # -- steps -----------------------------------------------------------------------------------------------
    def _alloc(self, channels: int, height: int, width: int, work_bytes: int) -> Store:
        size = channels * height * width * _FLOAT_BYTES
        if self._ram_in_use + size + work_bytes <= self.budget_bytes:
            self._ram_in_use += size
            self.peak_store_bytes = max(self.peak_store_bytes, self._ram_in_use)
            return RamStore(channels, height, width)
        self.disk_stores_used += 1
        logger.debug("activation %dx%dx%d (%.0f MiB) goes to disk", channels, height, width, size / 2**20)
        return DiskStore(channels, height, width, self._tmp)

    def _free(self, store: Store) -> None:
        self._ram_in_use -= store.nbytes
        store.close()

    def _rows_per_strip(self, op: SpatialOp, in_width: int, out_height: int, out_width: int) -> int:
        """Output rows per strip so that a strip's working tensors take about a quarter of the budget."""
        if self.strip_rows is not None:
            return max(1, min(self.strip_rows, out_height))
        in_elems = op.in_channels * op.in_rows_per_out_row() * in_width * op.upsample
        # input read + pending copies + gathered/upsampled/padded copies (~4x), output + conv workspace (~3x)
        row_bytes = _FLOAT_BYTES * (4 * in_elems + 3 * op.out_channels * out_width)
        rows = int(self.budget_bytes / 4 // max(row_bytes, 1))
        return max(min(16, out_height), min(rows, out_height))

    def _conv(self, act: _Lazy, op: SpatialOp, free_input: bool) -> _Lazy:
        """Compute ``op`` over the whole activation, strip by strip; returns its output with the following
        pointwise modules pending (their statistics, where needed, taken over the whole output)."""
        _, in_h, in_w = act.store.shape
        out_h, out_w = op.out_size(in_h, in_w)
        rows = self._rows_per_strip(op, in_w, out_h, out_w)
        work = rows * _FLOAT_BYTES * (4 * op.in_channels * in_w * op.upsample * 2 + 3 * op.out_channels * out_w)
        out = self._alloc(op.out_channels, out_h, out_w, work if rows < out_h else 0)
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

    def _rows_for(self, channels: int, width: int) -> int:
        """Rows per strip for the pointwise passes (an eighth of the budget, at least 1)."""
        return max(1, self.budget_bytes // 8 // max(channels * width * _FLOAT_BYTES * 2, 1))

    def _materialize(self, act: _Lazy) -> _Lazy:
        """Apply pending pointwise functions into the store, in place (the store must be ours)."""
        if not act.pending:
            return act
        channels, height, width = act.store.shape
        rows = self._rows_for(channels, width)
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            act.store.write(r0, act.read(r0, r1, inplace=True))
        return _Lazy(act.store)

    def _add_into(self, skip: Store, delta: _Lazy) -> None:
        """skip += delta (the residual connection), strip by strip; frees ``delta``'s store."""
        channels, height, width = skip.shape
        rows = self._rows_for(channels, width)
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            target = skip.read(r0, r1)  # a view for a RAM store: the addition lands in place
            target.add_(delta.read(r0, r1, inplace=True))
            skip.write(r0, target)  # no-op for RAM (same memory), a write for disk
        self._free(delta.store)

    def _finish(self, act: _Lazy, height: int, width: int) -> Tensor:
        out = torch.empty((1, 3, height, width), dtype=torch.float32)
        rows = self._rows_for(3, act.store.shape[2])
        for r0 in range(0, height, rows):
            r1 = min(height, r0 + rows)
            raw = act.read(r0, r1, inplace=True)[:, :width].permute(2, 0, 1)
            out[0, :, r0:r1] = raw if self._raw_output else self.plan.output(raw)
        self._free(act.store)
        return out

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
        rel = 1e-4 if self.dtype == torch.float32 else 1e-2
        stream_err = (got_raw - want_raw).abs().max().item() / (1.0 + want_raw.abs().max().item())
        if not (structure_err <= 1e-6 and stream_err <= rel):
            raise NotImplementedError(
                f"tiled inference does not reproduce this network (structure error {structure_err:.3g}, "
                f"relative streaming error {stream_err:.3g}): its structure differs from the documented one"
            )


def untiled_bytes_estimate(net: TransformerNet, height: int, width: int) -> int:
    """Estimated peak activation bytes of a plain ``net(x)`` on one (height, width) image (float32, CPU)."""
    base_width = net.config().get("base_width", 32)
    canvas = (-(-height // SIZE_MULTIPLE) * SIZE_MULTIPLE) * (-(-width // SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return int(canvas * UNTILED_BYTES_PER_PIXEL_W32 * max(base_width, 3) / 32)
