"""Image measures shared by the reports, the benchmarks and the tests: one definition of each."""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``a`` against ``b`` (inf when equal): ``peak`` is 1.0 for float images
    in [0, 1], 255.0 for 8-bit ones. Computed in float64, so 8-bit arrays and 16-bit tensors give exact errors."""
    diff = _float64(a) - _float64(b)
    mse = diff.pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _float64(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    # np.asarray copies views with negative strides (np.rot90, flips), which torch cannot wrap.
    return image.double() if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image, np.float64))
