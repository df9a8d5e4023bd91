"""Test clips for the flicker measure (evaluation/warping.py): synthetic clips with known motion, and real videos.

The synthetic clips are made at run time from the embedded held-out photos (nothing is shipped): a pan, a zoom and
objects moving over a background. Each is a ``Clip``: (T, 3, H, W) float32 RGB frames in [0, 1]
(docs/architecture.md, "Images"; 8-bit values, like any decoded video) and the exact optical flow between
consecutive frames (evaluation/warping.py, "Flow convention"), which the generator knows because it placed every
pixel.

- ``pan_clip``: a crop window moving ``step`` pixels per frame over a photo (sub-pixel steps allowed); the frames
  are rendered from the photo with data/io.py's filter, so a sub-pixel step is an interpolation of the photo, not
  of the previous frame.
- ``zoom_clip``: a crop window scaling about its centre by ``rate`` per frame (below 1 zooms in).
- ``objects_clip``: elliptical patches cut from another photo, moving by whole pixels in different directions over
  a static background; they occlude each other (fixed layer order) and the background.
- ``file_clip``: the first frames of a video file (data/video.py); its motion is unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evaluation.held_out import DEFAULT_HELD_OUT

if TYPE_CHECKING:
    from PIL import Image


DEFAULT_SIZE = (320, 180)  # (width, height): a small 16:9 video
DEFAULT_FRAMES = 24
PAN_STEP = (2.25, 0.5)  # pixels per frame, (x, y): sub-pixel in both directions
ZOOM_RATE = 0.985  # window size per frame: zooms in by 1.5 % a frame
# Whole pixels per frame, (x, y), of the objects clip's patches (bottom layer first): three directions.
OBJECT_VELOCITIES = ((3, 1), (-3, 1), (1, -2))
# Where each patch is cut from the source photo (centre, as fractions of it; cycled): three different regions.
PATCH_CENTRES = ((0.3, 0.45), (0.75, 0.5), (0.85, 0.85))
PATCH_SOURCE_SCALE = 2.5  # the source photo is resized to cover this many patches across, so the cuts differ
CANVAS_MARGIN = 8  # canvas pixels kept around every crop window, so Lanczos never reads past the canvas edge


@dataclass(frozen=True)
class Clip:
    """A test clip: ``frames`` (T, 3, H, W) float32 in [0, 1]; ``backward`` / ``forward`` (T - 1, 2, H, W) its exact
    flows (evaluation/warping.py, "Flow convention"), entry t - 1 for the pair (t - 1, t); None where the motion is not
    known (a real video)."""

    name: str
    description: str
    frames: torch.Tensor
    backward: torch.Tensor | None = None
    forward: torch.Tensor | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.frames.shape[-1], self.frames.shape[-2]


# --------------------------------------------------------------------------------------------------------------------
# Rendering the clips


def fit_canvas(photo: Image.Image, width: float, height: float) -> Image.Image:
    """``photo`` resized (data/io.py's filters, aspect kept) to the smallest size covering ``width`` x ``height``."""
    from data.io import resize_to

    scale = max(width / photo.width, height / photo.height)
    return resize_to(
        photo, max(math.ceil(width), round(photo.width * scale)), max(math.ceil(height), round(photo.height * scale))
    )


def render_window(canvas: Image.Image, box: tuple[float, float, float, float], size: tuple[int, int]) -> torch.Tensor:
    """The (3, H, W) frame a camera sees through ``box`` (left, top, right, bottom in canvas pixels, sub-pixel
    allowed) at ``size`` (width, height), with data/io.py's downscaling filter (Lanczos): frame pixel x shows the
    canvas point box.left + (x + 0.5) * (box width / width) - 0.5 (pixel centres at whole coordinates)."""
    from data.io import DOWNSCALE_FILTER, pil_to_tensor

    return pil_to_tensor(canvas.resize(size, DOWNSCALE_FILTER, box=box))


def _window_flows(
    boxes: list[tuple[float, float, float, float]], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (backward, forward) flows of frames rendered by ``render_window`` through ``boxes``: each axis maps
    frame pixel x to canvas a_t * x + c_t, so a pixel of frame s is at (a_s x + c_s - c_r) / a_r in frame r."""
    width, height = size

    def axis(t: int, ax: int) -> tuple[float, float]:
        lo, hi = boxes[t][ax], boxes[t][ax + 2]
        scale = (hi - lo) / (width if ax == 0 else height)
        return scale, lo + 0.5 * scale - 0.5

    def flow(source: int, target: int) -> torch.Tensor:
        out = []
        for ax, n in ((0, width), (1, height)):
            (a_s, c_s), (a_r, c_r) = axis(source, ax), axis(target, ax)
            x = torch.arange(n, dtype=torch.float64)
            out.append((a_s * x + c_s - c_r) / a_r - x)
        u, v = out
        return torch.stack([u.expand(height, width), v[:, None].expand(height, width)]).float()

    frames = len(boxes)
    backward = torch.stack([flow(t, t - 1) for t in range(1, frames)])
    forward = torch.stack([flow(t - 1, t) for t in range(1, frames)])
    return backward, forward


def pan_clip(
    photo: Image.Image,
    size: tuple[int, int] = DEFAULT_SIZE,
    frames: int = DEFAULT_FRAMES,
    step: tuple[float, float] = PAN_STEP,
    name: str = "pan",
) -> Clip:
    """A window of ``size`` moving ``step`` (x, y) pixels per frame across ``photo`` (resized so the whole path
    fits): the camera pans, so the content moves by -step and a strip of new content enters at one edge."""
    width, height = size
    travel = [abs(s) * (frames - 1) for s in step]
    canvas = fit_canvas(photo, width + travel[0] + 2 * CANVAS_MARGIN, height + travel[1] + 2 * CANVAS_MARGIN)
    start = [
        (canvas.width - width - travel[0]) / 2 + (travel[0] if step[0] < 0 else 0),
        (canvas.height - height - travel[1]) / 2 + (travel[1] if step[1] < 0 else 0),
    ]
    boxes = []
    for t in range(frames):
        left, top = start[0] + step[0] * t, start[1] + step[1] * t
        boxes.append((left, top, left + width, top + height))
    backward, forward = _window_flows(boxes, size)
    clip = torch.stack([render_window(canvas, box, size) for box in boxes])
    text = f"pan {step[0]:g}, {step[1]:g} px/frame"
    return Clip(name, text, clip, backward, forward)


def zoom_clip(
    photo: Image.Image,
    size: tuple[int, int] = DEFAULT_SIZE,
    frames: int = DEFAULT_FRAMES,
    rate: float = ZOOM_RATE,
    name: str = "zoom",
) -> Clip:
    """A window of ``size``'s aspect scaling by ``rate`` per frame about the centre of ``photo`` (below 1 zooms in).
    The photo is resized so the smallest window is ``size`` itself: every frame is a downscale (or a copy)."""
    width, height = size
    scales = [rate**t for t in range(frames)]
    scales = [s / min(scales) for s in scales]
    biggest = max(scales)
    canvas = fit_canvas(photo, width * biggest + 2 * CANVAS_MARGIN, height * biggest + 2 * CANVAS_MARGIN)
    cx, cy = canvas.width / 2, canvas.height / 2
    boxes = [(cx - width * s / 2, cy - height * s / 2, cx + width * s / 2, cy + height * s / 2) for s in scales]
    backward, forward = _window_flows(boxes, size)
    clip = torch.stack([render_window(canvas, box, size) for box in boxes])
    text = f"zoom {'in' if rate < 1 else 'out'} {abs(1 - rate) * 100:.3g} %/frame"
    return Clip(name, text, clip, backward, forward)


def _cut(
    photo: Image.Image, width: int, height: int, centre: tuple[float, float] = (0.5, 0.5), zoom: float = 1.0
) -> Image.Image:
    """A ``width`` x ``height`` cut of ``photo`` around ``centre`` (fractions of the photo), the photo resized to
    cover ``zoom`` times that size."""
    canvas = fit_canvas(photo, width * zoom, height * zoom)
    left = min(max(0, round(canvas.width * centre[0] - width / 2)), canvas.width - width)
    top = min(max(0, round(canvas.height * centre[1] - height / 2)), canvas.height - height)
    return canvas.crop((left, top, left + width, top + height))


def objects_clip(
    background: Image.Image,
    source: Image.Image,
    size: tuple[int, int] = DEFAULT_SIZE,
    frames: int = DEFAULT_FRAMES,
    velocities: tuple[tuple[int, int], ...] = OBJECT_VELOCITIES,
    name: str = "objects",
) -> Clip:
    """Elliptical patches cut from ``source`` (one per velocity, from different places) moving over a static
    ``background`` by whole pixels per frame; they cross near the middle frame, where the later ones cover the
    earlier ones. Whole-pixel moves keep every frame an exact copy of its layers, and the exact flow is each
    pixel's top layer's velocity (0 on the background)."""
    from PIL import Image, ImageDraw

    from data.io import pil_to_tensor

    width, height = size
    patch_h = max(4, round(0.45 * height))
    patch_w = max(4, round(1.3 * patch_h))
    ellipse = Image.new("L", (patch_w, patch_h), 0)
    ImageDraw.Draw(ellipse).ellipse((0, 0, patch_w - 1, patch_h - 1), fill=255)
    inside = torch.frombuffer(bytearray(ellipse.tobytes()), dtype=torch.uint8).view(patch_h, patch_w) > 0
    patches = [
        _cut(source, patch_w, patch_h, PATCH_CENTRES[j % len(PATCH_CENTRES)], PATCH_SOURCE_SCALE)
        for j in range(len(velocities))
    ]
    scene = _cut(background, width, height)
    middle = (frames - 1) // 2
    # where each patch's top-left corner is at the middle frame: near the centre, offset so all three show
    anchors = [
        (
            width // 2 - patch_w // 2 + (j - 1) * patch_w // 3,
            height // 2 - patch_h // 2 + (j % 2) * patch_h // 4 - patch_h // 8,
        )
        for j in range(len(velocities))
    ]
    images, labels = [], []
    for t in range(frames):
        frame = scene.copy()
        label = torch.full((height, width), -1, dtype=torch.long)
        for j, (patch, (vx, vy), (ax, ay)) in enumerate(zip(patches, velocities, anchors, strict=True)):
            x, y = ax + vx * (t - middle), ay + vy * (t - middle)
            frame.paste(patch, (x, y), ellipse)
            # the same pixels in the label map: the ellipse's pixels that land inside the frame
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + patch_w, width), min(y + patch_h, height)
            if x0 < x1 and y0 < y1:
                region = label[y0:y1, x0:x1]
                region[inside[y0 - y : y1 - y, x0 - x : x1 - x]] = j
        images.append(pil_to_tensor(frame))
        labels.append(label)
    speed = torch.tensor([[0.0, 0.0], *velocities], dtype=torch.float32)  # row 0: the background

    def flow(t: int, sign: float) -> torch.Tensor:
        return (sign * speed[labels[t] + 1]).permute(2, 0, 1)

    backward = torch.stack([flow(t, -1.0) for t in range(1, frames)])
    forward = torch.stack([flow(t - 1, 1.0) for t in range(1, frames)])
    text = f"{len(velocities)} objects, {', '.join(f'({vx}, {vy})' for vx, vy in velocities)} px/frame"
    return Clip(name, text, torch.stack(images), backward, forward)


def default_clips(size: tuple[int, int] = DEFAULT_SIZE, frames: int = DEFAULT_FRAMES) -> list[Clip]:
    """The report's three clips, from the held-out photos (data/samples/held_out, never trained on): a pan over
    china.jpg, a zoom into flower.jpg, and patches of china.jpg moving over camera.png."""
    from data.io import load_image

    china, flower, camera = (load_image(DEFAULT_HELD_OUT / name) for name in ("china.jpg", "flower.jpg", "camera.png"))
    return [
        pan_clip(china, size, frames),
        zoom_clip(flower, size, frames),
        objects_clip(camera, china, size, frames),
    ]


def file_clip(path: Path, size: tuple[int, int], frames: int) -> Clip:
    """The first ``frames`` frames of a video file, decoded by data/video.py (upright, scaled so the long side is at
    most ``size``'s, as stylize scales it); its motion is unknown, so it has no exact flow."""
    import contextlib

    from core.errors import FaststyleError

    try:
        from data.video import read_frames
    except ImportError as err:
        raise FaststyleError(f"--clip needs PyAV to decode video: pip install av ({err})") from None
    decoded = []
    with contextlib.closing(read_frames(path, max_side_px=max(size))) as stream:
        for frame in stream:
            decoded.append(frame.tensor())
            if len(decoded) == frames:
                break
    if len(decoded) < 2:
        raise FaststyleError(f"{path} gave {len(decoded)} frame(s): the warping error needs at least 2")
    width, height = decoded[0].shape[-1], decoded[0].shape[-2]
    text = f"{path.name}, frames 0-{len(decoded) - 1} at {width}x{height}"
    return Clip(path.name, text, torch.stack(decoded))
