"""Where tiled inference keeps activations: each store holds one full activation (C, H, W) in float32 (or, on the
fused CPU path, in the network's 16-bit dtype), in RAM
(``RamStore``) or in a temporary file (``DiskStore``), or stands at the ends of the network: the caller's image read
in row strips (``SourceStore``) and the caller's sink that takes the output strips (``SinkStore``). Every store lays
an activation out as (H, W, C), so that a strip of rows is one contiguous block.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch
from torch import Tensor

from inference.tiled_plan import canvas_size
from inference.tiled_stats import PointwiseFn

RowReader = Callable[[int, int], Tensor]
"""``read_rows(lo, hi)``: rows [lo, hi) of an image as an (hi - lo, W, C >= 3) tensor, uint8 0..255 or float
[0, 1]; channels after the third (alpha) are ignored."""
StripSink = Callable[[int, Tensor], None]
"""``sink(row, strip)``: receives a (3, h, W) float32 CPU strip in [0, 1], the result's rows [row, row + h)."""


class RamStore:
    """An activation of C channels, H x W, held as an (H, W, C) CPU tensor of ``dtype`` (channels-last).

    Channels-last because oneDNN's CPU convolutions run fastest on NHWC (``python -m benchmarks stylize``
    compares the layouts), and a strip of rows is then one contiguous block. Memory is allocated on the first
    write; a write of the whole activation adopts the tensor instead of copying it.
    """

    def __init__(self, channels: int, height: int, width: int, dtype: torch.dtype = torch.float32) -> None:
        self.shape = (channels, height, width)
        self.dtype = dtype
        self.data: Tensor | None = None
        self.nbytes = channels * height * width * dtype.itemsize

    def read(self, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) as an (hi - lo, W, C) tensor: a view of the store (modifying it modifies the store)."""
        return self.data[lo:hi]

    def write(self, lo: int, tile: Tensor) -> None:
        """Store the (h, W, C) ``tile`` at rows [lo, lo + h)."""
        if self.data is None:
            if lo == 0 and tile.shape[0] == self.shape[1] and tile.is_contiguous():
                self.data = tile
                return
            self.data = torch.empty((self.shape[1], self.shape[2], self.shape[0]), dtype=self.dtype)
        if self.data[lo:].data_ptr() != tile.data_ptr():
            self.data[lo : lo + tile.shape[0]].copy_(tile)

    def close(self) -> None:
        self.data = None


class DiskStore:
    """An activation of C channels, H x W, in a temporary file laid out as (H, W, C) values of ``dtype``.

    A strip of rows is one contiguous byte range (one read, one write). Plain pread/pwrite rather than a memory
    map: mapped pages that are touched count as resident memory of the process, page-cache pages do not, so the
    process's peak RSS stays bounded by the budget.
    """

    def __init__(
        self, channels: int, height: int, width: int, directory: str, dtype: torch.dtype = torch.float32
    ) -> None:
        self.shape = (channels, height, width)
        self.dtype = dtype
        self.nbytes = 0  # on disk: no RAM
        self._row_bytes = channels * width * dtype.itemsize
        fd, self.path = tempfile.mkstemp(prefix="faststyle-tile-", suffix=".f32", dir=directory)
        self._fd: int | None = fd
        os.ftruncate(fd, height * self._row_bytes)

    def read(self, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) as a fresh (hi - lo, W, C) tensor."""
        channels, _, width = self.shape
        buf = torch.empty((hi - lo, width, channels), dtype=self.dtype)
        view = memoryview(buf.view(torch.uint8).numpy()).cast("B")  # bytes: numpy has no bfloat16
        offset, done = lo * self._row_bytes, 0
        while done < len(view):  # pread may return fewer bytes than asked (2 GiB per call on Linux)
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from {self.path}")
            done += got
        return buf

    def write(self, lo: int, tile: Tensor) -> None:
        """Store the (h, W, C) ``tile`` at rows [lo, lo + h)."""
        view = memoryview(tile.contiguous().view(torch.uint8).numpy()).cast("B")
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
        strip = tile[: hi - lo, : self._width].float()  # the fused path's strips are in the network's dtype
        for fn in self._pending:
            strip = fn(strip, True)
        self._sink(lo, self._output(strip.permute(2, 0, 1)))

    def close(self) -> None:
        pass


Store = RamStore | DiskStore | SourceStore | SinkStore
