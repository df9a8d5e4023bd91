"""Our instance normalisation layer and the normalisation switch ``make_norm``.

Instance norm (Ulyanov et al. 2016, "Instance Normalization: The Missing Ingredient for Fast Stylization")
normalises each sample and each channel over all spatial positions:
``y = gamma_c * (x - mu_nc) / sqrt(var_nc + eps) + beta_c`` (biased variance, as in nn.InstanceNorm2d).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORM_KINDS = ("instance", "batch", "none")


class InstanceNorm(nn.Module):
    """Instance normalisation over (N, C, *spatial) or unbatched (C, *spatial) input.

    Same parameters, buffers (state_dict keys) and running-statistics semantics as ``nn.InstanceNorm2d``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = False,
        track_running_stats: bool = False,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.momentum = momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(
                f"InstanceNorm expected (N, {self.num_features}, *spatial) or ({self.num_features}, *spatial), "
                f"got shape {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2 or (x.shape[1] != self.num_features and x.shape[0] == self.num_features)
        if unbatched:
            x = x.unsqueeze(0)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"InstanceNorm expected (N, {self.num_features}, *spatial) or ({self.num_features}, *spatial), "
                f"got shape {tuple(x.shape if not unbatched else x.shape[1:])}"
            )
        dims = tuple(range(2, x.dim()))
        xf = x.float()
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats:
            var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)
            if self.training and self.track_running_stats:
                self._update_running_stats(xf, dims)
        else:
            shape = (1, self.num_features) + (1,) * len(dims)
            mean = self.running_mean.float().view(shape)
            var = self.running_var.float().view(shape)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            shape = (1, self.num_features) + (1,) * len(dims)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        y = y.to(x.dtype)
        return y.squeeze(0) if unbatched else y

    @torch.no_grad()
    def _update_running_stats(self, xf: Tensor, dims: tuple[int, ...]) -> None:
        var_u, mean = torch.var_mean(xf, dim=dims, correction=1)
        if self.momentum is None:
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.mean(0).to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var_u.mean(0).to(self.running_var.dtype), alpha=factor)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


def make_norm(kind: str, num_features: int) -> nn.Module:
    """Return the normalisation layer named ``kind`` for ``num_features`` channels.

    "instance" -> our InstanceNorm (affine), "batch" -> nn.BatchNorm2d, "none" -> nn.Identity.
    """
    if kind == "instance":
        return InstanceNorm(num_features, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm kind {kind!r}: valid kinds are {', '.join(NORM_KINDS)}")
