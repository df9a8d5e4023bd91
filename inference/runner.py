"""The network side of stylizing: decode an input, run the model (batched untiled, or one image through the exact
tiled executor when it does not fit ``max_memory_mb``), finish colors and write the result atomically.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from core import precision
from core.cli import absolute_user_path
from core.errors import FaststyleError
from data.io import (
    ALPHA_FORMATS,
    WRITE_FORMATS,
    image_rows,
    load_image,
    paste_rows,
    read_formats,
    resize_max_side,
    resize_to,
    rows_to_tensor,
    save_image,
    tensor_to_pil,
    to_uint8,
)
from data.video import output_size
from inference.color import finish_colors
from inference.jobs import Job
from inference.memory import DECODED_BYTES_PER_PX, FINISH_BYTES_PER_PX, memory_problem, untiled_bytes_estimate
from inference.network import StyleModel, StyleNetwork
from models.styles import StyleChoice

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A decoded input: its 8-bit pixels at the size they are stylized. No float copy is made here: small images
    are converted when they are batched, large ones are read by the tiled executor strip by strip."""

    job: Job
    pixels: Image.Image | None = None  # mode "RGB", or "RGBA" when the file has transparency (kept)
    error: str | None = None
    size: tuple[int, int] = field(default=(0, 0))  # (H, W)

    def tensor(self) -> torch.Tensor:
        """The whole image as a (3, H, W) float32 tensor in [0, 1] (alpha left out): for the untiled path only."""
        return rows_to_tensor(image_rows(self.pixels, 0, self.size[0]))


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding it (None when it cannot be read: load_image
    then says why)."""
    try:
        with Image.open(path, formats=read_formats()) as header:
            return header.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def load_job(
    job: Job,
    max_side_px: int | None,
    scale: float | None,
    network_bytes: Callable[[int, int], float] | None = None,
) -> Loaded:
    """Decode (EXIF orientation, any color mode, 16-bit) and resize one input; errors are returned, not raised,
    so one bad file in a folder does not stop the others.

    Memory: the decoded 8-bit image (Pillow holds RGB and RGBA as 4 bytes per pixel) and nothing else once this
    returns; while decoding a non-RGB file, rotating it (EXIF) or resizing it, a second image exists briefly.
    Before decoding, that and ``network_bytes(height, width)`` (what the network will take, Runner.network_bytes)
    are compared with the available memory: an image that cannot fit fails with one line instead of being
    decoded until the system kills the process (``scale=4`` of a large photo).
    """
    header = _header_size(job.source)
    if header is not None:
        width, height = output_size(*header, scale, max_side_px)
        pixels = DECODED_BYTES_PER_PX * (header[0] * header[1] + width * height)  # decoded, and resized
        network = network_bytes(height, width) if network_bytes is not None else 0.0
        problem = memory_problem(f"stylizing {job.source.name}", (width, height), pixels, network, scale)
        if problem is not None:
            return Loaded(job, error=problem)
    try:
        img = load_image(job.source, mode="RGBA")  # RGBA only when the file has transparency
        if scale is not None and scale != 1:
            img = resize_to(img, max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        if max_side_px:
            img = resize_max_side(img, int(max_side_px))
        return Loaded(job, img, size=(img.height, img.width))
    except FaststyleError as err:
        return Loaded(job, error=str(err))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return Loaded(job, error=f"cannot read image {job.source}: {err}")
    except MemoryError:
        return Loaded(job, error=f"cannot read image {job.source}: not enough memory to decode it")


def save_result(loaded: Loaded, stylized: torch.Tensor | Image.Image, cfg: DictConfig) -> Path:
    """Color handling, alpha re-attachment and an atomic write; returns the path written.

    ``stylized``: the untiled network output, (3, H, W) float32 in [0, 1], finished here; or the tiled path's
    image (Runner), which is finished already (colors, alpha and 8-bit rounding applied strip by strip).
    """
    if isinstance(stylized, Image.Image):
        img = stylized
    else:
        out = finish_colors(stylized, loaded.tensor(), bool(cfg.preserve_color), float(cfg.strength))
        img = tensor_to_pil(out)
        if loaded.pixels.mode == "RGBA":
            img.putalpha(loaded.pixels.getchannel("A"))
    target = loaded.job.target
    if img.mode == "RGBA" and WRITE_FORMATS[target.suffix.lower()] not in ALPHA_FORMATS:
        # Normally decided in plan_jobs from the header; this catches files whose header did not say.
        target = target.with_suffix(".png")
        logger.warning("%s has transparency, which JPEG cannot hold: wrote %s instead", loaded.job.source, target.name)
    try:
        save_image(img, target, quality=int(cfg.jpeg_quality))
    except MemoryError:
        raise OSError("not enough memory to encode the image") from None
    return target


def non_finite_error(image: torch.Tensor) -> str | None:
    """Why a stylized image must not be written (NaN or infinite values: a broken model), or None."""
    return non_finite_message(int((~torch.isfinite(image)).sum()))


def non_finite_message(bad: int) -> str | None:
    """The one message for an output with ``bad`` NaN or infinite values (None when there are none), whether the
    image was stylized whole, in tiles or as a video frame."""
    if bad == 0:
        return None
    return f"the model produced {bad} NaN or infinite values for this image (is the model broken?); nothing written"


class Runner:
    """Runs the model on decoded images of one size: in batches through the untiled network when they fit
    ``max_memory_mb``, otherwise one by one through the exact tiled executor, reading and writing 8-bit strips."""

    def __init__(self, network: StyleNetwork, cfg: DictConfig) -> None:
        """Run ``network`` (inference.network: the model's style, prepared under its precision policy) with
        stylize's options in ``cfg`` (max_memory_mb, tmp_dir, preserve_color, strength). Applies the policy's
        process-wide backend settings and logs them (core.precision.configure_backends)."""
        self.network = network
        self.policy = network.policy
        precision.configure_backends(self.policy)
        self.net, self.device = network.net, network.device
        self.forward = self._forward_of(self.net)
        self.budget_mb = float(cfg.max_memory_mb)
        if self.budget_mb <= 0:
            raise FaststyleError("max_memory_mb must be positive")
        self.tmp_dir = str(absolute_user_path(cfg.tmp_dir)) if cfg.tmp_dir else None
        self.preserve_color, self.strength = bool(cfg.preserve_color), float(cfg.strength)
        self._estimate = untiled_bytes_estimate
        self._tiled = None
        self.tiled_images = 0
        self._sizes_told: set[tuple[int, int]] = set()  # shared by with_style copies: one line per size and run

    @classmethod
    def from_module(cls, net: torch.nn.Module, device: torch.device, cfg: DictConfig) -> Runner:
        """A Runner for a one-style network already in memory (tests, benchmarks), under the policy that
        ``cfg.precision`` and ``cfg.channels_last`` give it on ``device`` (inference.network.inference_policy)."""
        model = StyleModel.from_network(
            net, device, precision=cfg.precision, channels_last=cfg.channels_last, compile=cfg.get("compile", "auto")
        )
        return cls(model.network(), cfg)

    def with_style(self, style: str | int | StyleChoice) -> Runner:
        """A Runner with these settings for another style or mix of the same model (the next style of a
        multi-style model, a video's changing mix): the policy is not resolved, and the backends not configured, a
        second time."""
        other = copy.copy(self)
        other.network = self.network.with_style(style)
        other.net = other.network.net
        other.forward = other._forward_of(other.net)
        other._tiled = None
        return other

    def _forward_of(self, net: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """What runs untiled batches: the network, compiled when the policy says so (compile=true; each image size
        compiles once, then runs the compiled graph). The tiled executor always takes the layers themselves."""
        return self.policy.maybe_compile(net) if isinstance(net, torch.nn.Module) else net

    def network_bytes(self, height: int, width: int, count: int = 1) -> float:
        """Process memory the network takes for ``count`` (height, width) images: their untiled estimate while it
        fits max_memory_mb, else the tiled executor's budget; 0 on a GPU (that memory is the device's)."""
        if self.device.type != "cpu":
            return 0.0
        return float(min(self._untiled_bytes(height, width) * count, self.budget_mb * 2**20))

    def max_batch(self, height: int, width: int) -> int:
        """How many (height, width) images fit the memory budget untiled (0: must be tiled)."""
        return int(self.budget_mb * 2**20 // max(self._untiled_bytes(height, width), 1))

    def _untiled_bytes(self, height: int, width: int) -> float:
        """The untiled estimate of one (height, width) image in this network's layout and precision."""
        return self._estimate(self.net, height, width, self.policy.channels_last) * self.policy.activation_bytes_factor

    @torch.inference_mode()
    def __call__(self, batch: list[Loaded]) -> list[torch.Tensor | Image.Image]:
        """Stylize decoded images of one size. Untiled, each result is a (3, H, W) float32 CPU tensor in [0, 1]
        (save_result finishes it); tiled, it is the finished 8-bit image (see _tiled_image)."""
        height, width = batch[0].size
        if self.max_batch(height, width) >= len(batch):
            x = self.policy.batch_to(torch.stack([item.tensor() for item in batch]), self.device)
            return list(self.forward(x).to("cpu", torch.float32))
        if not isinstance(self.net, torch.nn.Module):  # .onnx model: the tiled executor needs the torch layers
            raise FaststyleError(
                f"a {width}x{height} image exceeds max_memory_mb={self.budget_mb:g} untiled and "
                ".onnx models cannot be tiled: raise max_memory_mb, set max_side_px, or use the .pth model"
            )
        if self._tiled is None:
            from inference.tiled import TiledExecutor

            self._tiled = TiledExecutor(self.net, budget_mb=self.budget_mb, tmp_dir=self.tmp_dir)
        self.tiled_images += len(batch)
        if (height, width) not in self._sizes_told:  # once per size: a video has many frames of one size
            self._sizes_told.add((height, width))
            logger.info(
                "image of %dx%d exceeds max_memory_mb=%g untiled: exact tiled inference", width, height, self.budget_mb
            )
        return [self._tiled_image(item) for item in batch]

    @torch.inference_mode()
    def stylize_pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """Stylize (N, H, W, 3) uint8 RGB frames (CPU) that fit ``max_memory_mb`` untiled (see max_batch) and return
        them finished as (N, H, W, 3) uint8 on the CPU: colors (preserve_color, strength) and data.io.to_uint8's
        rounding applied on the device, so that only 8-bit pixels cross to and from it (a quarter of the float32
        bytes) and the CPU does no per-pixel work. The same pixels as __call__ followed by save_result's finishing.
        RuntimeError when the model produced NaN or infinite values."""
        content = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        out = self.forward(self.policy.batch_to(content, self.device)).float()
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError(non_finite_error(out.cpu()))
        out = finish_colors(out, content, self.preserve_color, self.strength)
        return to_uint8(out).permute(0, 2, 3, 1).cpu()

    def _tiled_image(self, item: Loaded) -> Image.Image:
        """Stylize one image through the tiled executor and return it finished: the network reads uint8 strips of
        ``item.pixels``, and each output strip gets finish_colors (pointwise, given the content pixel), the 8-bit
        rounding of data.io.to_uint8 and the input's alpha, and is written back over the same rows of
        ``item.pixels`` (those rows of the input are not needed again). So the only image-sized memory is the
        decoded image itself. Raises RuntimeError (one failed file) when the image cannot be tiled or the model
        produced NaN or infinite values."""
        img = item.pixels
        height, width = item.size
        non_finite = 0

        def read_rows(lo: int, hi: int) -> torch.Tensor:
            return image_rows(img, lo, hi)

        def finish(row: int, strip: torch.Tensor) -> None:  # strip: (3, h, W) float32 in [0, 1]
            nonlocal non_finite
            if not math.isfinite(float(strip.sum())):  # one pass; values in [0, 1] cannot sum to infinity
                non_finite += int((~torch.isfinite(strip)).sum())
            rows = image_rows(img, row, row + strip.shape[1])  # the content, read before it is overwritten
            out = finish_colors(strip, rows_to_tensor(rows), self.preserve_color, self.strength)
            out = to_uint8(out).permute(1, 2, 0)
            if rows.shape[2] == 4:
                out = torch.cat([out, rows[..., 3:]], dim=2)
            paste_rows(img, row, out)

        try:
            self._tiled.stream(read_rows, height, width, finish, sink_bytes_per_px=FINISH_BYTES_PER_PX)
        except (ValueError, MemoryError) as err:
            raise RuntimeError(f"{str(err) or 'out of memory'} (raise max_memory_mb or set max_side_px)") from err
        if non_finite:
            raise RuntimeError(non_finite_message(non_finite))
        return img


def batches(loaded: Iterator[Loaded], runner: Runner, batch_size: int) -> Iterator[list[Loaded]]:
    """Group consecutive decoded images of equal size into batches (failed decodes pass through alone)."""
    pending: list[Loaded] = []
    for item in loaded:
        if item.error is not None:
            yield [item]
            continue
        if pending and (item.size != pending[0].size or len(pending) >= batch_size):
            yield pending
            pending = []
        pending.append(item)
        if len(pending) >= max(1, min(batch_size, runner.max_batch(*item.size))):
            yield pending
            pending = []
    if pending:
        yield pending
