"""The warping error of Lai et al. 2018, which measures flicker (the flows and the non-occlusion mask it needs are
inference/flow.py's, shared with stylize's steady video).

The warping error (Lai, Huang, Wang, Shechtman, Yumer & Yang 2018, "Learning Blind Video Temporal Consistency",
ECCV 2018, section 5.1) of frames O_0..O_{T-1}::

    E_warp = 1/(T-1) * sum_{t=1}^{T-1}  sum_p M_t(p) * D_t(p) / sum_p M_t(p)
    D_t(p) = 1/3 * sum_c (O_t(p, c) - O_{t-1}(p + b_t(p), c))^2

with O in [0, 1], O_{t-1} sampled bilinearly (``backward_warp``), the squared difference averaged over the three
channels (as in Lai et al.'s evaluation code, whose 3-channel mask divides by 3 per pixel), b_t the backward flow and
M_t the non-occlusion mask of inference/flow.py (Ruder et al. 2016's check, which Lai et al. use, plus the frame
edge; an extrapolated value would count as flicker). A frame pair whose mask keeps less than CUT_COVERAGE of the
pixels (inference/flow.py: 30 %), or whose input's own error is far above the clip's other pairs (``shot_cuts``), is
a cut between two shots, where the two frames have nothing in common to be consistent about, and is left out of the
mean (one cut in a 40-frame clip would otherwise weigh as much as all its other pairs); so is a pair whose mask is
empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inference.flow import (  # noqa: F401  (the report and the tests take the flow from here too)
    CUT_COVERAGE,
    FLOW_METHODS,
    backward_warp,
    disocclusions,
    estimate_flows,
    flow_function,
    grayscale,
    import_cv2,
    inside_frame,
    motion_boundaries,
    non_occlusion_mask,
)

PAIRS_PER_BATCH = 8  # frame pairs warped at once
CUT_ERROR_FACTOR = 20.0  # a pair whose input error is this far above the clip's median crosses a cut (shot_cuts)


@dataclass(frozen=True)
class WarpingError:
    """``value``: E_warp (module docstring); ``per_pair``: (T - 1,) error of each frame pair (NaN where the mask is
    empty); ``coverage``: the mean fraction of pixels the mask keeps; ``cuts``: the pairs left out as cuts."""

    value: float
    per_pair: torch.Tensor
    coverage: float
    cuts: int = 0


def _per_pair(frames: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    """(T - 1,) error of each frame pair (NaN where the mask is empty), float32, ``batch`` pairs at a time."""
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
    return torch.cat(errors)


def _summary(per_pair: torch.Tensor, mask: torch.Tensor, cut: torch.Tensor) -> WarpingError:
    valid = per_pair[~per_pair.isnan() & ~cut]
    value = valid.mean().item() if valid.numel() else math.nan
    return WarpingError(value, per_pair, mask.float().mean().item(), int(cut.sum()))


def _cuts(per_pair: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    coverage = mask.float().mean(dim=(1, 2)).cpu()
    median = per_pair.nanmedian()
    return (coverage < CUT_COVERAGE) | (per_pair.nan_to_num(0.0) > CUT_ERROR_FACTOR * median)


def warping_error(
    frames: torch.Tensor,
    backward: torch.Tensor,
    mask: torch.Tensor,
    batch: int = PAIRS_PER_BATCH,
    cuts: torch.Tensor | None = None,
) -> WarpingError:
    """E_warp of ``frames`` (T, 3, H, W) in [0, 1] given the flows of the *input* clip: ``backward`` (T - 1, 2,
    H, W) and the non-occlusion ``mask`` (T - 1, H, W) (``non_occlusion_mask`` of the input's flows). Computed in
    float32, ``batch`` frame pairs at a time. ``cuts``: (T - 1,) bool, the pairs to leave out (``shot_cuts`` of the
    input clip); None: the pairs whose mask keeps under CUT_COVERAGE of the frame."""
    per_pair = _per_pair(frames, backward, mask, batch)
    cut = mask.float().mean(dim=(1, 2)).cpu() < CUT_COVERAGE if cuts is None else cuts.cpu()
    return _summary(per_pair, mask, cut)


def shot_cuts(frames: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T - 1,) bool: the frame pairs of the *input* clip ``frames`` that cross a cut between two shots: its mask
    keeps under CUT_COVERAGE of the frame, or the input's own error there is over CUT_ERROR_FACTOR times its median
    over the clip's pairs (a smooth flow such as Farneback's can pass the consistency check across a cut)."""
    return _cuts(_per_pair(frames, backward, mask, PAIRS_PER_BATCH), mask)


def input_error(frames: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor) -> tuple[WarpingError, torch.Tensor]:
    """The input clip's own warping error with its ``shot_cuts`` left out, and those cuts: each pair warped once."""
    per_pair = _per_pair(frames, backward, mask, PAIRS_PER_BATCH)
    cut = _cuts(per_pair, mask)
    return _summary(per_pair, mask, cut), cut
