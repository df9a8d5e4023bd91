"""data/io.py: modes -> RGB, EXIF orientation, 16-bit scaling, tensor round trip, atomic save, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import FaststyleError
from data.io import (
    is_image_file,
    load_image,
    pil_to_tensor,
    resize_max_side,
    resize_short_side,
    save_image,
    tensor_to_pil,
)


def _gradient(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "RGBA", "I", "F"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    path = tmp_path / ("img.tif" if mode in ("I", "F") else "img.png")
    if mode == "CMYK":
        path = tmp_path / "img.jpg"
    _gradient().convert(mode).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    loaded = np.asarray(load_image(tmp_path / "deep.png"))[..., 0].astype(np.float64)
    expected = values / 257.0
    assert np.abs(loaded - expected).max() <= 0.5 + 1e-6  # rounded, full range, not saturated at 255


def test_exif_orientation_is_applied(tmp_path):
    img = _gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (30, 40)


def test_alpha_kept_on_request(tmp_path):
    _gradient().convert("RGBA").save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", mode="RGBA").mode == "RGBA"
    assert load_image(tmp_path / "a.png").mode == "RGB"
    _gradient().save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png", mode="RGBA").mode == "RGB"  # nothing to keep


def test_corrupt_and_missing_files_give_one_line_errors(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(FaststyleError, match="bad.jpg") as info:
        load_image(tmp_path / "bad.jpg")
    assert "\n" not in str(info.value)
    good = tmp_path / "trunc.jpg"
    _gradient(200, 200).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(FaststyleError, match="trunc.jpg"):
        load_image(good)
    with pytest.raises(FaststyleError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_tensor_round_trip_is_exact_for_8_bit():
    img = _gradient()
    tensor = pil_to_tensor(img)
    assert tensor.shape == (3, 30, 40) and tensor.dtype == torch.float32
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), np.asarray(img))


def test_tensor_to_pil_clamps_out_of_range():
    out = np.asarray(tensor_to_pil(torch.tensor([-1.0, 0.5, 2.0]).view(3, 1, 1).expand(3, 2, 2)))
    assert out[0, 0].tolist() == [0, 128, 255]


def test_resizes_keep_aspect_and_direction():
    img = _gradient(400, 300)
    assert resize_max_side(img, 200).size == (200, 150)
    assert resize_max_side(img, 1000).size == (400, 300)  # never upscales
    assert resize_short_side(img, 600).size == (800, 600)
    assert resize_short_side(img, 60).size == (80, 60)


def test_save_is_atomic_and_format_checked(tmp_path):
    target = tmp_path / "out.jpg"
    save_image(pil_to_tensor(_gradient()), target, quality=90)
    assert Image.open(target).format == "JPEG"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jpg"]  # no temp file left behind
    with pytest.raises(FaststyleError, match="extension"):
        save_image(_gradient(), tmp_path / "out.gif")
    with pytest.raises(FaststyleError, match="alpha"):
        save_image(_gradient().convert("RGBA"), tmp_path / "alpha.jpg")
    save_image(_gradient().convert("RGBA"), tmp_path / "alpha.png")
    assert Image.open(tmp_path / "alpha.png").mode == "RGBA"


def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    save_image(_gradient(), target)
    before = target.read_bytes()

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_image(_gradient(10, 10), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_is_image_file_any_case():
    assert is_image_file("a/B.JPG") and is_image_file("x.WebP") and not is_image_file("notes.txt")


def test_saved_images_get_normal_permissions(tmp_path):
    import os

    save_image(_gradient(), tmp_path / "perm.png")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "perm.png").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_image_over_pillows_pixel_limit_says_what_to_do(tmp_path):
    """A PNG whose header claims more pixels than Pillow's decompression-bomb guard allows (twice MAX_IMAGE_PIXELS):
    one line naming the limit and the fix, not 'is it a valid image file?'."""
    import struct
    import zlib

    from PIL import Image

    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # Pillow refuses at open, from the header: the (empty) pixel data is never read
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(FaststyleError, match=r"huge.png: .*refuses over 179 megapixels.*downscale it"):
        load_image(tmp_path / "huge.png")
