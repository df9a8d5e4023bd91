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

from models.kernels import INSTANCE_NORM, load_kernel
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

        Within the tile: the fused kernel's statistics (models/kernels/instance_norm.cpp, chunked in float and merged
        in float64) where it is loaded, else two passes in float32 (mean by torch's cascade sum, then the sum of
        squared deviations), which is stable, and faster on the CPU than torch.var_mean over an (h, W, C) tile.
        """
        n_b = tile.shape[0] * tile.shape[1]
        if tile.device.type == "cpu" and tile.is_contiguous() and load_kernel(INSTANCE_NORM):
            # the fused kernel's statistics sweep (any float dtype, one read of the tile)
            mean_b, var_b = torch.ops.faststyle_norm.moments(tile.unsqueeze(0).permute(0, 3, 1, 2))
            mean_b, m2_b = mean_b[0], var_b[0] * n_b
        else:
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


def _scale_shift(module: nn.Module, stats: ChannelStats | None) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, scale, bias) in float64 such that ``module`` computes (x - mean) * scale + bias per channel, given
    whole-image ``stats`` if it needs them (else its running statistics)."""
    if stats is not None:
        mean, var = stats.mean, stats.var
    else:
        mean, var = module.running_mean.double().cpu(), module.running_var.double().cpu()
    scale = torch.rsqrt(var + module.eps)
    bias = torch.zeros_like(scale)
    if getattr(module, "weight", None) is not None:
        scale = scale * module.weight.detach().double().cpu()
        bias = module.bias.detach().double().cpu()
    return mean, scale, bias


def norm_fn(module: nn.Module, stats: ChannelStats | None) -> PointwiseFn:
    """The pointwise function computing ``module`` on (h, W, C) tiles, given whole-image ``stats`` if it needs them.

    Folded into one per-channel affine map ``x * scale + shift`` (scale = weight / sqrt(var + eps), shift = bias -
    mean * scale, both computed in float64), which is one fused pass over the tile.
    """
    if isinstance(module, nn.Identity):
        return lambda t, inplace: t
    mean, scale, bias = _scale_shift(module, stats)
    scale32, shift32 = scale.float(), (bias - mean * scale).float()

    def apply(t: Tensor, inplace: bool) -> Tensor:
        if inplace:
            return t.mul_(scale32).add_(shift32)
        return torch.addcmul(shift32, t, scale32)

    return apply


@dataclass(frozen=True)
class Finish:
    """What the fused CPU path applies to a convolution's output as the next step reads it (the kernel's window op):
    ``(x - mf) * sc + sh`` per channel (float64 values; ``mf`` is the mean rounded to float32 and ``sh`` carries
    that rounding, as the kernel's own normalisation does, so large means do not cancel in float32), then ReLU."""

    mf: Tensor
    sc: Tensor
    sh: Tensor
    relu: bool

    @staticmethod
    def identity(channels: int, relu: bool = False) -> Finish:
        zeros = torch.zeros(channels, dtype=torch.float64)
        return Finish(zeros, torch.ones(channels, dtype=torch.float64), zeros, relu)


def finish_pattern(after: list[nn.Module]) -> bool:
    """Whether the modules after a convolution are what a :class:`Finish` computes: at most one norm (or Identity),
    then at most one ReLU."""
    kinds = ["relu" if isinstance(m, nn.ReLU) else "norm" for m in after if not isinstance(m, nn.Identity)]
    return kinds in ([], ["norm"], ["relu"], ["norm", "relu"])


def finish_of(after: list[nn.Module], channels: int, stats: ChannelStats | None) -> Finish:
    """The :class:`Finish` of the modules after a convolution (``finish_pattern``), given the whole-output
    ``stats`` where the norm needs them."""
    relu = any(isinstance(m, nn.ReLU) for m in after)
    norm = next((m for m in after if not isinstance(m, nn.ReLU | nn.Identity)), None)
    if norm is None:
        return Finish.identity(channels, relu)
    mean, scale, bias = _scale_shift(norm, stats)
    mf = mean.float().double()
    return Finish(mf, scale, bias + scale * (mf - mean), relu)
