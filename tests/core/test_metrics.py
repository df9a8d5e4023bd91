"""core.metrics: the one PSNR of the reports, benchmarks and tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.metrics import psnr


def test_psnr_of_a_known_error_and_of_equal_images() -> None:
    a = torch.zeros(1, 3, 4, 5)
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # mse 0.01 at peak 1
    assert psnr(a, a) == math.inf


def test_psnr_of_8_bit_arrays_equals_that_of_the_same_floats() -> None:
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 256, (6, 7, 3), dtype=np.uint8) for _ in range(2))
    as_floats = psnr(torch.from_numpy(x) / 255.0, torch.from_numpy(y) / 255.0)
    assert psnr(x, y, peak=255.0) == pytest.approx(as_floats, rel=1e-6)  # no uint8 wrap-around
    assert psnr(np.rot90(x), np.rot90(y), peak=255.0) == pytest.approx(as_floats, rel=1e-6)  # negative strides
