"""One picture of what a multi-style model does to a photo: the photo in every style, and a blend between two styles.

    python -m scripts.style_grid outputs/train/<date>/<time>-multi/model.pth photo.jpg
    python scripts/style_grid.py model.pth photo.jpg -o grid.jpg --between hokusai_great_wave 2 --steps 7
    python -m scripts.style_grid model.pth photo.jpg --max-side 256 --device cpu

Row 1: the photo, then the photo in each of the model's styles, each tile labelled with the style's name. Row 2: an
interpolation strip from style A to style B (``--between A B``, default the first two styles) in ``--steps`` tiles,
B's weight going 0, 1/(K-1), ..., 1; each tile is labelled with its mix as stylize's ``style=`` takes it
(``a:0.75,b:0.25``), so any tile can be reproduced at full size. A and B are anything ``style=`` accepts: a name, an
index or a mix. Every tile is the network of that style or mix (``TransformerNet.for_style``, what stylize runs) in
fp32 on the photo downscaled so its long side is at most ``--max-side`` pixels (never enlarged).

The picture is written (atomically; PNG, or JPEG, WebP, ... by the extension) to ``-o``, by default
``<model dir>/<photo stem>_style_grid.png``; an earlier grid of that name is replaced, the model and the photo never.
A one-style model has nothing to grid: use ``python stylize.py model=... input=...``.

Run by path (``python scripts/style_grid.py``), the packages import because ``make test`` installs faststyle
editable into .venv; ``python -m scripts.style_grid`` from the repository root works without that.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_STEPS = 5
DEFAULT_MAX_SIDE = 384
MIN_MAX_SIDE = 32
MAX_STEPS = 64  # a typo such as --steps 500 would otherwise make a picture 200 000 pixels wide
MAX_CAPTION_LINES = 3
MIN_FONT_PX = 11  # PIL's default font stays legible down to about this size
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (34, 34, 34)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a multi-style model.pth (TransformerNet with num_styles > 1)")
    parser.add_argument("photo", type=Path, help="the photo to stylize")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="picture to write (default: <model dir>/<photo stem>_style_grid.png)",
    )
    parser.add_argument(
        "--between",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="the strip's two ends: style names, indices or mixes (default: the first two styles)",
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"tiles in the strip (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        metavar="PX",
        help=f"tiles' long side in pixels (default {DEFAULT_MAX_SIDE}; a smaller photo keeps its size)",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the network runs")
    args = parser.parse_args(argv)
    if not 2 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must be between 2 and {MAX_STEPS}, got {args.steps}")
    if args.max_side < MIN_MAX_SIDE:
        parser.error(f"--max-side must be at least {MIN_MAX_SIDE} pixels, got {args.max_side}")
    return args


# --------------------------------------------------------------------------------------------------------------------
# What goes in the tiles


def default_output(model: Path, photo: Path) -> Path:
    """``<model dir>/<photo stem>_style_grid.png``: beside the model, whose folder is the run's own."""
    return model.parent / f"{photo.stem}_style_grid.png"


def mix_label(weights: tuple[float, ...], shown: list[int], names: list[str]) -> str:
    """A mix as stylize's ``style=`` takes it (``a:0.75,b:0.25``), listing the styles ``shown`` (zeros included)."""
    return ",".join(f"{names[i]}:{round(weights[i], 2):g}" for i in shown)


def strip_mixes(start: tuple[float, ...], end: tuple[float, ...], steps: int) -> list[tuple[float, ...]]:
    """``steps`` mixes from ``start`` to ``end``: (1 - t) * start + t * end for t = 0, 1/(steps - 1), ..., 1. At
    t = 0 and 1 this is ``start`` and ``end`` exactly in floating point (x * 1 + y * 0 = x), so the strip's ends are
    the same networks, and pixels, as those styles alone."""
    ts = [step / (steps - 1) for step in range(steps)]
    return [tuple((1 - t) * a + t * b for a, b in zip(start, end, strict=True)) for t in ts]


def strip_labels(mixes: list[tuple[float, ...]], start: tuple[float, ...], end: tuple[float, ...], names: list[str]):
    """Each strip mix's label, naming every style either end uses (A's first), so the weight of both ends shows."""
    used = [i for i, w in enumerate(start) if w > 0]
    used += [i for i, w in enumerate(end) if w > 0 and i not in used]
    return [mix_label(mix, used, names) for mix in mixes]


# --------------------------------------------------------------------------------------------------------------------
# Layout and drawing


@dataclass(frozen=True)
class GridLayout:
    """Where the tiles go: rows of equal tiles, each with a caption band under it, each row centred, ``gap`` pixels
    between tiles and around the picture."""

    tile_width: int
    tile_height: int
    caption_height: int
    gap: int
    row_lengths: tuple[int, ...]

    @property
    def columns(self) -> int:
        return max(self.row_lengths)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole picture."""
        rows = len(self.row_lengths)
        return (
            self.gap + self.columns * (self.tile_width + self.gap),
            self.gap + rows * (self.tile_height + self.caption_height + self.gap),
        )

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a tile, without its caption."""
        step = self.tile_width + self.gap
        left = self.gap + (self.columns - self.row_lengths[row]) * step // 2 + column * step
        top = self.gap + row * (self.tile_height + self.caption_height + self.gap)
        return left, top, left + self.tile_width, top + self.tile_height


def font_size_for(tile_width: int) -> int:
    """Caption font size: about 16 pixels on a 384-pixel tile, never below MIN_FONT_PX."""
    return max(MIN_FONT_PX, round(tile_width / 24))


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` pixels (Pillow >= 10.1 with FreeType); older Pillow gives its fixed bitmap
    font, which is small but legible."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0: load_default takes no size
        return ImageFont.load_default()


def _split_after(text: str, breaks: str) -> list[str]:
    """``text`` cut after each character of ``breaks`` (kept at the end of its piece)."""
    pieces, piece = [], ""
    for char in text:
        piece += char
        if char in breaks:
            pieces.append(piece)
            piece = ""
    return [*pieces, piece] if piece else pieces


def wrap_caption(text: str, font, width: int) -> list[str]:
    """``text`` in at most MAX_CAPTION_LINES lines no wider than ``width``. Lines break after a "," (a mix's styles,
    whole where they fit) and only inside a style name that is wider than a line by itself, after a "_"; what still
    does not fit ends in "..."."""
    lines: list[str] = []
    for segment in _split_after(text, ","):
        whole = font.getlength(segment) <= width
        for i, piece in enumerate([segment] if whole else _split_after(segment, "_ ")):
            # a name broken over lines starts on a line of its own, so no line holds the ends of two names
            joins = lines and (whole or i > 0) and font.getlength(lines[-1] + piece) <= width
            if joins:
                lines[-1] += piece
            else:
                lines.append(piece)
    if len(lines) > MAX_CAPTION_LINES:
        lines = [*lines[: MAX_CAPTION_LINES - 1], "".join(lines[MAX_CAPTION_LINES - 1 :])]
    return [_shorten(line, font, width) for line in lines]


def _shorten(line: str, font, width: int) -> str:
    """``line`` cut to fit ``width``, ending in "..." when it was cut."""
    if font.getlength(line) <= width:
        return line
    while len(line) > 1 and font.getlength(line + "...") > width:
        line = line[:-1]
    return line + "..."


def line_height(font) -> int:
    """Pixels from one caption line to the next: the font's tallest letters and descenders plus a little air."""
    top, bottom = font.getbbox("Ag|j_")[1::2]
    return bottom - min(top, 0) + max(2, (bottom - top) // 4)


def draw_grid(rows: list[list[tuple[Image.Image, str]]]) -> tuple[Image.Image, GridLayout]:
    """The picture of ``rows`` of (tile, caption); every tile has the same size. Returns it and its layout."""
    from PIL import Image, ImageDraw

    width, height = rows[0][0][0].size
    font = load_font(font_size_for(width))
    pad = max(3, font_size_for(width) // 3)
    captions = [[wrap_caption(text, font, width - 2) for _, text in row] for row in rows]
    lines = max(len(lines) for row in captions for lines in row)
    layout = GridLayout(
        tile_width=width,
        tile_height=height,
        caption_height=pad + lines * line_height(font),
        gap=max(4, width // 48),
        row_lengths=tuple(len(row) for row in rows),
    )
    picture = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for r, (row, row_captions) in enumerate(zip(rows, captions, strict=True)):
        for c, ((tile, _), caption) in enumerate(zip(row, row_captions, strict=True)):
            if tile.size != (width, height):
                raise ValueError(f"tile {r},{c} is {tile.size}, the others {(width, height)}")
            left, top, right, bottom = layout.box(r, c)
            picture.paste(tile, (left, top))
            y = bottom + pad
            for line in caption:
                x = left + (width - font.getlength(line)) / 2
                draw.text((x, y), line, fill=TEXT_COLOUR, font=font)
                y += line_height(font)
    return picture, layout


# --------------------------------------------------------------------------------------------------------------------
# Running it


def stylize_tiles(net, photo: torch.Tensor, mixes: list[tuple[float, ...]], device: torch.device) -> list[Image.Image]:
    """``photo`` (3, H, W) through ``net.for_style(mix)`` for each mix, in fp32: the same one-style network stylize
    runs for that style or mix. Returns 8-bit images, rounded as every image faststyle writes."""
    import torch

    from data.io import tensor_to_pil

    net = net.float().to(device).eval()
    x = photo.unsqueeze(0).to(device)
    tiles = []
    with torch.inference_mode():
        for mix in mixes:
            out = net.for_style(torch.tensor(mix, dtype=torch.float32))(x)
            tiles.append(tensor_to_pil(out[0].cpu()))
    return tiles


def make_grid(
    model: Path,
    photo: Path,
    output: Path | None = None,
    between: list[str] | None = None,
    steps: int = DEFAULT_STEPS,
    max_side: int = DEFAULT_MAX_SIDE,
    device: str = "auto",
) -> tuple[Path, GridLayout]:
    """Write the style grid of ``model`` on ``photo`` (module docstring) and return where, and its layout."""
    from core.cli import absolute_user_path
    from core.device import resolve_device
    from core.errors import FaststyleError
    from core.fileio import refuse_output_among_inputs
    from data.io import WRITE_FORMATS, load_image, pil_to_tensor, resize_max_side, save_image
    from interop.read import read_torch_model_file as load_any_model
    from models.styles import all_styles, parse_style, style_names

    model, photo = absolute_user_path(model), absolute_user_path(photo)
    output = absolute_user_path(output) if output is not None else default_output(model, photo)
    refuse_output_among_inputs(output, {"model": model, "photo": photo}, "-o")
    if output.is_dir():
        raise FaststyleError(f"output {output} is a folder: give a file name, e.g. {output / 'style_grid.png'}")
    if output.suffix.lower() not in WRITE_FORMATS:
        raise FaststyleError(f"cannot write {output.name}: use one of the extensions {', '.join(WRITE_FORMATS)}")
    torch_device = resolve_device(device)

    net, meta = load_any_model(model, device="cpu")
    if net.num_styles < 2:
        raise FaststyleError(
            f"{model.name} holds one style, so there is nothing to grid: "
            f"stylize the photo with python stylize.py model={model} input={photo}"
        )
    names = style_names(meta, net.num_styles)
    start, end = (parse_style(spec, names) for spec in (between or ["0", "1"]))
    if start.weights == end.weights:
        raise FaststyleError(f"--between {start.label} {end.label}: the strip needs two different styles or mixes")

    image = resize_max_side(load_image(photo), max_side)
    styles = all_styles(names)
    mixes = strip_mixes(start.weights, end.weights, steps)
    tiles = stylize_tiles(net, pil_to_tensor(image), [choice.weights for choice in styles] + mixes, torch_device)
    row1 = [(image, photo.name)] + [
        (tile, choice.label) for tile, choice in zip(tiles[: len(styles)], styles, strict=True)
    ]
    row2 = list(zip(tiles[len(styles) :], strip_labels(mixes, start.weights, end.weights, names), strict=True))
    picture, layout = draw_grid([row1, row2])
    save_image(picture, output)
    return output, layout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if __package__ in (None, ""):  # run by path: --help above works even where the packages do not import
        _require_packages()
    from core.errors import FaststyleError, exit_with_error

    try:
        output, layout = make_grid(
            args.model, args.photo, args.output, args.between, args.steps, args.max_side, args.device
        )
    except FaststyleError as err:
        exit_with_error(err)
    width, height = layout.size
    print(
        f"wrote {output} ({width}x{height}: the photo and {layout.row_lengths[0] - 1} styles, {args.steps}-step strip)"
    )
    return 0


def _require_packages() -> None:
    """Run by path, Python puts scripts/ (not the repository root) first on sys.path, so faststyle's packages import
    only where faststyle is installed (``make test`` installs it editable into .venv); say so instead of a
    traceback. (No sys.path edit here: tests/test_layout.py keeps every script free of them.)"""
    if importlib.util.find_spec("core") is None or importlib.util.find_spec("models") is None:
        print(
            f"error: faststyle's packages are not importable from this Python ({sys.executable}): run make test once "
            f"in {REPO_ROOT} and use .venv/bin/python, or run python -m scripts.style_grid from {REPO_ROOT}",
            file=sys.stderr,
        )
        raise SystemExit(2)


if __name__ == "__main__":
    raise SystemExit(main())
