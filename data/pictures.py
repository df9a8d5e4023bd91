"""Pictures for people: captioned grids of equal tiles (a style grid, a video report's frame strip). Shared by
scripts/style_grid.py and evaluation/, which may not import each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image, ImageFont

MAX_CAPTION_LINES = 3
MIN_FONT_PX = 11  # PIL's default font stays legible down to about this size
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (34, 34, 34)


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
                draw.text((x, y), line, fill=TEXT_COLOR, font=font)
                y += line_height(font)
    return picture, layout
