"""PerceptualLoss: feature reconstruction (content), Gram-matrix style reconstruction and total variation.

Johnson et al. 2016, section 3.2 ("Perceptual Loss Functions"), after Gatys et al. 2016:

- content: ``content_weight * sum_j mean((phi_j(y) - phi_j(x_c))^2)`` over ``content_layers`` j, i.e. the squared
  feature distance normalised by C_j * H_j * W_j (and by the batch size);
- style: ``style_weight * sum_j w_j * mean((G_j(y) - G_j(y_s))^2)`` over ``style_layers`` j with per-layer weights
  w_j, where ``G_j(y)[c, c'] = sum_{h,w} phi_j(y)[c, h, w] * phi_j(y)[c', h, w] / (C_j * H_j * W_j)``. The mean
  over the C_j x C_j Gram entries is the squared Frobenius norm of the paper divided by C_j^2 (a constant per
  layer, folded into the weights);
- total variation: ``tv_weight * (mean((y[.., 1:, :] - y[.., :-1, :])^2) + mean((y[.., :, 1:] - y[.., :, :-1])^2))``
  on the output image in [0, 1] (squared differences of neighbouring pixels; Mahendran & Vedaldi 2015, beta = 2).

Scale of the weights: with the vgg19 network the features are on Caffe's 0-255 scale, so at 128-256 px a content
MSE is of order 1e4-1e5 and a Gram MSE of order 1e5-1e7: the weights only make sense relative to each other and to
the layer set; configs/loss/vgg19.yaml explains the defaults.

Numerics: the Gram matrices and every reduction run in float32 with autocast disabled (an fp16 Gram overflows: its
entries reach ~1e4 * H * W before normalisation). Content features come from a separate pass under
``torch.no_grad()`` that stops at the deepest content layer, so no gradient can leak into the content branch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from core.errors import FaststyleError
from models.temporal import TemporalTerm
from models.vgg import build_loss_network

logger = logging.getLogger(__name__)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged when it is already float64 (reductions never lose precision here)."""
    return x if x.dtype == torch.float64 else x.float()


GRAM_BACKWARD_ONE_BMM = True
"""Whether :func:`gram_matrix` back-propagates by :class:`_GramFunction` (False: autograd's two products and their
sum; for ``python -m benchmarks train --count-ops --unoptimized-copies`` and tests that compare the two)."""


class _GramFunction(torch.autograd.Function):
    """``bmm(f, f^T) / norm`` whose backward is one product, ``(h + h^T) f`` with ``h = grad / norm``: autograd's
    own backward multiplies once per operand (``h f`` and ``h^T f``) and adds the two (N, C, H*W) results, a full
    pass over the features' gradient. The same maths with the additions on the (N, C, C) side, so the gradient
    agrees with autograd's to float32 rounding, not bit for bit; the forward is the same product."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, norm: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(f)
        ctx.norm = norm
        return torch.bmm(f, f.transpose(1, 2)) / norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (f,) = ctx.saved_tensors
        h = grad / ctx.norm
        return torch.bmm(h + h.transpose(1, 2), f), None


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrices normalised by C * H * W, in float32 with autocast off.

    Args:
        features: (N, C, H, W), any float dtype or memory format.

    Returns:
        (N, C, C) float32.
    """
    n, c, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = _at_least_fp32(features).reshape(n, c, h * w)
        if GRAM_BACKWARD_ONE_BMM and f.requires_grad and torch.is_grad_enabled():
            return _GramFunction.apply(f, c * h * w)
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between vertically plus horizontally neighbouring pixels; (N, C, H, W) -> scalar."""
    with torch.autocast(device_type=image.device.type, enabled=False):
        x = _at_least_fp32(image)
        zero = x.new_zeros(())
        dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() if x.shape[-2] > 1 else zero
        dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean() if x.shape[-1] > 1 else zero
        return dy + dx


class PerceptualLoss(nn.Module):
    """Weighted content + style + total-variation loss against a frozen loss network.

    Args:
        network: "vgg19", "vgg16" or "random" (models.vgg.build_loss_network).
        content_layers: layers whose activations must match the content image's, e.g. ["relu2_2"]. May be
            empty (then the content term is 0).
        style_layers: {layer: per-layer weight} whose Gram matrices must match the style image's.
        content_weight, style_weight, tv_weight: the term weights (>= 0).
        weights_path: passed to build_loss_network.
        temporal_*: the stability term against flicker (models/temporal.py, TemporalTerm); ``temporal_weight`` 0
            (the default) leaves it out. It is held in ``self.temporal`` for the training step, which runs the
            network on the warped second frame; :meth:`forward` itself computes the per-image terms only.

    Use: ``set_style(style)`` once, then ``losses = loss(output, content)``; back-propagate ``losses["total"]``.
    Several styles (a multi-style network): ``set_styles([style_0, style_1, ...])`` once, then
    ``loss(output, content, style_index)`` with each sample's style index. The style targets are buffers
    (non-persistent: recompute them with set_style after loading), so ``.to(device)`` moves them with the network.
    """

    def __init__(
        self,
        network: str,
        content_layers: Sequence[str],
        style_layers: Mapping[str, float],
        content_weight: float,
        style_weight: float,
        tv_weight: float,
        weights_path: str | None = None,
        temporal_weight: float = 0.0,
        temporal_shift_px: float = 4.0,
        temporal_rotation_deg: float = 2.0,
        temporal_zoom: float = 0.03,
        temporal_noise_std: float = 0.0,
        temporal_local_px: float = 0.0,
        temporal_regions: int = 0,
        temporal_light: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(content_layers, str):
            content_layers = [content_layers]
        self.content_layers = list(content_layers)
        self.style_layers = {str(k): float(v) for k, v in dict(style_layers).items()}
        for term, value in (
            ("content_weight", content_weight),
            ("style_weight", style_weight),
            ("tv_weight", tv_weight),
        ):
            if not float(value) >= 0.0:  # also rejects NaN
                raise FaststyleError(f"loss.{term} must be a number >= 0, got {value!r}")
        negative = [k for k, v in self.style_layers.items() if not v >= 0.0]
        if negative:
            raise FaststyleError(f"loss.style_layers weights must be >= 0, got {negative}")
        if not self.content_layers and not self.style_layers:
            raise FaststyleError("the loss has no content_layers and no style_layers: set at least one of them")
        self.content_weight = float(content_weight)
        self.style_weight = float(style_weight)
        self.tv_weight = float(tv_weight)
        # The stability term (models/temporal.py) needs a second network output, so the training step applies it
        # (training/loop.py train_step); None when its weight is 0, and the step is then exactly as without it.
        self.temporal = (
            TemporalTerm(
                temporal_weight,
                temporal_shift_px,
                temporal_rotation_deg,
                temporal_zoom,
                temporal_noise_std,
                temporal_local_px,
                temporal_regions,
                temporal_light,
            )
            if temporal_weight != 0
            else None
        )
        self.network = build_loss_network(network, self.content_layers + list(self.style_layers), weights_path)
        for layer in self.style_layers:
            self.register_buffer(self._target_name(layer), None, persistent=False)

    @staticmethod
    def _target_name(layer: str) -> str:
        return f"style_target_{layer}"

    @property
    def has_style(self) -> bool:
        """True once set_style has been called (or when there are no style layers)."""
        return all(getattr(self, self._target_name(layer)) is not None for layer in self.style_layers)

    @property
    def num_styles(self) -> int:
        """How many style images the targets hold (1 after set_style)."""
        if not self.style_layers or not self.has_style:
            return 1
        return int(getattr(self, self._target_name(next(iter(self.style_layers)))).shape[0])

    @torch.no_grad()
    def set_styles(self, styles: Sequence[torch.Tensor]) -> None:
        """Gram targets of several style images, one (1, 3, H, W) image per style (sizes may differ), stacked in
        the given order: style index i of :meth:`forward` selects ``styles[i]``."""
        if not styles:
            raise ValueError("set_styles needs at least one style image")
        grams: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.style_layers}
        for style in styles:
            self.set_style(style)
            for layer in self.style_layers:
                grams[layer].append(getattr(self, self._target_name(layer)))
        for layer, targets in grams.items():
            setattr(self, self._target_name(layer), torch.cat(targets))

    @torch.no_grad()
    def set_style(self, style: torch.Tensor) -> None:
        """Compute and store the Gram targets of the style image.

        Args:
            style: (1, 3, H, W) RGB in [0, 1] at the size the Gram targets should describe. It is used as given:
                the caller resizes it to ``style_size`` with data.io (the one owner of resampling), because the
                size sets the scale of the brush strokes the network learns.
        """
        if style.dim() != 4 or style.shape[0] != 1 or style.shape[1] != 3:
            raise ValueError(f"set_style expects a (1, 3, H, W) image, got shape {tuple(style.shape)}")
        if not self.style_layers:
            return
        buffer_device = next(self.network.parameters()).device
        features = self.network(style.to(buffer_device), taps=list(self.style_layers))
        for layer, feature in features.items():
            setattr(self, self._target_name(layer), gram_matrix(feature))

    def forward(
        self, output: torch.Tensor, content: torch.Tensor, style: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Loss of a stylized batch.

        Args:
            output: (N, 3, H, W) RGB in [0, 1], the network's output (gradients flow through it).
            content: (N, 3, H, W) RGB in [0, 1], the input photos (no gradient is computed for them).
            style: (N,) integer style index of each sample, after ``set_styles``; None with one style.

        Returns:
            float32 scalars: ``total`` (= content + style + tv, the value to back-propagate), ``content``,
            ``style``, ``tv`` and ``style/<layer>`` for each style layer; all already multiplied by their
            weights (``style`` is the sum of the ``style/<layer>`` values). With ``style`` given, also
            ``style_per_sample``: the (N,) style term of each sample (``style`` is its mean), for per-style logs.
        """
        if output.shape != content.shape:
            raise ValueError(f"output {tuple(output.shape)} and content {tuple(content.shape)} shapes differ")
        if not self.has_style:
            raise RuntimeError("PerceptualLoss.set_style(style_image) must be called before computing the loss")
        if style is None and self.num_styles > 1:
            raise ValueError(f"the loss holds {self.num_styles} styles: pass each sample's style index")
        losses: dict[str, torch.Tensor] = {}
        features = self.network(output)
        zero = output.new_zeros((), dtype=torch.promote_types(output.dtype, torch.float32))
        with torch.autocast(device_type=output.device.type, enabled=False):
            content_loss = zero
            if self.content_layers:
                with torch.no_grad():
                    targets = self.network(content, taps=self.content_layers)
                for layer in self.content_layers:
                    diff = _at_least_fp32(features[layer]) - _at_least_fp32(targets[layer])
                    content_loss = content_loss + diff.pow(2).mean()
            losses["content"] = self.content_weight * content_loss

            style_loss = zero
            per_sample = output.new_zeros(output.shape[0], dtype=zero.dtype) if style is not None else None
            for layer, layer_weight in self.style_layers.items():
                gram = gram_matrix(features[layer])
                target = getattr(self, self._target_name(layer))
                if style is None:
                    term = self.style_weight * layer_weight * (gram - target).pow(2).mean()  # target broadcasts
                else:  # each sample against its own style's Gram; the mean over samples is the batch's term
                    sample_terms = self.style_weight * layer_weight * (gram - target[style]).pow(2).mean(dim=(1, 2))
                    per_sample = per_sample + sample_terms
                    term = sample_terms.mean()
                losses[f"style/{layer}"] = term
                style_loss = style_loss + term
            losses["style"] = style_loss
            if per_sample is not None:
                losses["style_per_sample"] = per_sample

            losses["tv"] = self.tv_weight * total_variation(output)
            losses["total"] = losses["content"] + losses["style"] + losses["tv"]
        return losses
