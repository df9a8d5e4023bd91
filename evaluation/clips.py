"""Synthetic test clips with known motion, and the warping error of Lai et al. 2018 that measures flicker on them.

The clips are made at run time from the embedded held-out photos (nothing is shipped): a pan, a zoom and objects
moving over a background. Each is a ``Clip``: (T, 3, H, W) float32 RGB frames in [0, 1] (docs/architecture.md,
"Images"; 8-bit values, like any decoded video) and the exact optical flow between consecutive frames, which the
generator knows because it placed every pixel.

- ``pan_clip``: a crop window moving ``step`` pixels per frame over a photo (sub-pixel steps allowed); the frames
  are rendered from the photo with data/io.py's filter, so a sub-pixel step is an interpolation of the photo, not
  of the previous frame.
- ``zoom_clip``: a crop window scaling about its centre by ``rate`` per frame (below 1 zooms in).
- ``objects_clip``: elliptical patches cut from another photo, moving by whole pixels in different directions over
  a static background; they occlude each other (fixed layer order) and the background.

Flow convention (used by every function here): an (N, 2, H, W) float32 tensor in pixels, channel 0 horizontal
(x, columns), channel 1 vertical (y, rows). The *backward* flow of frame t maps its pixel p to the point
p + b_t(p) of frame t - 1; the *forward* flow of frame t - 1 maps its pixel q to q + f_t(q) in frame t. OpenCV's
``calcOpticalFlow*(prev=I_t, next=I_{t-1})`` gives the backward flow in this convention.

The warping error (Lai, Huang, Wang, Shechtman, Yumer & Yang 2018, "Learning Blind Video Temporal Consistency",
ECCV 2018, section 5.1) of frames O_0..O_{T-1}::

    E_warp = 1/(T-1) * sum_{t=1}^{T-1}  sum_p M_t(p) * D_t(p) / sum_p M_t(p)
    D_t(p) = 1/3 * sum_c (O_t(p, c) - O_{t-1}(p + b_t(p), c))^2

with O in [0, 1], O_{t-1} sampled bilinearly (``backward_warp``), the squared difference averaged over the three
channels (as in Lai et al.'s evaluation code, whose 3-channel mask divides by 3 per pixel), and M_t the
non-occlusion mask of ``non_occlusion_mask``: the forward-backward consistency check and motion boundaries of Ruder,
Dosovitskiy & Brox 2016 ("Artistic style transfer for videos", GCPR 2016, section 3.2), which Lai et al. use, plus
the pixels whose backward flow leaves frame t - 1 (an extrapolated value would count as flicker). A frame pair
whose mask is empty is left out of the mean.

These helpers are plain torch (no OpenCV), so training code and tests may reuse them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = REPO_ROOT / "data" / "samples" / "held_out"

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

EDGE_TOLERANCE = 1e-3  # pixels: how far past the outer pixel centres a flow may point and still count as inside
# Ruder et al. 2016, section 3.2: the forward-backward consistency and motion boundary thresholds.
DISOCCLUSION_RELATIVE, DISOCCLUSION_ABSOLUTE = 0.01, 0.5
BOUNDARY_RELATIVE, BOUNDARY_ABSOLUTE = 0.01, 0.002


@dataclass(frozen=True)
class Clip:
    """A test clip: ``frames`` (T, 3, H, W) float32 in [0, 1]; ``backward`` / ``forward`` (T - 1, 2, H, W) its exact
    flows (module docstring, "Flow convention"), entry t - 1 for the pair (t - 1, t); None where the motion is not
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
# Warping, masks and the warping error


def _pixel_grid(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(height, device=device, dtype=torch.float32)
    columns = torch.arange(width, device=device, dtype=torch.float32)
    return torch.meshgrid(rows, columns, indexing="ij")


def backward_warp(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``images`` (N, C, H, W) sampled bilinearly at p + flow(p) for every pixel p (``flow`` (N, 2, H, W) pixels):
    frame t - 1 brought to frame t by frame t's backward flow. Points outside the frame read the nearest edge pixel
    (``inside_frame`` tells which). Written with explicit pixel weights rather than ``grid_sample``'s normalised
    coordinates, so a whole-pixel flow copies pixels exactly; differentiable in ``images``."""
    n, c, height, width = images.shape
    ys, xs = _pixel_grid(height, width, images.device)
    x = (xs + flow[:, 0]).clamp(0, width - 1)
    y = (ys + flow[:, 1]).clamp(0, height - 1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = (x - x0).unsqueeze(1), (y - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    flat = images.reshape(n, c, height * width)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = (yy * width + xx).reshape(n, 1, height * width).expand(n, c, height * width)
        return flat.gather(2, index).reshape(n, c, height, width)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def inside_frame(flow: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: True where p + flow(p) lies within the frame (between its outer pixel centres, give or take
    EDGE_TOLERANCE: an estimated flow of -1e-7 px on the first row points at that row, not outside)."""
    height, width = flow.shape[-2:]
    ys, xs = _pixel_grid(height, width, flow.device)
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    lo, x_hi, y_hi = -EDGE_TOLERANCE, width - 1 + EDGE_TOLERANCE, height - 1 + EDGE_TOLERANCE
    return (x >= lo) & (x <= x_hi) & (y >= lo) & (y <= y_hi)


def motion_boundaries(flow: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: Ruder et al. 2016's motion boundaries of ``flow`` (N, 2, H, W),
    |grad u|^2 + |grad v|^2 > 0.01 |flow|^2 + 0.002, with forward differences (0 on the last row and column)."""
    dx = torch.zeros_like(flow)
    dy = torch.zeros_like(flow)
    dx[..., :, :-1] = flow[..., :, 1:] - flow[..., :, :-1]
    dy[..., :-1, :] = flow[..., 1:, :] - flow[..., :-1, :]
    gradient = (dx.pow(2) + dy.pow(2)).sum(dim=1)
    return gradient > BOUNDARY_RELATIVE * flow.pow(2).sum(dim=1) + BOUNDARY_ABSOLUTE


def disocclusions(backward: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: pixels of frame t failing Ruder et al. 2016's forward-backward consistency check,
    |f~ + b|^2 > 0.01 (|f~|^2 + |b|^2) + 0.5, where f~(p) = forward(p + b(p)): following the backward flow and then
    the forward flow should come back to p. ``backward``: frame t's flow to t - 1; ``forward``: frame t - 1's flow
    to t."""
    returned = backward_warp(forward, backward)
    error = (returned + backward).pow(2).sum(dim=1)
    scale = returned.pow(2).sum(dim=1) + backward.pow(2).sum(dim=1)
    return error > DISOCCLUSION_RELATIVE * scale + DISOCCLUSION_ABSOLUTE


def non_occlusion_mask(backward: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float32 M_t: 1 where frame t's pixel is seen in frame t - 1 (consistent flows, not on a motion
    boundary, backward flow inside the frame), 0 elsewhere. Ruder et al. 2016, section 3.2, plus the frame edge."""
    bad = disocclusions(backward, forward) | motion_boundaries(backward) | ~inside_frame(backward)
    return (~bad).float()


@dataclass(frozen=True)
class WarpingError:
    """``value``: E_warp (module docstring); ``per_pair``: (T - 1,) error of each frame pair (NaN where the mask is
    empty); ``coverage``: the mean fraction of pixels the mask keeps."""

    value: float
    per_pair: torch.Tensor
    coverage: float


def warping_error(frames: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor, batch: int = 8) -> WarpingError:
    """E_warp of ``frames`` (T, 3, H, W) in [0, 1] given the flows of the *input* clip: ``backward`` (T - 1, 2,
    H, W) and the non-occlusion ``mask`` (T - 1, H, W) (``non_occlusion_mask`` of the input's flows). Computed in
    float32, ``batch`` frame pairs at a time."""
    frames = frames.float()
    if frames.shape[0] < 2 or backward.shape[0] != frames.shape[0] - 1 or mask.shape[0] != frames.shape[0] - 1:
        raise ValueError(f"{frames.shape[0]} frames need {frames.shape[0] - 1} flows and masks")
    errors = []
    for lo in range(1, frames.shape[0], batch):
        hi = min(lo + batch, frames.shape[0])
        warped = backward_warp(frames[lo - 1 : hi - 1], backward[lo - 1 : hi - 1].to(frames.device))
        squared = (frames[lo:hi] - warped).pow(2).mean(dim=1)
        m = mask[lo - 1 : hi - 1].to(frames.device)
        kept = m.sum(dim=(1, 2))
        errors.append(torch.where(kept > 0, (squared * m).sum(dim=(1, 2)) / kept.clamp_min(1), math.nan).cpu())
    per_pair = torch.cat(errors)
    valid = per_pair[~per_pair.isnan()]
    value = valid.mean().item() if valid.numel() else math.nan
    return WarpingError(value, per_pair, mask.float().mean().item())


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

    china, flower, camera = (load_image(HELD_OUT / name) for name in ("china.jpg", "flower.jpg", "camera.png"))
    return [
        pan_clip(china, size, frames),
        zoom_clip(flower, size, frames),
        objects_clip(camera, china, size, frames),
    ]
