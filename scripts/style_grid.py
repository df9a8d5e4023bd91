"""One picture of what a multi-style model does to a photo: the photo in every style, and a blend between two styles.

    python -m scripts.style_grid outputs/train/<date>/<time>-multi/model.pth photo.jpg
    python scripts/style_grid.py model.pth photo.jpg -o grid.jpg --between hokusai_great_wave 2 --steps 7
    python -m scripts.style_grid model.pth photo.jpg --max-side 256 --device cpu

Row 1: the photo, then the photo in each of the model's styles, each tile labelled with the style's name. Row 2: an
interpolation strip from style A to style B (``--between A B``, default the first two styles) in ``--steps`` tiles,
B's weight going 0, 1/(K-1), ..., 1; each tile is labelled with its mix as stylize's ``style=`` takes it
(``a:0.75,b:0.25``), so any tile can be reproduced at full size. A and B are anything ``style=`` accepts: a name, an
index or a mix. Every tile is the network of that style or mix (inference.network: ``TransformerNet.for_style``,
what stylize runs) in fp32 on the photo downscaled so its long side is at most ``--max-side`` pixels (never
enlarged).

The picture is written (atomically; PNG, or JPEG, WebP, ... by the extension) to ``-o``, by default
``<model dir>/<photo stem>_style_grid.png``; an existing file is replaced only with ``--overwrite``, the model and
the photo never.
A one-style model has nothing to grid: use ``python stylize.py model=... input=...``.

Run by path (``python scripts/style_grid.py``), the packages import because ``make test`` installs faststyle
editable into .venv; ``python -m scripts.style_grid`` from the repository root works without that.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from data.pictures import GridLayout
    from inference.network import StyleNetwork
    from models.styles import StyleChoice

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_STEPS = 5
DEFAULT_MAX_SIDE = 384
MIN_MAX_SIDE = 32
MAX_STEPS = 64  # a typo such as --steps 500 would otherwise make a picture 200 000 pixels wide


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from core.cli import add_device_option, add_overwrite_option, tool_parser

    parser = tool_parser("python -m scripts.style_grid", __doc__)
    parser.add_argument("model", type=Path, help="a multi-style model.pth (TransformerNet with num_styles > 1)")
    parser.add_argument("photo", type=Path, help="the photo to stylize")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="picture to write (default: <model dir>/<photo stem>_style_grid.png)",
    )
    add_overwrite_option(parser)
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
    add_device_option(parser)
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
# Running it


def stylize_tiles(network: StyleNetwork, photo: torch.Tensor, choices: list[StyleChoice]) -> list[Image.Image]:
    """``photo`` (3, H, W) through ``network`` in each style or mix of ``choices``: the same one-style network
    stylize runs for that style or mix. Returns 8-bit images, rounded as every image faststyle writes."""
    from data.io import tensor_to_pil

    return [tensor_to_pil(network.with_style(choice)(photo.unsqueeze(0))[0]) for choice in choices]


def make_grid(
    model: Path,
    photo: Path,
    output: Path | None = None,
    between: list[str] | None = None,
    steps: int = DEFAULT_STEPS,
    max_side: int = DEFAULT_MAX_SIDE,
    device: str = "auto",
    overwrite: bool = False,
) -> tuple[Path, GridLayout]:
    """Write the style grid of ``model`` on ``photo`` (module docstring) and return where, and its layout."""
    from core.cli import absolute_user_path, check_output_file
    from core.errors import FaststyleError
    from data.io import WRITE_FORMATS, load_image, pil_to_tensor, resize_max_side, save_image
    from data.pictures import draw_grid
    from inference.network import load_style_model
    from models.styles import StyleChoice, all_styles, parse_style

    model, photo = absolute_user_path(model), absolute_user_path(photo)
    output = absolute_user_path(output) if output is not None else default_output(model, photo)
    check_output_file(output, {"model": model, "photo": photo}, overwrite, "-o", "style_grid.png", WRITE_FORMATS)

    style_model = load_style_model(model, device=device, precision="fp32")
    if style_model.num_styles < 2:
        raise FaststyleError(
            f"{model.name} holds one style, so there is nothing to grid: "
            f"stylize the photo with python stylize.py model={model} input={photo}"
        )
    network = style_model.network(0)
    names = network.style_names
    start, end = (parse_style(spec, names) for spec in (between or ["0", "1"]))
    if start.weights == end.weights:
        raise FaststyleError(f"--between {start.label} {end.label}: the strip needs two different styles or mixes")

    image = resize_max_side(load_image(photo), max_side)
    styles = all_styles(names)
    mixes = strip_mixes(start.weights, end.weights, steps)
    labels = strip_labels(mixes, start.weights, end.weights, names)
    strip = [StyleChoice(label, mix) for label, mix in zip(labels, mixes, strict=True)]
    tiles = stylize_tiles(network, pil_to_tensor(image), styles + strip)
    row1 = [(image, photo.name)] + [
        (tile, choice.label) for tile, choice in zip(tiles[: len(styles)], styles, strict=True)
    ]
    row2 = list(zip(tiles[len(styles) :], labels, strict=True))
    picture, layout = draw_grid([row1, row2])
    save_image(picture, output)
    return output, layout


def main(argv: list[str] | None = None) -> int:
    if __package__ in (None, ""):  # run by path: say how to make the packages importable instead of a traceback
        _require_packages()
    from core.cli import run_tool

    args = parse_args(argv)

    def work() -> None:
        output, layout = make_grid(
            args.model, args.photo, args.output, args.between, args.steps, args.max_side, args.device, args.overwrite
        )
        width, height = layout.size
        print(
            f"wrote {output} ({width}x{height}: the photo and {layout.row_lengths[0] - 1} styles, "
            f"{args.steps}-step strip)"
        )

    return run_tool(work)


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
