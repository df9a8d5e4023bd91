"""Image files in and out: the one owner of pixel range, EXIF orientation, colour modes and resampling.

Every image crosses a module boundary as a float32 RGB tensor in [0, 1] (DESIGN.md). This module converts between
files, PIL images and such tensors; values are clamped only when an image is written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import FaststyleError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""Lower-case extensions (with the dot) that faststyle reads as images."""

WRITE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}
ALPHA_FORMATS = ("PNG", "WEBP")
"""Formats that can hold an alpha channel."""

# Resampling filters (Pillow removed Image.ANTIALIAS; Image.Resampling is the supported spelling).
DOWNSCALE_FILTER = Image.Resampling.LANCZOS
UPSCALE_FILTER = Image.Resampling.BICUBIC


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has an image extension (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image, keep_alpha: bool = False) -> Image.Image:
    """Convert any PIL mode (L, LA, P, CMYK, I;16, I, F, RGBA, ...) to RGB, or RGBA when ``keep_alpha``.

    16-bit and 32-bit integer greyscale ("I;16", "I") are scaled to 8 bits by their real range (PIL's own convert
    clips them at 255, which turns most 16-bit photos white).
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit samples: /257 maps 0..65535 onto 0..255 exactly at both ends; +0.5 rounds instead of truncating.
        img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if keep_alpha and has_alpha:
        return img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Read an image file, apply its EXIF orientation and return it in ``mode`` ("RGB", or "RGBA" to keep alpha).

    With ``mode="RGBA"`` an image without alpha comes back as RGB: check ``img.mode`` to know whether it has alpha.
    A missing, unreadable or corrupt file raises FaststyleError naming the file.
    """
    if mode not in ("RGB", "RGBA"):
        raise ValueError(f"mode must be 'RGB' or 'RGBA', got {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise FaststyleError(f"image not found: {path} (check the path)")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so truncated files fail here and not later
            img = ImageOps.exif_transpose(opened) or opened
            return to_rgb(img, keep_alpha=(mode == "RGBA"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise FaststyleError(f"cannot read image {path}: {err} (is it a valid image file?)") from err


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 tensor in [0, 1]."""
    if img.mode != "RGB":
        img = to_rgb(img)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) (or (1, 3, H, W)) float tensor in [0, 1] -> PIL RGB image; values are clamped to [0, 1] here."""
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of shape {tuple(tensor.shape)}")
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = tensor.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu()
    return Image.fromarray(array.contiguous().numpy(), mode="RGB")


def resize_to(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to exactly (width, height) with the right filter for the direction (Lanczos down, bicubic up)."""
    if (width, height) == img.size:
        return img
    shrinking = width * height < img.width * img.height
    return img.resize((width, height), DOWNSCALE_FILTER if shrinking else UPSCALE_FILTER)


def resize_max_side(img: Image.Image, max_side_px: int) -> Image.Image:
    """Downscale so that the longer side is at most ``max_side_px`` (never upscales); keeps the aspect ratio."""
    longest = max(img.size)
    if longest <= max_side_px:
        return img
    scale = max_side_px / longest
    return resize_to(img, max(1, round(img.width * scale)), max(1, round(img.height * scale)))


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (up or down) so that the shorter side is ``size`` pixels; keeps the aspect ratio."""
    short = min(img.size)
    scale = size / short
    return resize_to(img, max(size, round(img.width * scale)), max(size, round(img.height * scale)))


def save_image(image: Image.Image | torch.Tensor, path: str | os.PathLike, quality: int = 95) -> None:
    """Write ``image`` (PIL, or a (3, H, W) tensor in [0, 1]) to ``path``; the format comes from the extension.

    The file is written to a temporary name in the same folder and renamed, so a crash never leaves a half-written
    image and an existing file is replaced only by a complete one. RGBA images need a format that holds alpha.
    """
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FaststyleError(f"cannot write {path}: use one of the extensions {', '.join(WRITE_FORMATS)}")
    img = tensor_to_pil(image) if isinstance(image, torch.Tensor) else image
    if img.mode == "RGBA" and fmt not in ALPHA_FORMATS:
        raise FaststyleError(f"cannot keep the alpha channel in {path.name}: write .png or .webp instead")
    options: dict = {}
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = int(quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            img.save(handle, format=fmt, **options)
        # mkstemp creates the file 0600; give the image the permissions any newly created file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
