"""Steady video at stylize time (``video_blend``): each stylized frame blended with the previous output moved along
the optical flow of the input frames, where the flow can be trusted.

    out_t = s_t + alpha * M_t * (warp(out_{t-1}, b_t) - s_t)        (band by band, keeping contrast: below)

s_t is the network's finished frame t, b_t the backward flow of the *input* frames from t to t - 1 (inference/flow.py:
OpenCV DIS, computed on 8-bit grayscale at most FLOW_MAX_SIDE pixels long, with its occlusion mask, and scaled up),
and M_t keeps a pixel only where frame t's input is seen in frame t - 1 and the flow explains it:

- Ruder et al. 2016's non-occlusion mask (forward-backward consistency, motion boundaries, flow inside the frame);
- the input moved by the flow matches the input (mean RGB difference at most PHOTOMETRIC_LIMIT): a wrong flow, a
  lighting change or a new object takes the new frame alone;
- a frame whose mask keeps less than CUT_COVERAGE of its pixels (inference/flow.py) is a cut: it is not blended.

Because out_{t-1} already holds the blend, this is an exponential moving average along motion trajectories: at
``alpha`` 0.5 a still pixel averages about three frames, which removes most of a network's flicker where the camera
and the scene are still, at the price of a trail where the flow is wrong. Averaging also costs texture: where the
network placed its strokes differently in two frames, their plain average is a weaker, softer texture (at 0.5 the
synthetic clips' frames carried half again as much style loss). So the blend is done band by band and each band's
contrast is kept (``blend_keeping_contrast``), and the previous output is moved by bicubic sampling: a bilinear
sample at a sub-pixel shift is a small blur, which the moving average would apply again at every frame (README, "On
real footage, and video_blend", has the figures and the report's ``--style-loss`` that measures them).

Off by default. This is the blending of the warped previous output in the spirit of Ruder et al.'s video style transfer
initialisation and Lai et al. 2018's short-term consistency, with no network of its own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from inference.flow import CUT_COVERAGE, backward_warp, flow_function, import_cv2, non_occlusion_mask

FLOW_METHOD = "dis-medium"  # 3-5x faster than dis-fine, and not the flow the report measures with
FLOW_MAX_SIDE = 960
PHOTOMETRIC_LIMIT = 0.08  # mean absolute RGB difference in [0, 1] (20 of 255)
LEVELS = 3  # detail bands of 1, 2 and 4 pixels: a network's brushstrokes; coarser than that is colour and shape
CORRELATION_WINDOW = 5  # pixels of each band's own size over which two bands' correlation is measured
BYTES_PER_PX = 320  # peak memory of blending one frame (float copies, flows, warps, bands): 282 measured at 1920x1080


def _gray(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    cv2 = import_cv2("video_blend")
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return gray if size is None else cv2.resize(gray, size, interpolation=cv2.INTER_AREA)


def _bands(image: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A Laplacian pyramid: ``levels`` detail bands (finest first, each at half the size of the one before) and the
    remaining low-pass image; adding each band to the next level scaled up gives the image back exactly."""
    bands = []
    for _ in range(levels):
        if min(image.shape[-2:]) < 2:
            break
        low = F.avg_pool2d(image, 2, ceil_mode=True)
        bands.append(image - F.interpolate(low, size=image.shape[-2:], mode="bilinear", align_corners=False))
        image = low
    return bands, image


def _local_mean(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, CORRELATION_WINDOW, stride=1, padding=CORRELATION_WINDOW // 2, count_include_pad=False)


def blend_keeping_contrast(stylized: torch.Tensor, moved: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``stylized + weight * (moved - stylized)`` (N, 3, H, W; ``weight`` N, 1, H, W in [0, 1]) band by band, each
    band's detail scaled back to the contrast the two had (Heitz & Neyret 2018's variance-preserving blend).

    The average of two textures that do not line up is a weaker texture: its variance is ((1 - w)^2 + w^2 + 2 w (1 -
    w) rho) times theirs, rho their correlation. Dividing each band by the square root of that, with rho measured
    locally in that band, keeps the contrast of the strokes the network painted anew while still averaging their
    flicker away; where the two agree (rho = 1) or the weight is 0 it is the plain blend."""
    stylized_bands, stylized_low = _bands(stylized, LEVELS)
    moved_bands, moved_low = _bands(moved, LEVELS)
    weights = [weight]
    for _ in stylized_bands:
        weights.append(F.avg_pool2d(weights[-1], 2, ceil_mode=True))
    out = stylized_low + weights[-1] * (moved_low - stylized_low)
    for s, m, w in reversed(list(zip(stylized_bands, moved_bands, weights[:-1], strict=True))):
        cross = _local_mean((s * m).sum(1, keepdim=True))
        energy = (_local_mean(s.square().sum(1, keepdim=True)) * _local_mean(m.square().sum(1, keepdim=True))).sqrt_()
        rho = (cross / energy.clamp_min_(1e-12)).clamp_(0, 1)
        shrink = (1 - w).square_() + w.square() + 2 * w * (1 - w) * rho
        out = F.interpolate(out, size=s.shape[-2:], mode="bilinear", align_corners=False)
        out = out + shrink.clamp_min_(0.5).rsqrt_() * (s + w * (m - s))
    return out


class FlowBlend:
    """The blend of one video, frame by frame in display order (state: the previous input and output).

    Args:
        alpha: the weight of the moved previous output, in (0, 1).
    """

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        import_cv2("video_blend")  # before the first frame: one line, not a traceback mid-video
        self.alpha = float(alpha)
        self._calc = flow_function(FLOW_METHOD)
        self._previous: tuple[np.ndarray, torch.Tensor, torch.Tensor] | None = None  # gray, input, output
        self.blended = 0  # frames blended (the first frame and cuts are not)
        self.cuts = 0

    def _flow_and_mask(self, gray_prev: np.ndarray, gray: np.ndarray, height: int, width: int) -> tuple:
        """Frame t's backward flow (1, 2, H, W) and non-occlusion mask (1, H, W) at full size, both computed at the
        grays' size (the flow holds no finer detail) and scaled up."""

        def calc(first: np.ndarray, second: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(self._calc(first, second)).permute(2, 0, 1)[None].float()

        backward = calc(gray, gray_prev)
        mask = non_occlusion_mask(backward, calc(gray_prev, gray), exact=False)
        small_h, small_w = backward.shape[-2:]
        if (small_h, small_w) != (height, width):
            backward = F.interpolate(backward, size=(height, width), mode="bilinear", align_corners=False)
            backward = backward * backward.new_tensor([width / small_w, height / small_h]).view(1, 2, 1, 1)
            mask = F.interpolate(mask[None], size=(height, width), mode="nearest")[0]
        return backward, mask

    def __call__(self, source: np.ndarray, stylized: np.ndarray) -> np.ndarray:
        """The blended frame: ``source`` (H, W, 3) uint8 the input frame, ``stylized`` (H, W, 3) uint8 its finished
        stylization (same size); returns (H, W, 3) uint8."""
        height, width = source.shape[:2]
        scale = min(1.0, FLOW_MAX_SIDE / max(height, width))
        size = None if scale == 1.0 else (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = _gray(source, size)
        frame = torch.from_numpy(source).permute(2, 0, 1)[None].float().div_(255.0)
        out = torch.from_numpy(stylized).permute(2, 0, 1)[None].float().div_(255.0)
        previous, self._previous = self._previous, None
        if previous is not None and previous[0].shape == gray.shape:
            gray_prev, frame_prev, out_prev = previous
            backward, mask = self._flow_and_mask(gray_prev, gray, height, width)
            both = torch.cat([frame_prev, out_prev], dim=1)
            moved_input, moved = backward_warp(both, backward, exact=False, mode="bicubic").clamp_(0, 1).split(3, dim=1)
            mask = mask * ((frame - moved_input).abs().mean(dim=1) <= PHOTOMETRIC_LIMIT).float()
            if mask.mean().item() >= CUT_COVERAGE:
                out = blend_keeping_contrast(out, moved, self.alpha * mask.unsqueeze(1)).clamp_(0, 1)
                self.blended += 1
            else:
                self.cuts += 1
        self._previous = (gray, frame, out)
        return out[0].mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
