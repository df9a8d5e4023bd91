"""Image files in and out: the one owner of pixel range, EXIF orientation, color modes and resampling.

Every image crosses a module boundary as a float32 RGB tensor in [0, 1] (docs/architecture.md, "Images"). This
module converts between files, PIL images and such tensors; values are clamped only when an image is written.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import FaststyleError
from core.fileio import atomic_write

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".apng",
    ".webp",
    ".bmp",
    ".dib",
    ".gif",
    ".tif",
    ".tiff",
    ".avif",
    ".heic",
    ".heif",
    ".jp2",
    ".j2k",
    ".jpx",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".tga",
    ".qoi",
)
"""Lower-case extensions (with the dot) of the photo formats faststyle reads, in folders as one by one. Formats
that can run external programs when opened (EPS/PS run Ghostscript) are left out on purpose. HEIC/HEIF decode when
the optional ``pillow-heif`` package is installed; without it such a file fails with a line saying so."""

WRITE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
"""Output extensions and their PIL format."""
OUTPUT_FORMATS = {ext.lstrip("."): {"JPEG": ".jpg", "TIFF": ".tif"}.get(fmt, ext) for ext, fmt in WRITE_FORMATS.items()}
"""stylize's ``format=`` values and the extension each writes (derived from WRITE_FORMATS)."""
ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")
"""Formats that can hold an alpha channel."""

MAX_DECODE_PIXELS = 50_000_000
"""Largest image (after JPEG draft reduction) that training decodes at full size: 50 MP is 150 MB of RGB. Larger
photos are reduced while decoding when they are JPEGs; other formats that large are refused with a clear line."""

try:  # HEIC/HEIF photos (iPhone) open through Pillow once pillow-heif registers its plugin; it is optional.
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:
    HEIF_SUPPORTED = False

# Resampling filters (Pillow removed Image.ANTIALIAS; Image.Resampling is the supported spelling).
DOWNSCALE_FILTER = Image.Resampling.LANCZOS
UPSCALE_FILTER = Image.Resampling.BICUBIC


@functools.cache
def read_formats() -> tuple[str, ...]:
    """The Pillow formats faststyle decodes: those of IMAGE_EXTENSIONS (as this Pillow and its plugins register
    them), plus MPO where Pillow opens it on its own (the multi-picture JPEG of many cameras). Files are identified
    by their content, so without this list a file of any of Pillow's formats would be decoded whatever its name: an
    icon, or an EPS file, which runs Ghostscript."""
    registered = Image.registered_extensions()  # loads every plugin, once
    formats = dict.fromkeys([*(registered[ext] for ext in IMAGE_EXTENSIONS if ext in registered), "MPO"])
    return tuple(fmt for fmt in formats if fmt in Image.OPEN)  # Image.open fails on a format it cannot open


def _format_names() -> str:
    return ", ".join(fmt for fmt in read_formats() if fmt not in ("MPO", "DIB"))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _png_without_text(path: Path) -> io.BytesIO | None:
    """The PNG file at ``path`` in memory with its text chunks (metadata: comments, XMP) left out, or None when it is
    not a well-formed PNG. Pillow refuses a text chunk over 1 MB (a guard against zip bombs in metadata) and the
    whole image with it; the pixels are in other chunks and do not need the text."""
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        return None
    kept, pos = [data[:8]], 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return None
        if data[pos + 4 : pos + 8] not in _PNG_TEXT_CHUNKS:
            kept.append(data[pos:end])
        pos = end
    return io.BytesIO(b"".join(kept))


def _is_png_text_limit(err: BaseException) -> bool:
    """Pillow's refusal of oversized PNG text chunks (PngImagePlugin.MAX_TEXT_CHUNK / MAX_TEXT_MEMORY)."""
    return isinstance(err, ValueError) and ("MAX_TEXT_CHUNK" in str(err) or "MAX_TEXT_MEMORY" in str(err))


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has an image extension (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def walk_images(
    root: str | os.PathLike, recursive: bool = True, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files in folder ``root`` (and its sub-folders when ``recursive``), sorted by relative path, and the
    entries that look like images but cannot be read as files, with the reason (a broken link, a folder named
    ``x.jpg``, a device file). ``extensions``: the lower-case extensions taken (stylize adds the video ones).

    Hidden files and folders (names starting with ".", e.g. macOS ``._x.jpg`` resource forks) are left out, as are
    files without an image extension. Symbolic links to folders are followed once (a link loop is not walked
    twice); links to files are followed.
    """
    root = Path(root)
    found: list[tuple[str, Path]] = []
    skipped: list[tuple[Path, str]] = []
    seen_dirs: set[str] = set()

    def visit(folder: Path) -> None:
        real = os.path.realpath(folder)
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        subfolders = []
        try:
            # scandir's entries know their type from the directory listing: no stat per file in a large dataset.
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            skipped.append((folder, f"a folder that cannot be read ({err.strerror or err})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow links
            except OSError:  # a link loop (ELOOP)
                is_dir = is_file = False
            wanted = Path(entry.name).suffix.lower() in extensions
            if is_dir:
                if wanted:
                    skipped.append((path, "a folder, not an image file"))
                subfolders.append(path)
            elif not wanted:
                continue
            elif is_file:
                found.append((path.relative_to(root).as_posix(), path))
            elif entry.is_symlink() and not os.path.exists(path):
                skipped.append((path, "a broken symbolic link"))
            else:
                skipped.append((path, "not a regular file"))
        if recursive:
            for subfolder in subfolders:
                visit(subfolder)

    visit(root)
    found.sort(key=lambda item: item[0])
    return [path for _, path in found], sorted(skipped)


def has_alpha(img: Image.Image) -> bool:
    """Whether an opened image (header read, pixels not needed) has an alpha channel or a transparent palette entry."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def file_has_alpha(path: str | os.PathLike) -> bool:
    """Whether the image file has an alpha channel, from its header only (False if it cannot be read)."""
    try:
        with Image.open(path, formats=read_formats()) as img:
            return has_alpha(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


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
    if keep_alpha and has_alpha(img):
        return img.convert("RGBA")
    return img.convert("RGB")


def open_draft(opened: Image.Image, min_short_side: int | None) -> None:
    """Ask libjpeg to decode ``opened`` at 1/2, 1/4 or 1/8 scale when that still leaves its short side at least
    ``min_short_side`` pixels (``Image.draft``; a no-op for other formats and for ``None``).

    Pillow's JPEG draft() reduces by the largest of 8, 4, 2 that is at most min(width // w, height // h) for a
    request (w, h); asking for a square of min_short_side makes that short // min_short_side, so the decoded short
    side stays >= min_short_side. (An aspect-preserving request would lose a factor of two whenever the long
    side's floor division rounds down further than the short side's.)
    """
    if min_short_side is not None and opened.format == "JPEG" and min(opened.size) >= 2 * min_short_side:
        opened.draft("RGB", (min_short_side, min_short_side))


def check_decode_size(opened: Image.Image, max_pixels: int | None, path: str | os.PathLike) -> None:
    """Refuse to decode an image whose header claims more than ``max_pixels`` pixels (after any draft reduction):
    a 100-byte PNG can declare 12000 x 12000 pixels, and decoding it would take gigabytes."""
    width, height = opened.size
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{width}x{height} pixels ({width * height / 1e6:.0f} MP) is more than the "
            f"{max_pixels / 1e6:.0f} MP decoded for training: shrink {Path(path).name} first, "
            "e.g. with scripts/prepare_dataset.py"
        )


def load_image(
    path: str | os.PathLike,
    mode: str = "RGB",
    min_short_side: int | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Read an image file, apply its EXIF orientation and return it in ``mode`` ("RGB", or "RGBA" to keep alpha).

    With ``mode="RGBA"`` an image without alpha comes back as RGB: check ``img.mode`` to know whether it has alpha.
    ``min_short_side``: a large JPEG may be decoded at a reduced scale that keeps at least this short side
    (:func:`open_draft`); ``max_pixels``: refuse images larger than this before decoding them
    (:func:`check_decode_size`). A missing, unreadable, corrupt or too large file raises FaststyleError naming it.
    """
    if mode not in ("RGB", "RGBA"):
        raise ValueError(f"mode must be 'RGB' or 'RGBA', got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise FaststyleError(f"{path} is a folder, not an image file: give the path of one image")
    if not path.is_file():
        raise FaststyleError(f"image not found: {path} (check the path)")
    try:
        try:
            return _decode(path, mode, min_short_side, max_pixels)
        except ValueError as err:
            stripped = _png_without_text(path) if _is_png_text_limit(err) else None
            if stripped is None:
                raise
            return _decode(stripped, mode, min_short_side, max_pixels, name=path)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        hint = "is it a valid image file?"
        if isinstance(err, Image.DecompressionBombError):
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
            hint = f"Pillow refuses over {limit:.0f} megapixels, a guard against decompression bombs: downscale it"
        elif path.suffix.lower() in (".heic", ".heif") and not HEIF_SUPPORTED:
            hint = "HEIC/HEIF needs the optional package pillow-heif: pip install pillow-heif"
        elif isinstance(err, UnidentifiedImageError):
            kind = Image.registered_extensions().get(path.suffix.lower())
            if kind is not None and kind not in read_formats():
                message = f"{kind} files are not read: faststyle reads {_format_names()} (convert it to PNG or JPEG)"
                raise FaststyleError(f"cannot read image {path}: {message}") from err
            hint = f"is it a valid image file? faststyle reads {_format_names()}"
        message = " ".join(str(err).split()) or type(err).__name__
        raise FaststyleError(f"cannot read image {path}: {message} ({hint})") from err


def _decode(
    source: Path | io.BytesIO, mode: str, min_short_side: int | None, max_pixels: int | None, name: Path | None = None
) -> Image.Image:
    """load_image's decoding of a file or an in-memory copy of it (``name``: the file, for messages)."""
    with Image.open(source, formats=read_formats()) as opened:  # leaving the block closes the file
        open_draft(opened, min_short_side)
        check_decode_size(opened, max_pixels, name or source)
        opened.load()  # decode now, so truncated files fail here and not later
        # In place and without the no-op conversion: each full-size copy of a 12000 x 12000 photo is 576 MB
        # (Pillow holds RGB as 4 bytes per pixel). A rotation still needs the old and the new pixels briefly.
        ImageOps.exif_transpose(opened, in_place=True)
        if opened.mode == "RGB" or (mode == "RGBA" and opened.mode == "RGBA"):
            return opened
        return to_rgb(opened, keep_alpha=(mode == "RGBA"))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float32 tensor in [0, 1]."""
    if img.mode != "RGB":
        img = to_rgb(img)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).float().div_(255.0)


def image_rows(img: Image.Image, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of an RGB or RGBA PIL image as an (hi - lo, W, 3 or 4) uint8 tensor (a copy of those rows
    only: a strip of a huge image is read without converting the whole image)."""
    if img.mode not in ("RGB", "RGBA"):
        raise ValueError(f"expected an RGB or RGBA image, got mode {img.mode}")
    channels = len(img.mode)
    if hi <= lo:
        return torch.empty((0, img.width, channels), dtype=torch.uint8)
    data = bytearray(img.crop((0, lo, img.width, hi)).tobytes())  # writable, so torch may share it
    return torch.frombuffer(data, dtype=torch.uint8).view(hi - lo, img.width, channels)


def rows_to_tensor(rows: torch.Tensor) -> torch.Tensor:
    """(h, W, C >= 3) uint8 rows (from image_rows) -> (3, h, W) float32 in [0, 1], exactly as pil_to_tensor
    converts those pixels (channels beyond the third, e.g. alpha, are dropped)."""
    return rows[..., :3].permute(2, 0, 1).float().div_(255.0)


def to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    """Float values in [0, 1] (any shape) -> uint8 0..255: clamped to [0, 1], scaled by 255 and rounded (half to
    even), the one rounding rule for every image faststyle writes."""
    return tensor.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def paste_rows(img: Image.Image, lo: int, rows: torch.Tensor) -> None:
    """Write (h, W, C) uint8 ``rows`` into ``img`` (mode RGB for C = 3, RGBA for C = 4) at rows [lo, lo + h)."""
    height, width, channels = rows.shape
    if width != img.width or channels != len(img.mode):
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not fit a {img.mode} image {img.width} wide")
    strip = Image.frombuffer(img.mode, (width, height), rows.contiguous().numpy(), "raw", img.mode, 0, 1)
    img.paste(strip, (0, lo))


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) (or (1, 3, H, W)) float tensor in [0, 1] -> PIL RGB image; values are clamped to [0, 1] here."""
    if tensor.dim() == 4:
        if tensor.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of shape {tuple(tensor.shape)}")
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = to_uint8(tensor).permute(1, 2, 0).cpu()
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
    elif fmt == "TIFF":
        options["compression"] = "tiff_lzw"  # lossless, and read by every TIFF reader
    atomic_write(path, lambda handle: img.save(handle, format=fmt, **options))
