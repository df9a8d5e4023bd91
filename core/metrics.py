"""Image measures shared by the reports, the benchmarks and the tests: one definition of each."""

from __future__ import annotations

import math

import numpy as np
import torch


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``a`` against ``b`` (inf when equal): ``peak`` is 1.0 for float images
    in [0, 1], 255.0 for 8-bit ones. Computed in float64, so 8-bit arrays and 16-bit tensors give exact errors."""
    diff = torch.as_tensor(a).double() - torch.as_tensor(b).double()
    mse = diff.pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
