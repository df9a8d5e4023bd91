"""The image transformation network of Johnson et al. 2016 ("Perceptual Losses for Real-Time Style Transfer and
Super-Resolution", ECCV 2016, supplementary material, Table 1), with the changes the field adopted since:

- instance norm instead of batch norm (Ulyanov et al. 2016, "Instance Normalization: The Missing Ingredient for
  Fast Stylization"), picked by name through ``models.norm.make_norm``;
- reflection padding instead of zero padding, so borders are not darkened;
- nearest-neighbour x2 upsampling followed by a stride-1 convolution instead of a transposed convolution, which
  avoids checkerboard artifacts (Odena, Dumoulin & Olah 2016, "Deconvolution and Checkerboard Artifacts",
  distill.pub). ``upsample="transpose"`` keeps the paper's transposed convolutions for comparison;
- a sigmoid output so that the output is RGB in [0, 1] (see "Output mapping" below).

Structure (stable: tiling, export and import code walk it)::

    encoder   ConvLayer(3 -> w, 9x9)    norm ReLU
              ConvLayer(w -> 2w, 3x3, stride 2)  norm ReLU
              ConvLayer(2w -> 4w, 3x3, stride 2) norm ReLU
    residuals residual_blocks x ResidualBlock(4w): conv1 norm1 ReLU conv2 norm2, plus the identity
    decoder   UpsampleConvLayer(4w -> 2w) | ConvTranspose2d   norm ReLU
              UpsampleConvLayer(2w -> w)  | ConvTranspose2d   norm ReLU
              ConvLayer(w -> 3, 9x9)     (no norm, no ReLU)
    output    OUTPUT_MAPPINGS[output] applied to the last conv's result

with ``w = base_width`` (32 in the paper: 1.68 M parameters).

Several styles in one network (Dumoulin, Shlens & Kudlur 2017, "A Learned Representation for Artistic Style"):
with ``num_styles`` > 1 every norm is a ``ConditionalInstanceNorm`` holding a (gamma, beta) row per style and
everything else is shared; ``forward(x, style)`` takes the style per sample (an index, or convex weights that mix
styles). ``for_style(mix)`` gives the plain one-style network of a style or a mix (what inference runs: the same
cost per image as a one-style model) and ``with_added_style`` appends a style trained on a frozen copy. One style
(the default) is exactly the network above: same modules, same state-dict keys and shapes, same file.

Input size: the encoder halves the resolution twice, so an input whose height or width is not a multiple of 4 is
first padded at the bottom/right edge (reflection; replication for inputs too small to reflect) up to the next
multiple of 4, and the output is cropped back. Any H, W >= 1 works and the output always has the input's H and W.
Padding only at the bottom/right keeps pixel (0, 0) of the input at pixel (0, 0) of the network's canvas, which is
what tiling code needs to place tiles.

Output mapping: the last convolution produces an unbounded value ``z``; ``output="sigmoid"`` (default) returns
``sigmoid(z)``, which covers the open interval (0, 1), has a non-zero gradient everywhere and starts at mid-grey
(z ~ 0 at initialisation). ``output="linear"`` returns ``z`` unchanged while training (the loss must see the
unclamped value: a clamp there has zero gradient for every pixel outside [0, 1], so pixels that overshoot once can
never come back, which is how an unbounded network trained with a high learning rate collapses to black) and
``z.clamp(0, 1)`` in eval mode. "linear" exists for networks imported from implementations with an unbounded
output (pytorch/examples: fold its 0-255 scale into the first and last convs).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import fused
from models.norm import NORM_KINDS, ConditionalInstanceNorm, InstanceNorm, capturing_graph, make_norm

logger = logging.getLogger(__name__)

UPSAMPLE_KINDS = ("nearest", "transpose")
OUTPUT_MAPPINGS = ("sigmoid", "linear")
# The encoder has two stride-2 convolutions: the network works on canvases whose sides are multiples of 4.
SIZE_MULTIPLE = 4


class ConvLayer(nn.Module):
    """Reflection padding then a convolution, so the output has ``ceil(H / stride)`` rows.

    Attributes: ``pad`` (nn.ReflectionPad2d, kernel_size // 2 on every side) and ``conv`` (nn.Conv2d, no padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'); H' = H for stride 1, ceil(H / 2) for stride 2 and odd kernel."""
        x = reflection_pad(self.pad, x)
        if _prefer_channels_last(x, self.conv):
            # Same numbers in the caller's layout; only this convolution runs channels-last (see the helper).
            return self.conv(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self.conv(x)


PAD_IN_ACTIVATION_DTYPE = True
"""Whether :func:`reflection_pad` keeps a 16-bit activation in its dtype under autocast (False: autocast's float32
padding, the copies it makes; for ``python -m benchmarks train --count-ops --unoptimized-copies`` and tests)."""


def reflection_pad(pad: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pad(x)`` in x's own dtype. CPU autocast runs reflection padding in float32 (its fp32 op list), so a bf16
    activation would be copied to float32, padded, and copied back to bf16 by the next convolution, with the two
    casts again in backward. Padding only moves values, so the forward result is the same bf16 values; the backward
    sums the reflected border gradients in the activation's dtype instead of float32."""
    if (
        PAD_IN_ACTIVATION_DTYPE
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.is_autocast_enabled(x.device.type)
    ):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return pad(x)
    return pad(x)


# Below this many output channels a CPU convolution runs channels-last even inside an NCHW network: oneDNN's NCHW
# kernels cannot vectorise over 3 output channels, which makes the last 9x9 conv (32 -> 3) several times slower
# than in channels-last (README, "Limitations") and a large share of a CPU training step, while the network's wider
# convolutions are as fast or faster in NCHW and the layout copy of their input is cheap.
_FEW_CHANNELS = 8


def _prefer_channels_last(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and conv.out_channels < _FEW_CHANNELS
        and not x.is_contiguous(memory_format=torch.channels_last)
        and not capturing_graph()
    )


class UpsampleConvLayer(nn.Module):
    """Nearest-neighbour upsampling by ``scale_factor`` then a reflection-padded stride-1 convolution.

    Same attribute names as ConvLayer (``pad``, ``conv``) plus ``scale_factor``; deliberately not a ConvLayer
    subclass so that code walking the network cannot mistake it for a plain convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, scale_factor: int = 2) -> None:
        super().__init__()
        self.scale_factor = scale_factor
        self.pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H * scale_factor, W * scale_factor)."""
        x = F.interpolate(x, scale_factor=self.scale_factor, mode="nearest")
        return self.conv(reflection_pad(self.pad, x))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a norm after each and a ReLU after the first, plus the identity.

    Johnson et al. (supplementary, "Residual connections"): no ReLU after the addition, which keeps the block able
    to represent the identity; He et al. 2016 found the same for this ordering.
    """

    def __init__(self, channels: int, norm: str, num_styles: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3)
        self.norm1 = make_norm(norm, channels, num_styles)
        self.conv2 = ConvLayer(channels, channels, 3)
        self.norm2 = make_norm(norm, channels, num_styles)
        self.takes_style = num_styles > 1

    def forward(self, x: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W); ``mix`` (N, num_styles) for a multi-style block."""
        if mix is None:
            y = F.relu(self.norm1(self.conv1(x)))
            return x + self.norm2(self.conv2(y))
        y = F.relu(self.norm1(self.conv1(x), mix))
        return x + self.norm2(self.conv2(y), mix)


def _upsampling_layer(in_channels: int, out_channels: int, upsample: str) -> nn.Module:
    """x2 upsampling stage: nearest x2 + 3x3 conv, or the paper's 3x3 stride-2 transposed conv."""
    if upsample == "nearest":
        return UpsampleConvLayer(in_channels, out_channels, 3, scale_factor=2)
    # padding=1 with output_padding=1 gives exactly 2H x 2W, like the nearest path.
    return nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)


class TransformerNet(nn.Module):
    """Johnson et al. 2016 style-transfer network; see the module docstring for the structure.

    Args:
        norm: "instance" (default), "batch" or "none" (models.norm.NORM_KINDS).
        base_width: channels of the first conv (w); the encoder goes w -> 2w -> 4w. 32 in the paper; 16 and 8 give
            light models (about 1/4 and 1/16 of the compute).
        residual_blocks: number of residual blocks at 4w channels (5 in the paper).
        upsample: "nearest" (default, no checkerboard artifacts) or "transpose" (the paper's transposed convs).
        output: "sigmoid" (default) or "linear" (see the module docstring, "Output mapping").
        num_styles: styles held by the network (conditional instance norm when > 1; norm must be "instance").
    """

    def __init__(
        self,
        norm: str = "instance",
        base_width: int = 32,
        residual_blocks: int = 5,
        upsample: str = "nearest",
        output: str = "sigmoid",
        num_styles: int = 1,
    ) -> None:
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORM_KINDS)}")
        if upsample not in UPSAMPLE_KINDS:
            raise ValueError(f"unknown upsample {upsample!r}: use one of {', '.join(UPSAMPLE_KINDS)}")
        if output not in OUTPUT_MAPPINGS:
            raise ValueError(f"unknown output {output!r}: use one of {', '.join(OUTPUT_MAPPINGS)}")
        if int(base_width) != base_width or base_width < 1:
            raise ValueError(f"base_width must be a positive integer, got {base_width!r}")
        if int(residual_blocks) != residual_blocks or residual_blocks < 0:
            raise ValueError(f"residual_blocks must be a non-negative integer, got {residual_blocks!r}")
        if int(num_styles) != num_styles or num_styles < 1:
            raise ValueError(f"num_styles must be a positive integer, got {num_styles!r}")
        if num_styles > 1 and norm != "instance":
            raise ValueError(f"a network with {num_styles} styles needs norm 'instance' (conditional), not {norm!r}")
        self._config: dict[str, Any] = {
            "norm": str(norm),
            "base_width": int(base_width),
            "residual_blocks": int(residual_blocks),
            "upsample": str(upsample),
            "output": str(output),
        }
        self.num_styles = int(num_styles)
        if self.num_styles > 1:  # left out for one style, so one-style files stay as they were
            self._config["num_styles"] = self.num_styles
        w, s = int(base_width), self.num_styles
        self.encoder = nn.Sequential(
            ConvLayer(3, w, 9),
            make_norm(norm, w, s),
            nn.ReLU(),
            ConvLayer(w, 2 * w, 3, stride=2),
            make_norm(norm, 2 * w, s),
            nn.ReLU(),
            ConvLayer(2 * w, 4 * w, 3, stride=2),
            make_norm(norm, 4 * w, s),
            nn.ReLU(),
        )
        self.residuals = nn.Sequential(*[ResidualBlock(4 * w, norm, s) for _ in range(int(residual_blocks))])
        self.decoder = nn.Sequential(
            _upsampling_layer(4 * w, 2 * w, upsample),
            make_norm(norm, 2 * w, s),
            nn.ReLU(),
            _upsampling_layer(2 * w, w, upsample),
            make_norm(norm, w, s),
            nn.ReLU(),
            ConvLayer(w, 3, 9),
        )
        self.output = str(output)

    def config(self) -> dict[str, Any]:
        """The constructor kwargs as plain primitives: ``TransformerNet(**net.config())`` rebuilds the network."""
        return dict(self._config)

    def map_output(self, z: torch.Tensor) -> torch.Tensor:
        """Map the last conv's unbounded (N, 3, H, W) result to RGB in [0, 1] (module docstring, "Output mapping")."""
        if self.output == "sigmoid":
            return torch.sigmoid(z)
        return z if self.training else z.clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor, style: torch.Tensor | int | None = None) -> torch.Tensor:
        """Stylize a batch.

        Args:
            x: (N, 3, H, W) float RGB in [0, 1], any H, W >= 1.
            style: multi-style networks only (see :meth:`style_mix`): a style index, (N,) indices, or style
                weights (num_styles,) or (N, num_styles).

        Returns:
            (N, 3, H, W) RGB in [0, 1] (in (0, 1) for the sigmoid output), same dtype as the network computes in.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(x.shape)}")
        mix = self.style_mix(style, x.shape[0], x.device)
        height, width = x.shape[-2:]
        y = self.body(pad_to_multiple(x, SIZE_MULTIPLE), mix)
        return self.map_output(y[..., :height, :width])

    def body(self, canvas: torch.Tensor, mix: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder, residual blocks and decoder on a canvas whose sides are multiples of 4; ``mix`` (N, num_styles)
        float32 rows summing to 1 for a multi-style network, None for one style. Returns the unmapped output."""
        if mix is None:
            if fused.applies(self, canvas):
                return fused.fused_body(self, canvas)
            return self.decoder(self.residuals(self.encoder(canvas)))
        y = canvas
        for layer in (*self.encoder, *self.residuals, *self.decoder):
            y = layer(y, mix) if getattr(layer, "takes_style", False) else layer(y)
        return y

    def style_mix(self, style: torch.Tensor | int | None, batch: int, device: torch.device) -> torch.Tensor | None:
        """The (batch, num_styles) float32 style weights of ``style`` (None for a one-style network).

        ``style``: an int or an integer tensor of shape () or (batch,) selects styles by index; a float tensor of
        shape (num_styles,) or (batch, num_styles) holds weights >= 0, normalised here to sum to 1 per row
        (a convex combination of the styles' (gamma, beta), Dumoulin et al. 2017, section 4). Raises ValueError
        for a missing style, an index out of range or weights that cannot be normalised.
        """
        if self.num_styles == 1:
            if style is not None:
                raise ValueError("this network holds one style: call it without a style")
            return None
        if style is None:
            raise ValueError(f"this network holds {self.num_styles} styles: pass style= (an index or weights)")
        style = torch.as_tensor(style, device=device)
        if not style.is_floating_point():
            index = style.reshape(-1).long().expand(batch) if style.numel() == 1 else style.long()
            if index.shape != (batch,):
                raise ValueError(f"expected {batch} style indices, got shape {tuple(style.shape)}")
            if not capturing_graph() and bool(((index < 0) | (index >= self.num_styles)).any()):
                raise ValueError(f"style index out of range: this network holds styles 0..{self.num_styles - 1}")
            return F.one_hot(index, self.num_styles).float()
        weights = style.float()
        if weights.dim() == 1:
            weights = weights.expand(batch, -1)
        if weights.shape != (batch, self.num_styles):
            raise ValueError(f"expected ({batch}, {self.num_styles}) style weights, got shape {tuple(style.shape)}")
        if not capturing_graph():
            total = weights.sum(dim=1)
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool((total > 0).all()):
                raise ValueError("style weights must be finite, >= 0 and not all 0")
        return weights / weights.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def for_style(self, style: torch.Tensor | int) -> TransformerNet:
        """The one-style network that computes this network's output for ``style`` (an index, or (num_styles,)
        weights, normalised): every ConditionalInstanceNorm becomes an InstanceNorm holding gamma, beta of that
        style or mix. A copy, on the same device, in the same mode; a one-style network is copied as it is."""
        net = copy.deepcopy(self)
        if self.num_styles == 1:
            return net
        device = next(self.parameters()).device
        mix = self.style_mix(torch.as_tensor(style, device=device), 1, device)[0]
        _replace_norms(net, lambda norm: norm.single_style(mix))
        net.num_styles = 1
        net._config.pop("num_styles")
        return net

    @torch.no_grad()
    def with_added_style(self, style_net: TransformerNet) -> TransformerNet:
        """A network holding this network's styles plus one more: ``style_net``'s (gamma, beta), taken from its
        norms. ``style_net`` must be a one-style network with the same convolutions (trained with them frozen:
        training/add_style.py); ValueError otherwise. The existing styles' rows are copied unchanged."""
        base = {key: value for key, value in self.config().items() if key != "num_styles"}
        if style_net.config() != base:
            raise ValueError(f"the new style's network {style_net.config()} differs from this one's {base}")
        own, new = self.state_dict(), style_net.state_dict()
        norm_keys = {f"{name}.{p}" for name, m in self.named_modules() if _is_norm(m) for p in ("weight", "bias")}
        changed = [k for k in own if k not in norm_keys and not torch.equal(own[k].cpu(), new[k].cpu())]
        if changed:
            raise ValueError(f"the new style's network changed shared weights ({changed[0]}, ...): train it frozen")
        merged = {}
        for key, value in own.items():
            if key in norm_keys:
                rows = value if value.dim() == 2 else value[None]
                merged[key] = torch.cat([rows, new[key].to(value)[None]])
            else:
                merged[key] = value
        net = TransformerNet(**{**self.config(), "num_styles": self.num_styles + 1})
        net.load_state_dict(merged)
        return net.to(next(self.parameters()).device).train(self.training)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, ConditionalInstanceNorm) or (isinstance(module, InstanceNorm) and module.affine)


def _replace_norms(module: nn.Module, make: Any) -> None:
    """Replace, in place, every ConditionalInstanceNorm below ``module`` by ``make(norm)``."""
    for name, child in module.named_children():
        if isinstance(child, ConditionalInstanceNorm):
            setattr(module, name, make(child))
        else:
            _replace_norms(child, make)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (N, C, H, W) at the bottom and right up to sides that are multiples of ``multiple`` (and >= 2 * multiple).

    Reflection padding where the image is large enough to reflect (PyTorch needs pad < side), otherwise
    replication (tiny inputs). The minimum of 2 * multiple keeps every reflection pad inside the network valid
    (the 3x3 convs after two stride-2 convs need at least 2 pixels to reflect 1).
    """
    height, width = x.shape[-2:]
    target_h = max(-(-height // multiple) * multiple, 2 * multiple)
    target_w = max(-(-width // multiple) * multiple, 2 * multiple)
    pad_h, pad_w = target_h - height, target_w - width
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
