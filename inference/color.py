"""Color handling after the network: luminance-only transfer (``preserve_color``) and blending (``strength``).

Pointwise in the content pixel, so the tiled executor applies it strip by strip and gets the same result.
"""

from __future__ import annotations

import torch

# Full-range YCbCr of ITU-R BT.601 (the JPEG/JFIF definition). Gatys et al. 2016 ("Preserving Color in Neural
# Artistic Style Transfer", arXiv:1606.05897) use YIQ; any luma/chroma split works the same way: take the stylized
# luminance, keep the photo's chroma.
_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float32
)
_YCBCR_TO_RGB = torch.linalg.inv(_RGB_TO_YCBCR)


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> (..., 3, H, W) Y in [0, 1], Cb and Cr in [-0.5, 0.5]."""
    return torch.einsum("ij,...jhw->...ihw", _RGB_TO_YCBCR.to(x), x)


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_ycbcr (not clamped)."""
    return torch.einsum("ij,...jhw->...ihw", _YCBCR_TO_RGB.to(x), x)


def preserve_colors(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Stylized luminance with the content's chroma: (..., 3, H, W) in [0, 1] each -> same shape, clamped."""
    y = rgb_to_ycbcr(stylized)[..., :1, :, :]
    chroma = rgb_to_ycbcr(content)[..., 1:, :, :]
    return ycbcr_to_rgb(torch.cat([y, chroma], dim=-3)).clamp(0.0, 1.0)


def finish_colors(stylized: torch.Tensor, content: torch.Tensor, preserve_color: bool, strength: float) -> torch.Tensor:
    """Apply color preservation, then blend with the content: ``strength * s + (1 - strength) * content``."""
    if preserve_color:
        stylized = preserve_colors(stylized, content)
    if strength >= 1.0:
        return stylized
    if strength <= 0.0:
        return content.clone()
    return torch.lerp(content, stylized, strength)
