"""The temporal stability term: a training loss against flicker that needs no video and no optical-flow network.

A per-frame network turns the small changes between two video frames (motion, sensor noise, compression) into
changes of its texture: flicker. Without video data, make the second "frame" from the training photo itself: a
small random warp W (shift, rotation, zoom) whose motion is known exactly, plus optional noise n (off by default:
on clean clips it cost far more style than it bought stability, README "Stable video"). A stable network commutes
with the motion, f(W(x) + n) = W(f(x)), so the term penalises the difference, over the pixels that the warp maps
from inside the photo (the border it invents is left out):

    temporal = weight * mean over valid pixels and channels of (f(W(x) + n) - W(f(x)))^2

Real footage does not move by one affine warp: the camera's parallax and the wind bend the motion field, objects
move on their own and cover what is behind them, exposure and compression change the pixels. Three optional parts
make the second frame move more like it (all off by default: ``local_px``, ``regions``, ``light``):

- a smooth, locally varying displacement field on top of the warp (random vectors on a 4x4 grid of the crop,
  up to ``local_px`` pixels, interpolated bicubically): bending, non-rigid motion;
- ``regions`` elliptical regions of the photo that move by their own shift (up to twice ``shift_px``) over the
  rest, later ones on top: motion boundaries and occlusion. A region's pixels come from its own place in the
  photo, so every pixel of the second frame still has a known source; a 2-pixel band along each region's edge is
  left out of the term, where the network's context changes across the boundary;
- a change of exposure and tint: each channel scaled by 1 + U(-light, light) and shifted by U(-light/2, light/2),
  which the output should ignore, like the noise.

This is the single-frame regularisation of Eilertsen, Mantiuk & Unger 2019 ("Single-frame Regularization for
Temporally Stable CNNs", CVPR) and the compound regularisation (warp plus noise) of Wang et al. 2020 ("Consistent
Video Style Transfer via Compound Regularization", AAAI; extended as ReReVST, IEEE TIP 2020). Gupta et al. 2017
("Characterizing and Improving Stability in Neural Style Transfer", ICCV) penalise the same difference with the
optical flow of real video frames; the noise half follows their observation that fast style networks amplify
small input perturbations.

Images follow docs/architecture.md, "Images": (N, 3, H, W) float32 RGB in [0, 1]. The warp is an affine sampling
grid (``torch.nn.functional.affine_grid``, ``align_corners=False``) drawn per sample from a generator, so a
training step's warps are a pure function of its seed (training/loop.py seeds it from the run seed and the step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.errors import FaststyleError


@dataclass
class WarpedFrame:
    """The second "frame" of a training photo: ``image`` (N, 3, H, W) = W(x) + noise in [0, 1]; ``grid``
    (N, H, W, 2) the sampling grid of W (normalised coordinates, for ``grid_sample``); ``valid`` (N, 1, H, W)
    float 1 where W samples inside the photo, 0 on the border the warp invents."""

    image: torch.Tensor
    grid: torch.Tensor
    valid: torch.Tensor


def random_affine(
    count: int,
    height: int,
    width: int,
    shift_px: float,
    rotation_deg: float,
    zoom: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``count`` random affine warps as (count, 2, 3) ``affine_grid`` matrices in normalised coordinates.

    Each warp maps an output pixel p (pixels, about the image centre) to the input point s * R(angle) p + t with
    angle ~ U(-rotation_deg, rotation_deg), log s ~ U(-log(1 + zoom), log(1 + zoom)) and each component of t ~
    U(-shift_px, shift_px) pixels; the pixel units make a rotation a rotation on non-square images too.
    """
    u = torch.rand(count, 4, generator=generator, device=device, dtype=torch.float32) * 2 - 1  # U(-1, 1)
    angle = u[:, 0] * math.radians(rotation_deg)
    scale = torch.exp(u[:, 1] * math.log1p(zoom))
    shift = u[:, 2:] * shift_px
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    # Normalised coordinates are pixel coordinates times 2/W (x) and 2/H (y): conjugate the pixel-space matrix.
    ax, ay = 2.0 / width, 2.0 / height
    theta = torch.stack(
        [
            torch.stack([cos, -sin * ax / ay, shift[:, 0] * ax], dim=1),
            torch.stack([sin * ay / ax, cos, shift[:, 1] * ay], dim=1),
        ],
        dim=1,
    )
    return theta


LOCAL_CELLS = 4  # the displacement field's control grid per side: a few bends across a training crop
REGION_RADIUS = (0.12, 0.3)  # a moving region's semi-axes, as fractions of the crop's side
EDGE_BAND_PX = 2  # pixels on each side of a region's edge left out of the term


def local_field(count: int, height: int, width: int, amplitude_px: float, generator, device) -> torch.Tensor:
    """(count, H, W, 2) smooth random displacements in normalised units, each component up to ``amplitude_px``
    pixels: Gaussian vectors (std amplitude/2) on a LOCAL_CELLS grid, bicubic between, clipped."""
    coarse = torch.randn(count, 2, LOCAL_CELLS, LOCAL_CELLS, generator=generator, device=device)
    field = F.interpolate(coarse * (amplitude_px / 2), size=(height, width), mode="bicubic", align_corners=True)
    field = field.clamp(-amplitude_px, amplitude_px)
    return field.permute(0, 2, 3, 1) * field.new_tensor([2.0 / width, 2.0 / height])


def moving_regions(grid: torch.Tensor, regions: int, shift_px: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid`` (N, H, W, 2) with ``regions`` ellipses per sample that move by their own shift (up to ``shift_px``
    pixels per axis): inside a region at its new place, a pixel samples the photo at its old place. Returns the new
    grid and (N, 1, H, W) float 1 off the band of EDGE_BAND_PX pixels around every region's edge."""
    n, height, width, _ = grid.shape
    device = grid.device
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width) + 0.5
    grid = grid.clone()
    edges = torch.zeros(n, 1, height, width, device=device)
    for _ in range(regions):
        u = torch.rand(n, 6, generator=generator, device=device)
        centre_x, centre_y = (0.15 + 0.7 * u[:, 0]) * width, (0.15 + 0.7 * u[:, 1]) * height
        low, high = REGION_RADIUS
        radius_x, radius_y = (low + (high - low) * u[:, 2]) * width, (low + (high - low) * u[:, 3]) * height
        shift_x, shift_y = (u[:, 4] * 2 - 1) * shift_px, (u[:, 5] * 2 - 1) * shift_px
        # The region's place in the second frame: its centre moved by the shift.
        dx = (xs - (centre_x + shift_x).view(n, 1, 1)) / radius_x.view(n, 1, 1)
        dy = (ys - (centre_y + shift_y).view(n, 1, 1)) / radius_y.view(n, 1, 1)
        inside = (dx.square() + dy.square()) <= 1.0  # (N, H, W)
        source_x = (xs - shift_x.view(n, 1, 1)) * (2.0 / width) - 1.0
        source_y = (ys - shift_y.view(n, 1, 1)) * (2.0 / height) - 1.0
        source = torch.stack(torch.broadcast_tensors(source_x, source_y), dim=-1)
        grid = torch.where(inside.unsqueeze(-1), source, grid)
        mask = inside.unsqueeze(1).float()
        k = 2 * EDGE_BAND_PX + 1
        grown = F.max_pool2d(mask, k, stride=1, padding=EDGE_BAND_PX)
        shrunk = 1.0 - F.max_pool2d(1.0 - mask, k, stride=1, padding=EDGE_BAND_PX)
        edges = torch.maximum(edges, grown - shrunk)
    return grid, 1.0 - edges


def warp(images: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """``images`` (N, C, H, W) sampled bilinearly at ``grid`` (N, H, W, 2), in float32."""
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def inside_mask(grid: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float: 1 where the bilinear sample at ``grid`` (N, H, W, 2) reads only pixels of the image
    (its point lies between the outer pixel centres), 0 where it would read the padding."""
    height, width = grid.shape[1:3]
    limit = grid.new_tensor([1.0 - 1.0 / width, 1.0 - 1.0 / height]) + 1e-5  # the outer pixel centres
    return (grid.abs() <= limit).all(dim=-1).unsqueeze(1).float()


class TemporalTerm:
    """The term's settings and its two halves: :meth:`second_frame` before the network, :meth:`__call__` after.

    Args:
        weight: the term's weight (> 0; the loss leaves the term out at 0).
        shift_px, rotation_deg, zoom: the largest shift (pixels of the training crop), rotation (degrees) and
            relative zoom of the random warp, i.e. the motion between two frames the network should follow.
        noise_std: standard deviation of the Gaussian noise added to the warped frame (pixel range [0, 1]).
        local_px: the largest displacement of the smooth local field on top of the warp (pixels; 0 = none).
        regions: how many regions move on their own (shifts up to 2 * shift_px; 0 = none).
        light: the largest relative change of each channel's exposure (0 = none).
    """

    def __init__(
        self,
        weight: float,
        shift_px: float,
        rotation_deg: float,
        zoom: float,
        noise_std: float,
        local_px: float = 0.0,
        regions: int = 0,
        light: float = 0.0,
    ) -> None:
        for name, value in (
            ("temporal_weight", weight),
            ("temporal_shift_px", shift_px),
            ("temporal_rotation_deg", rotation_deg),
            ("temporal_zoom", zoom),
            ("temporal_noise_std", noise_std),
            ("temporal_local_px", local_px),
            ("temporal_regions", regions),
            ("temporal_light", light),
        ):
            if not float(value) >= 0.0:  # also rejects NaN
                raise FaststyleError(f"loss.{name} must be a number >= 0, got {value!r}")
        if zoom >= 1.0:
            raise FaststyleError(f"loss.temporal_zoom must be below 1 (a relative zoom), got {zoom!r}")
        self.weight, self.shift_px, self.rotation_deg = float(weight), float(shift_px), float(rotation_deg)
        self.zoom, self.noise_std = float(zoom), float(noise_std)
        if int(regions) != regions:
            raise FaststyleError(f"loss.temporal_regions must be a whole number, got {regions!r}")
        if light >= 1.0:
            raise FaststyleError(f"loss.temporal_light must be below 1 (a relative change), got {light!r}")
        self.local_px, self.regions, self.light = float(local_px), int(regions), float(light)

    def second_frame(self, content: torch.Tensor, generator: torch.Generator | None = None) -> WarpedFrame:
        """The moved, noisy copy of ``content`` (N, 3, H, W) in [0, 1], with its grid and valid mask.

        The warp's invented border is filled by reflection, so the network sees a photo-like frame there (a black
        border would change its instance-norm statistics); those pixels, and the bands along the moving regions'
        edges, are left out of the term by ``valid``.
        """
        n, _, height, width = content.shape
        with torch.autocast(device_type=content.device.type, enabled=False):  # the grid in fp32: exact positions
            theta = random_affine(
                n,
                height,
                width,
                self.shift_px,
                self.rotation_deg,
                self.zoom,
                generator=generator,
                device=content.device,
            )
            grid = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
            if self.local_px > 0:
                grid = grid + local_field(n, height, width, self.local_px, generator, content.device)
            edges = None
            if self.regions > 0:
                grid, edges = moving_regions(grid, self.regions, 2 * self.shift_px, generator)
            image = warp(content, grid, padding_mode="reflection")
            if self.light > 0:
                u = torch.rand(n, 2, 3, 1, 1, generator=generator, device=content.device) * 2 - 1
                image = (image * (1 + self.light * u[:, 0]) + 0.5 * self.light * u[:, 1]).clamp(0.0, 1.0)
            if self.noise_std > 0:
                noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
                image = (image + self.noise_std * noise).clamp(0.0, 1.0)
            valid = inside_mask(grid)
            if edges is not None:
                valid = valid * edges
        return WarpedFrame(image, grid, valid)

    def __call__(self, stylized: torch.Tensor, stylized_second: torch.Tensor, frame: WarpedFrame) -> torch.Tensor:
        """``weight`` times the mean squared difference between the network's output for the second frame and its
        output for the photo warped the same way, over ``frame.valid`` pixels and the 3 channels (fp32 scalar;
        gradients flow into both outputs)."""
        with torch.autocast(device_type=stylized.device.type, enabled=False):
            moved = warp(stylized, frame.grid)
            diff = (stylized_second.float() - moved).pow(2) * frame.valid
            count = frame.valid.sum() * stylized.shape[1]
            return self.weight * diff.sum() / count.clamp_min(1.0)
