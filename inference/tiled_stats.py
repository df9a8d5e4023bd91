"""Whole-image statistics of an activation computed strip by strip, and the pointwise functions (norms, ReLU) that
tiled inference applies to strips once those statistics are known.

Instance norm normalizes each channel with the mean and variance over the whole image; the executor merges each
strip's per-channel statistics into running totals (``ChannelStats``) with the parallel variance formula of Chan,
Golub & LeVeque (1979) in float64. The naive ``E[x^2] - E[x]^2`` is avoided on purpose: it cancels catastrophically
in float32 (docs/architecture.md, "Numerics"). A norm with known statistics is a per-channel affine map
(``norm_fn``), applied lazily when the next convolution reads its input strip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from models.norm import InstanceNorm

PointwiseFn = Callable[[Tensor, bool], Tensor]
"""A pointwise function on (h, W, C) tiles; the bool says whether it may modify its argument in place."""


@dataclass
class ChannelStats:
    """Per-channel count, mean and sum of squared deviations (M2), merged strip by strip in float64."""

    channels: int
    count: int = 0
    mean: Tensor = field(default=None)  # type: ignore[assignment]
    m2: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.mean = torch.zeros(self.channels, dtype=torch.float64)
        self.m2 = torch.zeros(self.channels, dtype=torch.float64)

    def add(self, tile: Tensor) -> None:
        """Merge the statistics of an (h, W, C) tile (Chan, Golub & LeVeque 1979, pairwise update).

        Within the tile: two passes in float32 (mean by torch's cascade sum, then the sum of squared deviations),
        which is stable, and faster on the CPU than torch.var_mean over an (h, W, C) tile.
        """
        n_b = tile.shape[0] * tile.shape[1]
        mean_b32 = tile.sum(dim=(0, 1)) / n_b
        m2_b = (tile - mean_b32).square_().sum(dim=(0, 1)).double().cpu()
        mean_b = mean_b32.double().cpu()
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (self.count * n_b / n)
        self.count = n

    @property
    def var(self) -> Tensor:
        """Biased (population) variance, as instance norm uses."""
        return self.m2 / max(self.count, 1)


def relu(t: Tensor, inplace: bool) -> Tensor:
    return t.relu_() if inplace else torch.relu(t)


def norm_needs_stats(module: nn.Module) -> bool:
    """True when ``module`` normalizes with statistics of its input (instance norm, or a norm without buffers)."""
    if isinstance(module, nn.Identity):
        return False
    if isinstance(module, nn.BatchNorm2d):
        # Batch norm uses batch statistics when training or without running stats: with one image, those are the
        # per-channel statistics over the whole image, exactly like instance norm.
        return module.training or not module.track_running_stats
    if isinstance(module, InstanceNorm | nn.InstanceNorm2d):
        return module.training or not module.track_running_stats
    raise NotImplementedError(f"tiled inference does not support the norm layer {type(module).__name__}")


def norm_fn(module: nn.Module, stats: ChannelStats | None) -> PointwiseFn:
    """The pointwise function computing ``module`` on (h, W, C) tiles, given whole-image ``stats`` if it needs them.

    Folded into one per-channel affine map ``x * scale + shift`` (scale = weight / sqrt(var + eps), shift = bias -
    mean * scale, both computed in float64), which is one fused pass over the tile.
    """
    if isinstance(module, nn.Identity):
        return lambda t, inplace: t
    if stats is not None:
        mean, var = stats.mean, stats.var
    else:
        mean, var = module.running_mean.double().cpu(), module.running_var.double().cpu()
    scale = torch.rsqrt(var + module.eps)
    shift = -mean * scale
    if getattr(module, "weight", None) is not None:
        weight, bias = module.weight.detach().double().cpu(), module.bias.detach().double().cpu()
        scale, shift = scale * weight, shift * weight + bias
    scale32, shift32 = scale.float(), shift.float()

    def apply(t: Tensor, inplace: bool) -> Tensor:
        if inplace:
            return t.mul_(scale32).add_(shift32)
        return torch.addcmul(shift32, t, scale32)

    return apply
