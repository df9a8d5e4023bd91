"""Figures of the reports: matplotlib pictures on an Agg canvas (rendered to bytes, written atomically) -- an image
grid of stylizations, training curves from TensorBoard scalars -- and a video report's frame strip (a captioned grid
of data/pictures.py) with the warping error's map."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter, ScalarFormatter
from PIL import Image
from torch import Tensor

from core.errors import FaststyleError
from core.fileio import atomic_write_bytes
from data.io import resize_to, tensor_to_pil

DPI = 100


PANEL_PX = (520, 360)
"""Size of one curves panel in pixels."""


def new_figure(width_px: float, height_px: float, **kwargs: Any) -> Figure:
    """A matplotlib figure of exactly ``width_px`` x ``height_px`` pixels on an Agg canvas (no pyplot state)."""
    figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def render(figure: Figure, fmt: str = "png") -> bytes:
    """The figure encoded as PNG or JPEG bytes at its own pixel size."""
    buffer = io.BytesIO()
    options = {"pil_kwargs": {"quality": 92}} if fmt in ("jpg", "jpeg") else {}
    figure.savefig(buffer, format=fmt, dpi=DPI, facecolor="white", **options)
    return buffer.getvalue()


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` (format from the extension) through the project's one atomic write."""
    atomic_write_bytes(path, render(figure, path.suffix.lower().lstrip(".")))


def _fit(img: Image.Image, box: int) -> Image.Image:
    """Resize (down or up) so the longest side is ``box`` pixels."""
    scale = box / max(img.size)
    return resize_to(img, max(1, round(img.width * scale)), max(1, round(img.height * scale)))


def _show_tile(figure: Figure, rect: tuple[float, float, float, float], tile: Image.Image) -> Axes:
    """An image in its own frameless axes at ``rect`` (figure fractions: left, bottom, width, height)."""
    ax = figure.add_axes(rect)
    ax.imshow(np.asarray(tile), interpolation="antialiased")
    ax.set_axis_off()
    return ax


def make_figure(
    contents: Sequence[Tensor],
    style: Image.Image,
    columns: Sequence[tuple[str, Callable[[Tensor], Tensor]]],
    cell_px: int = 192,
    captions: Sequence[str | None] | None = None,
) -> Figure:
    """Image grid: one row per content (1, 3, H, W) in [0, 1]; columns content | style | each stylizer's output,
    under a title per column (``\\n`` splits a title into lines).

    ``captions[row]``, when given, is written on that row's content tile (e.g. "0.5x+0.25" for a variant row).
    """
    titles = ["content", "style", *(title for title, _ in columns)]
    pad, line_px = 6, 15
    header = pad + line_px * max(t.count("\n") + 1 for t in titles)
    width = pad + len(titles) * (cell_px + pad)
    height = header + len(contents) * (cell_px + pad)
    figure = new_figure(width, height)

    def rect(row: int, col: int) -> tuple[float, float, float, float]:
        left, top = pad + col * (cell_px + pad), header + row * (cell_px + pad)
        return left / width, 1 - (top + cell_px) / height, cell_px / width, cell_px / height

    for col, title in enumerate(titles):
        x_centre = (pad + col * (cell_px + pad) + cell_px / 2) / width
        figure.text(x_centre, 1 - 3 / height, title, ha="center", va="top", fontsize=9, linespacing=1.25)
    style_tile = _fit(style, cell_px)
    for row, x in enumerate(contents):
        tiles = [tensor_to_pil(x[0].cpu()), style_tile] + [tensor_to_pil(fn(x)[0].cpu()) for _, fn in columns]
        axes = [_show_tile(figure, rect(row, col), _fit(tile, cell_px)) for col, tile in enumerate(tiles)]
        caption = captions[row] if captions else None
        if caption:
            axes[0].text(
                0.03,
                0.03,
                caption,
                transform=axes[0].transAxes,
                fontsize=9,
                va="bottom",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 2},
            )
    return figure


# --------------------------------------------------------------------------------------------------------------------
# Training curves


def ema(values: Sequence[float], decay: float) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's smoothing slider does)."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * value
        out.append(avg / (1 - decay**i))
    return out


Series = Sequence[tuple[int, float]]
"""[(step, value)] sorted by step."""


LOG_SCALE_RATIO = 20.0
"""A panel gets a log y axis when its positive values span more than this factor (early losses dwarf late ones)."""


def _log_decades(series: Sequence[tuple[str, Series]]) -> float | None:
    """Decades the values span when the panel needs a log axis (all positive, spanning > ``LOG_SCALE_RATIO``),
    else None."""
    values = [v for _, data in series for _, v in data if np.isfinite(v)]
    if not values or min(values) <= 0 or max(values) / min(values) <= LOG_SCALE_RATIO:
        return None
    return float(np.log10(max(values) / min(values)))


def _plot_series(ax: Axes, label: str, data: Series, color: str, smoothing: float) -> None:
    """One run on ``ax``: the raw values thin and light, the smoothed values thick and labelled for the legend."""
    points = [(s, v) for s, v in data if np.isfinite(v)]
    if not points:
        return
    steps, values = zip(*points, strict=True)
    if len(points) == 1:
        ax.plot(steps, values, "o", color=color, label=label)
        return
    ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.35)
    ax.plot(steps, ema(values, smoothing), color=color, linewidth=2.0, label=label)


def _style_axes(ax: Axes, log_decades: float | None) -> None:
    """Step axis in whole numbers. A linear value axis is labelled without an additive offset, so every tick reads
    as its own value (1.005 x 10^5, never "+1e5" plus a small number); a log axis spanning up to two decades gets
    1-2-5 ticks, since powers of ten alone would leave it with one or two labels."""
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    if log_decades is None:
        formatter = ScalarFormatter(useOffset=False, useMathText=True)
        formatter.set_powerlimits((-3, 4))
        ax.yaxis.set_major_formatter(formatter)
    else:
        ax.set_yscale("log")
        ax.set_ylabel("log scale", color="grey")
        if log_decades <= 2:
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            every_tick = (np.inf, np.inf)  # the formatter's default hides 5 x 10^k past one decade
            ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=every_tick))
            ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", color="0.9")
    ax.legend(loc="best", fontsize="small", framealpha=0.85)


def plot_panel(ax: Axes, title: str, series: Sequence[tuple[str, Series]], smoothing: float = 0.8) -> None:
    """One metric on ``ax``: x = step, y = value (log axis when positive values span > ``LOG_SCALE_RATIO``), one
    color per run, raw series thin and light under an EMA-smoothed copy."""
    ax.set_title(title, fontsize=11)
    if not any(np.isfinite(v) for _, data in series for _, v in data):
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", color="grey")
        return
    for index, (label, data) in enumerate(series):
        _plot_series(ax, label, data, f"C{index}", smoothing)
    _style_axes(ax, _log_decades(series))


PREFERRED_TAGS = ("loss/total", "loss/content", "loss/style", "loss/tv")


def curve_tags(runs: Sequence[tuple[str, dict[str, Series]]], max_panels: int = 4) -> list[str]:
    """The ``loss/...`` tags every run logged (total, content, style first), without terms that are 0 throughout
    in every run (a term whose weight is 0, e.g. tv)."""
    common = set.intersection(*(set(series) for _, series in runs)) if runs else set()
    common = {t for t in common if t.startswith("loss/") and any(v != 0 for _, s in runs for _, v in s[t])}
    tags = [t for t in PREFERRED_TAGS if t in common]
    tags += sorted(t for t in common if t not in tags)
    return tags[:max_panels]


def make_curves(runs: Sequence[tuple[str, dict[str, Series]]], max_panels: int = 4, per_row: int = 2) -> Figure:
    """One panel per shared ``loss/...`` tag (see :func:`curve_tags`), ``per_row`` panels a row, runs overlaid;
    ``runs``: (legend label, tag -> series)."""
    tags = curve_tags(runs, max_panels)
    if not tags:
        raise FaststyleError(
            "the runs share no loss/... scalars in their TensorBoard events: train longer than one log interval"
        )
    n_cols = min(per_row, len(tags))
    n_rows = -(-len(tags) // n_cols)
    figure = new_figure(n_cols * PANEL_PX[0], n_rows * PANEL_PX[1], layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, tag in zip(axes, tags, strict=False):
        plot_panel(ax, tag, [(label, series[tag]) for label, series in runs])
    for ax in axes[len(tags) :]:
        ax.set_visible(False)
    return figure


# --------------------------------------------------------------------------------------------------------------------
# A video's frames

ERROR_MAP_GAIN = 4.0  # the strip's error maps show sqrt(D_t) x 4
OCCLUDED_COLOR = (0.2, 0.35, 0.9)  # the strip's error maps: pixels the mask leaves out


def error_map(frames: Tensor, t: int, backward: Tensor, mask: Tensor) -> Tensor:
    """(3, H, W) picture of sqrt(D_t) x ERROR_MAP_GAIN in grey (evaluation/warping.py: D_t of ``frames``
    (T, 3, H, W) given the input's ``backward`` flows and ``mask``), pixels out of the mask in OCCLUDED_COLOR."""
    from evaluation.warping import backward_warp

    warped = backward_warp(frames[t - 1 : t], backward[t - 1 : t])[0]
    grey = (frames[t] - warped).pow(2).mean(dim=0).sqrt().mul(ERROR_MAP_GAIN).clamp(0, 1).expand(3, -1, -1)
    color = torch.tensor(OCCLUDED_COLOR).view(3, 1, 1).expand_as(grey)
    return torch.where(mask[t - 1].bool(), grey, color)


def frame_strip(rows: Sequence[tuple[str, Tensor]], backward: Tensor, mask: Tensor, count: int) -> Image.Image:
    """The frame strip: ``count`` consecutive frames from the middle of each (label, (T, 3, H, W) frames) row (the
    input first, then each model), each row ending with its error map of its last frame shown (``backward`` and
    ``mask``: the input clip's flow and non-occlusion mask)."""
    from data.pictures import draw_grid

    length = rows[0][1].shape[0]
    first = max(1, (length - count) // 2)
    shown = range(first, min(first + count, length))
    tiles = []
    for label, frames in rows:
        row = [(tensor_to_pil(frames[t]), f"{label}, frame {t}" if t == first else f"frame {t}") for t in shown]
        row.append(
            (tensor_to_pil(error_map(frames, shown[-1], backward, mask)), f"error x{ERROR_MAP_GAIN:g}, blue: left out")
        )
        tiles.append(row)
    picture, _ = draw_grid(tiles)
    return picture
