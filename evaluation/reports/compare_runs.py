"""Compare training runs on held-out photos: the runs of any multirun sweep (norm, style weight, width, seed, ...)
or any list of run dirs trained on one style.

    python train.py -m experiment=in_vs_bn model.norm=instance,batch      # both runs under one multirun dir
    python -m evaluation compare_runs multirun/in_vs_bn/<date>/<time>         # writes the report into that dir
    python -m evaluation compare_runs RUN_A RUN_B --out outputs/reports/ab  # or name the run dirs yourself

A run dir is a folder holding ``model.pth`` and Hydra's ``.hydra/config.yaml`` (plus ``tb/`` for the curves). Each
run is labelled by what differs between the runs' configs (``model.norm=batch``, ``loss.style_weight=2.0``, ...);
runs whose configs are identical are labelled by their folder. Written into the output directory (the one directory
given, else --out, else the run dirs' common parent):

- ``compare_figure.png``: one row per held-out content image; columns content | style | each run's stylization;
  plus one row per --figure-variant: the first held-out image as clip(a * x + b) (default a = 0.5, b = 0.25: half
  the contrast). A run whose network has batch norm gets two columns: BN in eval mode (running statistics, how it
  is deployed) and BN with per-image statistics (train-mode BN on the single image, on a copy of the network so the
  running statistics are not touched).
- ``compare_table.md`` and ``.csv``: content, style and total perceptual loss on the held-out images (each run's
  own loss and style target, built by ``training.run`` exactly as training built them), and the
  contrast-invariance measure: the mean absolute difference (RGB in [0, 1]) between the stylization of each
  image x and the stylizations of its variants clip(a * x + b, 0, 1). Ulyanov et al. 2016 argue that stylization
  should not depend on the content image's contrast; instance norm after the first convolution removes any a > 0
  and b exactly (up to eps and the clipping), batch norm with running statistics does not.
- ``compare_curves.png``: the training curves of every run (one panel per loss term, runs overlaid, smoothed line
  over the raw one), read back from their TensorBoard events.

Held-out images (--content, default ``data/samples/held_out``) must not be training images: every held-out file is
compared by content (size, then SHA-256) with the files under each run's ``data.root`` and the script refuses to
run on an overlap.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from core.cli import add_device_option, run_tool, tool_parser
from core.errors import FaststyleError
from core.fileio import atomic_write_text
from data.io import load_image
from evaluation.figures import make_curves, make_figure, save_figure
from evaluation.held_out import DEFAULT_HELD_OUT, held_out_images
from evaluation.measures import (
    DEFAULT_FIGURE_VARIANTS,
    DEFAULT_VARIANTS,
    Row,
    columns_for,
    contrast_variants,
    evaluate,
    input_change,
)
from evaluation.runs import default_out_dir, find_run_dirs, load_runs, read_scalars, shared_style

FIGURE_STEM = "compare_figure"
TABLE_MD_NAME = "compare_table.md"
TABLE_CSV_NAME = "compare_table.csv"
CURVES_NAME = "compare_curves.png"


def _variant_text(variants: Sequence[tuple[float, float]]) -> str:
    return ", ".join(f"({a:g}, {b:+g})" for a, b in variants)


def table_markdown(rows: Sequence[Row], variants: Sequence[tuple[float, float]], n_images: int, change: float) -> str:
    """The table as markdown, with a paragraph saying what each column measures."""
    lines = [
        f"Held-out images: {n_images}. Losses: mean over the held-out images of each run's own training loss "
        "(lower is better). Invariance: mean |stylize(clip(a*x+b)) - stylize(x)| in RGB [0, 1] over images and "
        f"{len(variants)} variants (a, b) = {_variant_text(variants)} "
        f"(0 = ignores contrast and brightness; the inputs themselves differ by {change:.4f}).",
        "",
        "| model | run | content loss | style loss | total loss | contrast invariance (MAD) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.model} | {row.run} | {row.losses['content']:.4g} | {row.losses['style']:.4g} | "
            f"{row.losses['total']:.4g} | {row.invariance:.4f} |"
        )
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[Row], variants: Sequence[tuple[float, float]]) -> str:
    """The table as CSV, with the invariance of each variant in a column of its own."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    variant_cols = [f"mad_a{a:g}_b{b:+g}" for a, b in variants]
    writer.writerow(
        [
            "model",
            "label",
            "mode",
            "run",
            "content_loss",
            "style_loss",
            "tv_loss",
            "total_loss",
            "invariance_mad",
            *variant_cols,
        ]
    )
    for row in rows:
        losses = [f"{row.losses[k]:.6g}" for k in ("content", "style", "tv", "total")]
        writer.writerow(
            [
                row.model,
                row.label,
                row.mode,
                row.run,
                *losses,
                f"{row.invariance:.6g}",
                *(f"{v:.6g}" for v in row.per_variant),
            ]
        )
    return buffer.getvalue()


def _title_width(cell_px: int) -> int:
    """Characters of a 9 pt title line that fit in a cell (about 6 px each at 100 dpi)."""
    return max(8, cell_px // 6)


def _figure_rows(
    images: Sequence[Tensor], figure_variants: Sequence[tuple[float, float]]
) -> tuple[list[Tensor], list[str | None]]:
    """The held-out images, then the first one's contrast/brightness variants (captioned), so the figure shows what
    the table's invariance column measures."""
    rows = list(images) + [contrast_variants(images[0], [v])[0] for v in figure_variants]
    captions: list[str | None] = [None] * len(images) + [f"{a:g}x{b:+g}" for a, b in figure_variants]
    return rows, captions


def output_paths(out: Path, figure_format: str = "png") -> dict[str, Path]:
    """Where the report's files go."""
    return {
        "figure": out / f"{FIGURE_STEM}.{figure_format}",
        "table_md": out / TABLE_MD_NAME,
        "table_csv": out / TABLE_CSV_NAME,
        "curves": out / CURVES_NAME,
    }


def compare(
    inputs: Sequence[str | os.PathLike],
    content: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    max_side_px: int = 256,
    max_images: int = 4,
    device: str = "auto",
    variants: Sequence[tuple[float, float]] = DEFAULT_VARIANTS,
    figure_variants: Sequence[tuple[float, float]] = DEFAULT_FIGURE_VARIANTS,
    cell_px: int = 192,
    figure_format: str = "png",
    max_panels: int = 4,
) -> dict[str, Path]:
    """Write the figure, the tables and the curves for the runs found in ``inputs``; return their paths."""
    from core.device import resolve_device

    torch_device = resolve_device(device)
    run_dirs = find_run_dirs(inputs)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs, [Path(p) for p in inputs])
    runs = load_runs(run_dirs, out, torch_device)
    style_file = shared_style(runs)
    held_out, images = held_out_images(content, runs, max_images, max_side_px, torch_device)
    columns = columns_for(runs)

    rows = evaluate(columns, images, variants, torch_device)
    figure_rows, captions = _figure_rows(images, figure_variants)
    width = _title_width(cell_px)
    figure = make_figure(
        figure_rows,
        load_image(style_file),
        [(c.title(width), c.stylize) for c in columns],
        cell_px=cell_px,
        captions=captions,
    )
    curves = make_curves([(r.label, read_scalars(r.path / "tb")) for r in runs], max_panels=max_panels)

    paths = output_paths(out, figure_format)
    save_figure(figure, paths["figure"])
    atomic_write_text(paths["table_md"], table_markdown(rows, variants, len(held_out), input_change(images, variants)))
    atomic_write_text(paths["table_csv"], table_csv(rows, variants))
    save_figure(curves, paths["curves"])
    return paths


def _parse_variant(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected A,B (e.g. 0.5,0.25), got {text!r}") from err
    return a, b


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser("python -m evaluation compare_runs", __doc__)
    parser.add_argument("runs", nargs="+", help="a multirun dir (searched recursively) or run dirs")
    parser.add_argument(
        "--content",
        nargs="+",
        default=[str(DEFAULT_HELD_OUT)],
        help="held-out content images or folders (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="output dir (default: the one dir given, else the runs' parent)")
    parser.add_argument("--size", type=int, default=256, help="longest side of the held-out images, px (%(default)s)")
    parser.add_argument("--max-images", type=int, default=4, help="use at most this many held-out images")
    parser.add_argument("--cell-px", type=int, default=192, help="figure cell size, px (default: %(default)s)")
    parser.add_argument(
        "--figure-format",
        choices=("png", "jpg"),
        default="png",
        help="format of the image grid (default: %(default)s; the curves are always PNG)",
    )
    parser.add_argument(
        "--max-panels", type=int, default=4, help="at most this many loss curves panels (default: %(default)s)"
    )
    add_device_option(parser, "where the networks run")
    parser.add_argument(
        "--figure-variant",
        type=_parse_variant,
        action="append",
        dest="figure_variants",
        metavar="A,B",
        help="extra figure row: the first held-out image as clip(a*x+b) (repeatable; default: 0.5,0.25)",
    )
    parser.add_argument(
        "--variant",
        type=_parse_variant,
        action="append",
        dest="variants",
        metavar="A,B",
        help="a contrast/brightness variant a*x+b (repeatable; default: "
        + " ".join(f"{a:g},{b:g}" for a, b in DEFAULT_VARIANTS)
        + ")",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        if args.size < 16 or args.max_images < 1 or args.cell_px < 32 or args.max_panels < 1:
            raise FaststyleError("--size must be >= 16, --max-images >= 1, --cell-px >= 32 and --max-panels >= 1")
        paths = compare(
            args.runs,
            args.content,
            args.out,
            args.size,
            args.max_images,
            args.device,
            tuple(args.variants) if args.variants else DEFAULT_VARIANTS,
            tuple(args.figure_variants) if args.figure_variants else DEFAULT_FIGURE_VARIANTS,
            args.cell_px,
            args.figure_format,
            args.max_panels,
        )
        print(paths["table_md"].read_text(encoding="utf-8"))
        for key, path in paths.items():
            print(f"{key}: {path}")

    return run_tool(work)


if __name__ == "__main__":
    raise SystemExit(main())
