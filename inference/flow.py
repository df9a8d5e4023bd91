"""Optical flow between video frames and what it says about occlusion: the mechanism that the warping error
(evaluation/warping.py) measures flicker with and that stylize's steady video (inference/steady.py) blends with.

Flow convention (used by every function here, by evaluation/clips.py and evaluation/warping.py): an (N, 2, H, W)
float32 tensor in pixels, channel 0 horizontal (x, columns), channel 1 vertical (y, rows). The *backward* flow of
frame t maps its pixel p to the point p + b_t(p) of frame t - 1; the *forward* flow of frame t - 1 maps its pixel q
to q + f_t(q) in frame t. OpenCV's ``calcOpticalFlow*(prev=I_t, next=I_{t-1})`` gives the backward flow in this
convention.

``non_occlusion_mask`` is the forward-backward consistency check and motion boundaries of Ruder, Dosovitskiy &
Brox 2016 ("Artistic style transfer for videos", GCPR 2016, section 3.2), plus the pixels whose backward flow
leaves frame t - 1. The warping and the mask are plain torch; only the estimated flow (``estimate_flows``,
``flow_function``) needs OpenCV, which is not a dependency of faststyle: ``pip install opencv-python-headless``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np

EDGE_TOLERANCE = 1e-3  # pixels: how far past the outer pixel centres a flow may point and still count as inside
# Ruder et al. 2016, section 3.2: the forward-backward consistency and motion boundary thresholds.
DISOCCLUSION_RELATIVE, DISOCCLUSION_ABSOLUTE = 0.01, 0.5
BOUNDARY_RELATIVE, BOUNDARY_ABSOLUTE = 0.01, 0.002


FLOW_METHODS = ("dis-fine", "dis-medium", "farneback")
CUT_COVERAGE = 0.3  # a frame pair whose non-occlusion mask keeps less of the frame is a cut between two shots
OPENCV_HINT = "pip install opencv-python-headless"


def _pixel_grid(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(height, device=device, dtype=torch.float32)
    columns = torch.arange(width, device=device, dtype=torch.float32)
    return torch.meshgrid(rows, columns, indexing="ij")


def backward_warp(images: torch.Tensor, flow: torch.Tensor, exact: bool = True, mode: str = "bilinear") -> torch.Tensor:
    """``images`` (N, C, H, W) sampled bilinearly at p + flow(p) for every pixel p (``flow`` (N, 2, H, W) pixels):
    frame t - 1 brought to frame t by frame t's backward flow. Points outside the frame read the nearest edge pixel
    (``inside_frame`` tells which). Differentiable in ``images``.

    ``exact`` (the measure): explicit pixel weights, so a whole-pixel flow copies pixels exactly. Otherwise (the
    video blend) ``grid_sample``, several times faster on a full-HD frame, whose normalised coordinates put a sample
    up to about 1e-4 pixel off; there ``mode="bicubic"`` samples bicubically instead, which blurs a moved image
    less (it can overshoot the input's range by a little)."""
    n, c, height, width = images.shape
    if mode != "bilinear" and (exact or mode != "bicubic"):
        raise ValueError(f"mode {mode!r}: the exact warp is bilinear; grid_sample's is bilinear or bicubic")
    ys, xs = _pixel_grid(height, width, images.device)
    if not exact and min(height, width) > 1:  # grid_sample's coordinates need two pixels a side
        grid = torch.stack([(xs + flow[:, 0]) * (2 / (width - 1)) - 1, (ys + flow[:, 1]) * (2 / (height - 1)) - 1], -1)
        return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=True)
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


def disocclusions(backward: torch.Tensor, forward: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """(N, H, W) bool: pixels of frame t failing Ruder et al. 2016's forward-backward consistency check,
    |f~ + b|^2 > 0.01 (|f~|^2 + |b|^2) + 0.5, where f~(p) = forward(p + b(p)): following the backward flow and then
    the forward flow should come back to p. ``backward``: frame t's flow to t - 1; ``forward``: frame t - 1's flow
    to t. ``exact``: as in ``backward_warp``."""
    returned = backward_warp(forward, backward, exact)
    error = (returned + backward).pow(2).sum(dim=1)
    scale = returned.pow(2).sum(dim=1) + backward.pow(2).sum(dim=1)
    return error > DISOCCLUSION_RELATIVE * scale + DISOCCLUSION_ABSOLUTE


def non_occlusion_mask(backward: torch.Tensor, forward: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """(N, H, W) float32 M_t: 1 where frame t's pixel is seen in frame t - 1 (consistent flows, not on a motion
    boundary, backward flow inside the frame), 0 elsewhere. Ruder et al. 2016, section 3.2, plus the frame edge."""
    bad = disocclusions(backward, forward, exact) | motion_boundaries(backward) | ~inside_frame(backward)
    return (~bad).float()


def import_cv2(purpose: str = "the optical flow"):
    """OpenCV, or a FaststyleError saying that ``purpose`` needs it and how to install it (an optional dependency:
    the estimated flow only)."""
    from core.errors import FaststyleError

    try:
        import cv2
    except ImportError:
        raise FaststyleError(f"{purpose} needs OpenCV for the optical flow: {OPENCV_HINT}") from None
    return cv2


def flow_function(method: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``calc(first, second)`` -> (H, W, 2) float32 flow mapping each pixel of ``first`` into ``second`` (8-bit
    grayscale frames). "dis-fine" is DIS's MEDIUM preset run down to the full-resolution pyramid level (OpenCV's
    presets stop at MEDIUM, whose finest level is half resolution); it follows the objects' edges much better."""
    cv2 = import_cv2()
    if method == "farneback":
        return lambda first, second: cv2.calcOpticalFlowFarneback(first, second, None, 0.5, 4, 15, 3, 5, 1.2, 0)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    if method == "dis-fine":
        dis.setFinestScale(0)
    elif method != "dis-medium":
        raise ValueError(f"unknown flow method {method!r}")
    return lambda first, second: dis.calc(first, second, None)


def grayscale(frame: torch.Tensor) -> np.ndarray:
    """A (3, H, W) frame in [0, 1] as the (H, W) uint8 luma OpenCV's flow takes."""
    cv2 = import_cv2()
    from data.io import to_uint8

    rgb = to_uint8(frame).permute(1, 2, 0).contiguous().numpy()
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def estimate_flows(frames: torch.Tensor, method: str = FLOW_METHODS[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """(backward, forward) flows (T - 1, 2, H, W) of ``frames`` (T, 3, H, W): entry t - 1 holds frame t's flow to
    t - 1 and frame t - 1's flow to t (module docstring, "Flow convention")."""
    calc = flow_function(method)
    gray = [grayscale(frame) for frame in frames]

    def flow(first: int, second: int) -> torch.Tensor:
        return torch.from_numpy(calc(gray[first], gray[second])).permute(2, 0, 1).float()

    backward = torch.stack([flow(t, t - 1) for t in range(1, len(gray))])
    forward = torch.stack([flow(t - 1, t) for t in range(1, len(gray))])
    return backward, forward
